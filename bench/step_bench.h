// File: bench/step_bench.h
//
// `denoised bench step`: seconds per denoising step of the engine (both CFG
// branches with --cfg) on N local rank processes, with the all-to-all time,
// achieved TFLOP/s (FLOPs counted per ../shared/docs/wan-spec.md §6) and peak
// backend memory per rank. Ranks are spawned like `denoised run`
// (worker/run_command.h); `bench step-rank` is the hidden per-rank command.
//
// Shape: --frames/--height/--width (pixels, as `run`), or --tokens N, which
// picks a latent of one patch-frame with a token grid H' x W' = N, H' the
// largest divisor of N that is <= sqrt(N) (e.g. 32760 -> 180 x 182, 75600 -> 270 x 280; a prime
// N gives 1 x N and fails when N exceeds rope_max_seq_len).
#ifndef DN_BENCH_STEP_BENCH_H_
#define DN_BENCH_STEP_BENCH_H_

namespace dn::bench {

int BenchStepCommand(int argc, char** argv);
int BenchStepRankCommand(int argc, char** argv);

}  // namespace dn::bench

#endif  // DN_BENCH_STEP_BENCH_H_
