"""Where graphopt::sp_attention's time goes: a torch.profiler table of one rank's kernels.

    torchrun --standalone --nproc-per-node=2 bench/profile_sp_attention.py --seq-local 16384

Prints, for rank 0, the CUDA kernels and CPU ops by total time over --iters forward + backward
steps, next to the step's wall time, and writes a Chrome trace per rank into --out if given.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-local", type=int, default=16384)
    parser.add_argument("--hkv", type=int, default=32)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    from graphopt.ops.sp_attention import sp_attention
    gen = torch.Generator(device="cuda").manual_seed(dist.get_rank())
    shape = lambda h: (1, h, args.seq_local, 128)  # noqa: E731
    q, k, v = (torch.randn(shape(h), device="cuda", dtype=torch.bfloat16, generator=gen)
               .requires_grad_() for h in (32, args.hkv, args.hkv))
    dout = torch.randn(shape(32), device="cuda", dtype=torch.bfloat16, generator=gen)

    def step():
        sp_attention(q, k, v, causal=True).backward(dout)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(args.iters):
            step()
        end.record()
        torch.cuda.synchronize()
    if dist.get_rank() == 0:
        print(f"step {start.elapsed_time(end) / args.iters:.2f} ms (rank 0, under the profiler)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        prof.export_chrome_trace(os.path.join(args.out, f"trace_rank{dist.get_rank()}.json"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
