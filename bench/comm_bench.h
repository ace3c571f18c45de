// File: bench/comm_bench.h
//
// `denoised bench comm`: all-to-all latency and bus bandwidth of a process
// group, nccl-tests style. It starts --ranks rank processes of this same
// binary (the hidden `bench comm-rank` subcommand) with a FileStore in a
// temporary folder; each size of the sweep (per-rank bytes, x4 steps) runs
// --warmup untimed and --iters timed all-to-alls, and every size's data is
// verified. Rank 0 prints one row per size: per-rank bytes, median time (us;
// the slowest rank's median), algbw = bytes / time and busbw = algbw *
// (n-1)/n (GB/s), and #wrong (wrong 16-bit words over all ranks).
//
//   denoised bench comm --ranks 4 --backend gloo
//   denoised bench comm --ranks 8 --backend nccl --max-bytes 256M --json out.json
//
// Gloo ranks are CPU processes over loopback TCP (default sweep up to 16 MiB).
// NCCL ranks use GPU = rank, a CUDA stream each, and time with CUDA events
// (default sweep up to 256 MiB); a Gloo group beside it carries the barriers
// and the reductions of timings and error counts.
#ifndef DN_BENCH_COMM_BENCH_H_
#define DN_BENCH_COMM_BENCH_H_

namespace dn::bench {

// `denoised bench comm ...` (argv[0] is "comm").
int BenchCommCommand(int argc, char** argv);
// `denoised bench comm-rank ...`: one rank, started by BenchCommCommand.
int BenchCommRankCommand(int argc, char** argv);

}  // namespace dn::bench

#endif  // DN_BENCH_COMM_BENCH_H_
