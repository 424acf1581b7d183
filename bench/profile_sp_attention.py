"""Where graphopt::sp_attention's time goes: a torch.profiler table of one rank's kernels.

    torchrun --standalone --nproc-per-node=2 bench/profile_sp_attention.py --seq-local 16384

Prints, for rank 0, the CUDA kernels and CPU ops by total time over --iters forward + backward
steps, next to the step's wall time, and writes a Chrome trace per rank into --out if given.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile

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
    trace_dir = args.out or tempfile.mkdtemp()
    os.makedirs(trace_dir, exist_ok=True)
    trace = os.path.join(trace_dir, f"trace_rank{dist.get_rank()}.json")
    prof.export_chrome_trace(trace)
    report = stream_report(trace, args.iters)
    for rank in range(dist.get_world_size()):
        if rank == dist.get_rank():
            print(f"rank {rank}: step {start.elapsed_time(end) / args.iters:.2f} ms under the profiler")
            print(report, flush=True)
        dist.barrier()
    if dist.get_rank() == 0:
        from graphopt.ops import attention
        print(f"cuDNN refusals: {attention._CUDNN_REFUSED or 'none'}; grouped heads refused: "
              f"{attention._CUDNN_GQA_REFUSED or 'none'}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25,
                                        max_name_column_width=60))
    dist.destroy_process_group()


def stream_report(trace_path: str, iters: int, min_gap_us: float = 20.0) -> str:
    """Per CUDA stream: kernel time per step; on the busiest (compute) stream, the idle gaps
    between its kernels -- time the block kernels waited, for transfers or the host -- with the
    kernels around the largest of them."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    by_stream: dict = {}
    for e in kernels:
        by_stream.setdefault(e.get("args", {}).get("stream"), []).append(e)
    lines = []
    for stream, items in sorted(by_stream.items(), key=lambda kv: -sum(e["dur"] for e in kv[1])):
        busy = sum(e["dur"] for e in items) / 1e3 / iters
        lines.append(f"  stream {stream}: {len(items) // iters} kernels, {busy:.2f} ms per step")
    compute = max(by_stream.values(), key=lambda items: sum(e["dur"] for e in items))
    gaps = []
    for before, after in zip(compute, compute[1:]):
        gap = after["ts"] - (before["ts"] + before["dur"])
        if gap > min_gap_us:
            gaps.append((gap, before["name"][:50], after["name"][:50]))
    span = (compute[-1]["ts"] + compute[-1]["dur"] - compute[0]["ts"]) / 1e3 / iters
    lines.append(f"  compute stream: span {span:.2f} ms per step, gaps > {min_gap_us:.0f} us: "
                 f"{sum(g for g, _, _ in gaps) / 1e3 / iters:.2f} ms per step in {len(gaps)}")
    for gap, before, after in sorted(gaps, reverse=True)[:12]:
        lines.append(f"    {gap:8.0f} us after {before} | before {after}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
