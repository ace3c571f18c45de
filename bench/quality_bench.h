// File: bench/quality_bench.h
//
// `denoised bench quality`: what the fast tier (worker/acceleration.h: fp8
// self-attention, step caching) costs in quality against the exact path. One
// rank in-process (CPU by default; --backend cuda for the GPU). For every
// case (prompt x seed) it runs the exact path and each tier with the same
// inputs and reports, per tier, as a markdown table:
//   - demo mode (a model with a prompt table whose clips are pixel-space RGB,
//     e.g. tools/demo_model): the clip analyser's (server/clip_analyser.h)
//     colour / shape / direction agreement with the prompt, and agreement of
//     all three with the exact path's reading;
//   - always: rel L2 (||x - exact|| / ||exact||) and PSNR of the final latents
//     against the exact path (demo: pixels in [-1, 1], peak-to-peak 2; other
//     models: the exact latents' range), the steps skipped and the time per
//     case relative to the exact path.
// Tiers: --thresholds T1,T2,... (step caching) and, unless --fp8 off, fp8
// attention alone and with each threshold; a backend without fp8 attention
// gets "not available on this backend" rows (--fp8 auto).
// docs/QUALITY.md has the method and the demo model's table.
#ifndef DN_BENCH_QUALITY_BENCH_H_
#define DN_BENCH_QUALITY_BENCH_H_

namespace dn::bench {

int BenchQualityCommand(int argc, char** argv);

}  // namespace dn::bench

#endif  // DN_BENCH_QUALITY_BENCH_H_
