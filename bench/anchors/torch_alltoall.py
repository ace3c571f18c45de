"""PyTorch baseline for `denoised bench comm --backend nccl`: the same per-rank sizes
through torch.distributed.all_to_all_single into a preallocated output (the "direct" path
of SGLang PR #24366), timed with CUDA events, median of --iters runs.

Run on the GPU machine beside our benchmark, in the same call:
    torchrun --nproc_per_node 4 bench/anchors/torch_alltoall.py --json out.json
Prints one table row per size: bytes per rank, median us of single synchronised calls, the
mean us of --iters calls issued back to back (b2b), algbw and busbw (GB/s, from the median),
with busbw = algbw * (n-1)/n as nccl-tests define it for all-to-all.
"""
import argparse
import json
import os

import torch
import torch.distributed as dist


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--min-bytes", type=int, default=64 << 10)
    p.add_argument("--max-bytes", type=int, default=256 << 20)
    p.add_argument("--factor", type=int, default=4)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", default="")
    a = p.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank % torch.cuda.device_count())
    rows = []
    size = a.min_bytes
    while size <= a.max_bytes:
        # `size` bytes per rank in total (as nccl-tests count), split into world blocks.
        n = size // 2 // world * world
        send = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        recv = torch.empty_like(send)
        for _ in range(a.warmup):
            dist.all_to_all_single(recv, send)
        torch.cuda.synchronize()
        times = []
        for _ in range(a.iters):
            e0 = torch.cuda.Event(enable_timing=True)
            e1 = torch.cuda.Event(enable_timing=True)
            e0.record()
            dist.all_to_all_single(recv, send)
            e1.record()
            torch.cuda.synchronize()
            times.append(e0.elapsed_time(e1) * 1e3)
        times.sort()
        # Back to back: iters calls with no host sync between them (how a model issues them).
        e0 = torch.cuda.Event(enable_timing=True)
        e1 = torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(a.iters):
            dist.all_to_all_single(recv, send)
        e1.record()
        torch.cuda.synchronize()
        b2b = e0.elapsed_time(e1) * 1e3 / a.iters
        med = torch.tensor([times[len(times) // 2], b2b], device="cuda", dtype=torch.float64)
        dist.all_reduce(med, op=dist.ReduceOp.MAX)
        us, b2b = med[0].item(), med[1].item()
        nbytes = n * 2
        algbw = nbytes / (us * 1e-6) / 1e9
        busbw = algbw * (world - 1) / world
        rows.append({"bytes": nbytes, "us": us, "b2b_us": b2b, "algbw_gbs": algbw, "busbw_gbs": busbw})
        if rank == 0:
            print(f"torch a2a  {nbytes:>12d} B  {us:10.1f} us  b2b {b2b:10.1f} us  algbw {algbw:8.2f}  "
                  f"busbw {busbw:8.2f} GB/s", flush=True)
        size *= a.factor
    if rank == 0 and a.json:
        with open(a.json, "w") as f:
            json.dump({"world": world, "torch": torch.__version__,
                       "nccl": ".".join(map(str, torch.cuda.nccl.version())), "rows": rows}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
