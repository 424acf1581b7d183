"""GEMM + all-reduce / reduce-scatter overlap on P GPUs: sequential vs chunked vs copy engine vs tile.

    torchrun --standalone --nproc-per-node=2 bench/matmul_allreduce.py --out DIR   # or 4
    (--shapes 0,2 --kinds reduce_scatter --only copy_engine,torch_fused: a quick subset)

Shapes: Llama-70B row-parallel linears at TP = P (o_proj K = 8192 / P, down_proj K = 28672 / P,
N = 8192, M in {4096, 8192, 16384}) and the shapes of ../shared/GPU.md, bf16. For every shape, in
the same run: cuBLAS GEMM alone, NCCL collective alone, sequential (GEMM then collective), naive
4-chunk streams (graphopt's chunked runtime), the copy-engine runtime (cuBLAS sub-chunks +
peer-to-peer copies on symmetric memory) for every sub-chunk schedule the cost model considers
(``overlap_cost.CE_SCHEDULES``: equal sub-chunks and geometrically shrinking ones), each both as the
pass emits it (``copy_engine:*``: CUDA-graph replay of repeated calls, ``config.overlap_graph_replay``)
and issued op by op (``copy_engine_eager:*``), the
tile-triggered kernel for several communication SM counts, torch's fused_matmul_reduce_scatter
(reduce-scatter only), and the ideal max(t_gemm, t_comm). ``graphopt_auto`` is the column the cost
model picks (what the pass emits). Times are per call, the mean over ``--iters`` calls after
warm-up (a replayed call's first sighting and its capture happen in the warm-up; ``replay_stats``
per row counts them), best of 3 repeats, the slowest rank. Correctness: the tile and copy-engine runtimes (one
equal and one tapered schedule) against
an fp32 reference and bitwise across ranks (all-reduce); torch's fused reduce-scatter against
NCCL's reduce_scatter_tensor of the same product (the same output layout: rank r holds rows block
r), so the comparison with it is like for like. Beyond 2 GPUs the best copy-engine schedule of
each shape is timed again with barriers of every rank where it hands off between two
(``ce_barriers:*``; summary ``copy_engine_handoff_vs_barriers_geomean``).

Writes DIR/matmul_allreduce.json (device, versions, every time, ``summary``) and .md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
import traceback

import torch
import torch.distributed as dist

from graphopt import _compat
from graphopt.analysis import overlap_cost
from graphopt.analysis.device_profile import current_profile
from graphopt.distributed import cuda_driver, tracked_gemm

TARGETS = {"geomean_over_ideal": "<= 1.05", "worst_vs_sequential": "<= 1.00",
           "rs_vs_torch_fused": "< 1.00 (ours faster than torch fused_matmul_reduce_scatter)"}


def shapes(world: int) -> list[tuple[str, int, int, int]]:
    rows = []
    for m in (4096, 8192, 16384):
        rows.append((f"70B o_proj M={m}", m, 8192, 8192 // world))
        rows.append((f"70B down_proj M={m}", m, 8192, 28672 // world))
    rows += [("GPU.md 8192x8192x14336", 8192, 8192, 14336), ("GPU.md 16384x8192x4096", 16384, 8192, 4096),
             ("GPU.md 4096x4096x8192", 4096, 4096, 8192)]
    seen, unique = set(), []
    for name, m, n, k in rows:
        if (m, n, k) not in seen:
            seen.add((m, n, k))
            unique.append((name, m, n, k))
    return unique


def timed(fn, iters: int, warmup: int = 3, repeats: int = 3) -> float:
    """Seconds per call: mean over ``iters`` back-to-back calls, best of ``repeats``, slowest rank
    (this process alone where no process group is initialised)."""
    distributed = dist.is_initialized()
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        if distributed:
            dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / iters)
    if not distributed:
        return best
    value = torch.tensor([best], device="cuda")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item()


def rel_err(out: torch.Tensor, reference: torch.Tensor) -> float:
    """max |out - reference| / max |reference|."""
    return ((out.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


def check_api() -> dict:
    symm = _compat.symmetric_memory()
    info = {"symmetric_memory_module": symm is not None}
    if symm is not None:
        for name in ("empty", "rendezvous", "enable_symm_mem_for_group", "set_backend"):
            info[name] = hasattr(symm, name)
    info["fused_matmul_reduce_scatter"] = hasattr(torch.ops.symm_mem, "fused_matmul_reduce_scatter")
    return info


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--comm-sms", default=",".join(map(str, overlap_cost.COMM_SM_CHOICES)))
    parser.add_argument("--max-shapes", type=int, default=100)
    parser.add_argument("--shapes", default="", help="comma-separated shape indices (default: all)")
    parser.add_argument("--kinds", default="all_reduce,reduce_scatter")
    parser.add_argument("--only", default="", help="time only variants whose label starts with one "
                        "of these comma-separated prefixes (gemm, comm, sequential always)")
    parser.add_argument("--profile", choices=("measured", "default"), default="measured",
                        help="device profile of the cost model's choices: 'measured' (this run's GEMM, "
                        "NCCL all-reduce, peer-copy and memory bandwidths, what `python -m graphopt "
                        "calibrate` + config.device_profile give a user) or the built-in default")
    args = parser.parse_args()

    rank = int(os.environ["RANK"])
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group("nccl")
    world = dist.get_world_size()
    group_name = _compat.group_name(None)
    import graphopt.ops.matmul_collectives  # noqa: F401
    from graphopt.distributed import symm_mem

    ops = torch.ops.graphopt
    comm_sms_choices = [int(x) for x in args.comm_sms.split(",")]
    profile = current_profile()
    api = check_api()
    if rank == 0:
        print("API:", api, "symm_mem.available():", symm_mem.available(), flush=True)
    results = {"device": torch.cuda.get_device_name(), "gpus": world, "torch": torch.__version__,
               "triton": __import__("triton").__version__, "python": platform.python_version(),
               "api": api, "iters": args.iters, "targets": TARGETS, "copy_engine_replay": True, "note":
               f"measured on {world} GPUs of one host", "rows": []}

    def save() -> None:
        if rank == 0:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "matmul_allreduce.json"), "w") as handle:
                json.dump(results, handle, indent=1)

    results["copy_engine_profile"] = _copy_engine_profile(group_name)
    if rank == 0:
        print("copy-engine profile:", results["copy_engine_profile"], flush=True)
    if args.profile == "measured":
        profile = measured_profile(profile, results["copy_engine_profile"])
    results["profile_source"] = args.profile
    results["profile"] = profile.to_json()
    if rank == 0:
        print("cost-model profile:", results["profile"], flush=True)
    torch.manual_seed(1234 + rank)
    chosen = shapes(world)[: args.max_shapes]
    if args.shapes:
        chosen = [chosen[int(index)] for index in args.shapes.split(",")]
    only = tuple(("gemm", "comm", "sequential", *args.only.split(","))) if args.only else None
    for kind in args.kinds.split(","):
        for name, m, n, k in chosen:
            row = {"kind": kind, "shape": name, "M": m, "N": n, "K": k, "ms": {}, "errors": {}}
            a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) / math.sqrt(k)
            b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16).t()  # a linear weight, [K, N]
            c = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            rs_out = torch.empty(m // world, n, device="cuda", dtype=torch.bfloat16)
            scatter = kind == "reduce_scatter"

            def comm():
                if scatter:
                    dist.reduce_scatter_tensor(rs_out, c)
                else:
                    dist.all_reduce(c)

            def sequential():
                torch.mm(a, b, out=c)
                comm()

            variants = {"gemm": lambda: torch.mm(a, b, out=c), "comm": comm, "sequential": sequential}
            tracked_chunks = tuple(
                count for count in overlap_cost.TRACKED_CHUNK_CHOICES
                if overlap_cost.tracked_chunk_ok(kind, m, world, count)
                and tracked_gemm.support(m, n, k, torch.bfloat16, count) is None)
            row["tracked_refusal"] = (None if tracked_chunks else
                                      tracked_gemm.support(m, n, k, torch.bfloat16, 8))
            choice = overlap_cost.choose_overlap(
                kind, m, n, k, 2, world, profile, is_cuda=True, symmetric_memory=symm_mem.available(),
                replay=True, tracked_chunks=tracked_chunks)
            plan = overlap_cost.plan_key(choice)

            def overlapped(mode: str, chunks: int, sms: int, taper: float = 1.0, replay: bool = False):
                if scatter:
                    return lambda: ops.matmul_reduce_scatter(a, b, group_name, world, 0, mode, chunks, sms,
                                                             taper, replay)
                return lambda: ops.matmul_all_reduce(a, b, None, group_name, mode, chunks, sms, taper,
                                                     replay)

            chunk_counts = sorted({4, choice.chunks if choice.mode == "chunked" else 4})
            sm_counts = sorted(set(comm_sms_choices) | ({choice.comm_sms} if choice.mode == "tile" else set()))
            schedules = sorted(set(overlap_cost.CE_SCHEDULES)
                               | ({(choice.chunks, choice.taper)} if choice.mode == "copy_engine" else set()))
            for count in chunk_counts:
                variants[f"chunked:{count}"] = overlapped("chunked", count, 0)
            for count, taper in schedules:
                key = overlap_cost.copy_engine_key(count, taper)
                variants[key] = overlapped("copy_engine", count, 0, taper, replay=True)
                variants[eager_key(key)] = overlapped("copy_engine", count, 0, taper)
            for key in choice.estimates_s:
                if key.startswith("tracked"):   # the tracked runtime, where cuBLASLt takes counters
                    mode, count, sms = overlap_cost.parse_tracked_key(key)
                    variants[key] = overlapped(mode, count, sms)
            if scatter:
                variants["torch_fused_rs"] = lambda: torch.ops.symm_mem.fused_matmul_reduce_scatter(
                    a, b, "sum", 0, group_name)
            for sms in sm_counts:
                variants[f"tile:{sms}"] = overlapped("tile", 1, sms)
            if only:
                variants = {label: fn for label, fn in variants.items()
                            if label.startswith(only) or label == plan}
            # Correctness first: fp32 reference, bitwise across ranks (all-reduce), and torch's
            # fused reduce-scatter against NCCL's on the same product (same output layout).
            reference = (a.float() @ b.float())
            dist.all_reduce(reference)
            if scatter:
                reference = reference.chunk(world)[rank]
            tapered = [overlap_cost.copy_engine_key(*s) for s in schedules if s[1] < 1.0]
            checks = {"tile": f"tile:{comm_sms_choices[0]}",
                      "copy_engine": overlap_cost.copy_engine_key(*schedules[0]),
                      "copy_engine_tapered": plan if plan in tapered else tapered[0],
                      "torch_fused_rs": "torch_fused_rs"}
            sequential()
            unfused = (rs_out if scatter else c).clone()   # bf16 GEMM + NCCL, the graph without the pass
            first = {}
            for name, label in checks.items():
                if label not in variants:
                    continue
                try:
                    out = first[name] = variants[label]()
                    row[f"{name}_rel_err"] = rel_err(out, reference)
                    row[f"{name}_vs_unfused_rel_err"] = rel_err(out, unfused)
                    gathered = [torch.empty_like(out) for _ in range(world)]
                    dist.all_gather(gathered, out)
                    row[f"{name}_bitwise_same_on_all_ranks"] = (
                        None if scatter else all(torch.equal(gathered[0], g) for g in gathered))
                except Exception:
                    row["errors"][f"{name}_check"] = traceback.format_exc()[-600:]
            for label, fn in variants.items():
                failed = f"{label.split(':')[0]}_check"
                if failed in row["errors"] or (label in tapered and "copy_engine_tapered_check" in row["errors"]):
                    continue
                try:
                    row["ms"][label] = timed(fn, args.iters) * 1e3
                except Exception:
                    row["errors"][label] = traceback.format_exc()[-600:]
            # After many back-to-back calls on reused buffers the result is still the same bits.
            for name, out in first.items():
                row[f"{name}_repeatable"] = bool(torch.equal(variants[checks[name]](), out))
            times = row["ms"]
            row["ms"]["ideal"] = max(times["gemm"], times["comm"])
            row["replay_stats"] = symm_mem.replay_stats()
            for prefix in ("tile", "copy_engine", "copy_engine_eager", "tracked"):
                found = {key: v for key, v in times.items() if key.startswith(prefix + ":")
                         or prefix == "tracked" and key.startswith("tracked_two_shot:")}
                if found:
                    row[f"best_{prefix}"] = min(found, key=found.get)
            best_ce = row.get("best_copy_engine")
            if world > 2 and best_ce:   # the same schedule with barriers where it hands off
                symm_mem.HANDOFFS = False
                try:
                    times[barrier_key(best_ce)] = timed(variants[best_ce], args.iters) * 1e3
                except Exception:
                    row["errors"]["ce_barriers"] = traceback.format_exc()[-600:]
                finally:
                    symm_mem.HANDOFFS = True
            uniform = {key: v for key, v in times.items()
                       if key.startswith("copy_engine:") and key not in tapered}
            if uniform:   # equal sub-chunks only: the runtime as it was before tapering
                row["best_copy_engine_uniform"] = min(uniform, key=uniform.get)
            row["cost_model_choice"] = plan
            row["cost_model_reason"] = choice.reason
            row["cost_model_estimates_ms"] = {key: v * 1e3 for key, v in choice.estimates_s.items()}
            # A variant that failed counts as sequential (the pass would not emit a failing kernel).
            row["ms"]["graphopt_auto"] = times.get(plan, times["sequential"])
            results["rows"].append(row)
            if rank == 0:
                print(kind, name, {key: round(v, 3) for key, v in times.items()},
                      "err", row.get("copy_engine_rel_err"), row.get("tile_rel_err"), "choice", plan,
                      "replay", row["replay_stats"], flush=True)
            save()
            del a, b, c, rs_out
            symm_mem.clear_cache()
            torch.cuda.empty_cache()

    results["cuda_graph"] = _cuda_graph_check(world, group_name)
    results["summary"] = summarize(results["rows"])
    save()
    if rank == 0:
        markdown = to_markdown(results)
        with open(os.path.join(args.out, "matmul_allreduce.md"), "w") as handle:
            handle.write(markdown)
        print(markdown, flush=True)
    dist.destroy_process_group()


def _copy_engine_profile(group_name: str) -> dict:
    """What the copy-engine cost model assumes, measured: peer pull bandwidth (copy engine), the
    barrier's latency on an idle GPU, and cuBLAS speed of row sub-chunks relative to the whole GEMM."""
    from graphopt.distributed import symm_mem
    report = {}
    try:
        rows, cols = 8192, 4096                       # 64 MiB bf16
        workspace = symm_mem.copy_engine_workspace(group_name, rows, cols, torch.bfloat16,
                                                   torch.device("cuda", torch.cuda.current_device()))
        workspace.partial.normal_()
        local = torch.empty_like(workspace.partial)
        peer = workspace.peers[(workspace.rank + 1) % workspace.world_size]
        torch.cuda.synchronize()
        dist.barrier()
        seconds = timed(lambda: local.copy_(peer), 10)
        report["p2p_pull_gbps"] = local.numel() * local.element_size() / seconds / 1e9
        # Two barriers per "call", as in every copy-engine call (a flag slot is reused only after
        # the next barrier). GPU time on idle GPUs, and host time to enqueue one; a barrier's
        # 3 (P - 1) memory operations batched in one driver call (the default) and one call each.
        for batched in (True, False):
            suffix = "" if batched else "_unbatched"
            symm_mem.BATCH_MEMOPS = batched
            report["barrier_us" + suffix] = timed(lambda: (workspace.begin_call(), workspace.barrier(),
                                                           workspace.barrier()), 100) * 1e6 / 2
            workspace.begin_call()
            start = time.perf_counter()
            for _ in range(64):
                workspace.barrier()
            report["barrier_host_us" + suffix] = (time.perf_counter() - start) / 64 * 1e6
            torch.cuda.synchronize()
            dist.barrier()
        symm_mem.BATCH_MEMOPS = True
        report["memops_mode"] = cuda_driver.stream_memops_mode()
        report["barrier_kind"] = "stream memops" if workspace.flag_ptrs else "signal-pad kernel"
        # Local copies: cudaMemcpy vs an elementwise kernel on the SMs.
        bytes_moved = 2 * local.numel() * local.element_size()
        report["local_memcpy_gbps"] = bytes_moved / timed(lambda: local.copy_(workspace.partial), 10) / 1e9
        report["local_kernel_copy_gbps"] = bytes_moved / timed(
            lambda: torch.mul(workspace.partial, 1, out=local), 10) / 1e9
        dist.barrier()
    except Exception:
        report["error"] = traceback.format_exc()[-600:]
    # Host time to issue one copy-engine reduce-scatter (no GPU sync): the pipeline starves where
    # this exceeds the GPU time.
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(4096, 8192, device="cuda", dtype=torch.bfloat16)
    world = dist.get_world_size()
    def host_us(call) -> float:
        call()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            call()
        seconds = (time.perf_counter() - start) / 5
        torch.cuda.synchronize()
        dist.barrier()
        return seconds * 1e6

    for chunks in (1, 2, 4, 8):
        report[f"host_us_per_rs_call_chunks{chunks}"] = host_us(
            lambda: torch.ops.graphopt.matmul_reduce_scatter(a, b, group_name, world, 0, "copy_engine",
                                                             chunks, 0))
    for chunks, taper in overlap_cost.CE_SCHEDULES:
        key = overlap_cost.copy_engine_key(chunks, taper)
        report[f"host_us_per_ar_call_{key}"] = host_us(
            lambda: torch.ops.graphopt.matmul_all_reduce(a, b, None, group_name, "copy_engine", chunks,
                                                         0, taper))
        call = lambda: torch.ops.graphopt.matmul_all_reduce(  # noqa: E731
            a, b, None, group_name, "copy_engine", chunks, 0, taper, True)
        call()                          # first sighting (eager); host_us's own first call captures
        report[f"host_us_per_ar_call_{key}_replayed"] = host_us(call)
    for chunks in (1, 4):
        call = lambda: torch.ops.graphopt.matmul_reduce_scatter(  # noqa: E731
            a, b, group_name, world, 0, "copy_engine", chunks, 0, 1.0, True)
        call()
        report[f"host_us_per_rs_call_chunks{chunks}_replayed"] = host_us(call)
    symm_mem.BATCH_MEMOPS = False
    report["host_us_per_ar_call_copy_engine:2_unbatched"] = host_us(
        lambda: torch.ops.graphopt.matmul_all_reduce(a, b, None, group_name, "copy_engine", 2, 0))
    symm_mem.BATCH_MEMOPS = True
    for k in (4096, 14336):
        a = torch.randn(8192, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(k, 8192, device="cuda", dtype=torch.bfloat16)
        full = timed(lambda: torch.mm(a, b), 5)
        for piece in (512, 1024, 2048, 4096):
            parts = [a[i:i + piece] for i in range(0, 8192, piece)]
            chunked = timed(lambda: [torch.mm(part, b) for part in parts], 5)
            report[f"gemm_rows{piece}_k{k}_over_full"] = chunked / full
    return report


def measured_profile(default, ce_profile: dict):
    """``default`` with this machine's figures, measured here: bf16 GEMM throughput, NCCL all-reduce
    bus bandwidth over this group (256 MiB), the copy engine's peer pull and local copy bandwidths
    (``ce_profile``). Launch and collective latencies keep their defaults. The result is the same on
    every rank (rank 0's figures, broadcast), as one calibrated profile file would be."""
    import dataclasses
    world = dist.get_world_size()
    size = 8192
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    tflops = 2 * size ** 3 / timed(lambda: torch.mm(a, b), 10) / 1e12
    buffer = torch.randn(128 * 2 ** 20, device="cuda", dtype=torch.bfloat16)
    bus = buffer.numel() * 2 * 2 * (world - 1) / world / timed(lambda: dist.all_reduce(buffer), 5) / 1e9
    figures = torch.tensor([tflops, bus, ce_profile.get("p2p_pull_gbps", default.p2p_gbps),
                            ce_profile.get("local_memcpy_gbps", default.hbm_gbps)], device="cuda",
                           dtype=torch.float64)
    dist.broadcast(figures, 0)
    tflops, bus, p2p, hbm = figures.tolist()
    del a, b, buffer
    torch.cuda.empty_cache()
    return dataclasses.replace(default, name=f"{default.name} (measured in this run)",
                               matmul_tflops=tflops, allreduce_bus_gbps=bus, p2p_gbps=p2p,
                               hbm_gbps=hbm)


def _cuda_graph_check(world: int, group_name: str) -> dict:
    """Capture the tile and copy-engine (equal and tapered sub-chunks) all-reduces in a CUDA graph,
    replay, compare with eager."""
    report = {}
    for name, mode, count, sms, taper, replay in (
            ("tile", "tile", 1, 16, 1.0, False),
            ("copy_engine", "copy_engine", 2, 0, 1.0, False),
            ("copy_engine_tapered", "copy_engine", 3, 0, 0.5, False),
            # replay=True inside a user's capture: issued into the outer graph
            ("copy_engine_replay", "copy_engine", 2, 0, 1.0, True)):
        try:
            a = torch.randn(1024, 512, device="cuda", dtype=torch.bfloat16)
            b = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16)
            eager = torch.ops.graphopt.matmul_all_reduce(a, b, None, group_name, mode, count, sms, taper,
                                                         replay)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
                captured = torch.ops.graphopt.matmul_all_reduce(a, b, None, group_name, mode, count, sms,
                                                                taper, replay)
            torch.cuda.current_stream().wait_stream(stream)
            for _ in range(3):
                graph.replay()
            torch.cuda.synchronize()
            report[name] = {"ok": bool(torch.equal(eager, captured))}
        except Exception as err:
            report[name] = {"ok": False, "error": repr(err)[-400:]}
    return report


def eager_key(copy_engine_key: str) -> str:
    """The ms key of a copy-engine schedule issued op by op (no CUDA-graph replay)."""
    return "copy_engine_eager:" + copy_engine_key.split(":", 1)[1]


def barrier_key(copy_engine_key: str) -> str:
    """The ms key of a copy-engine schedule timed with barriers in place of its hand-offs."""
    return "ce_barriers:" + copy_engine_key.split(":", 1)[1]


def geomean(values: list[float]) -> float | None:
    """Geometric mean; None for no values."""
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def summarize(rows: list[dict]) -> dict:
    over_ideal, vs_sequential, rs_vs_fused = [], [], []
    # over ideal, vs sequential, RS vs fused
    best = {"tile": ([], [], []), "copy_engine": ([], [], []), "copy_engine_uniform": ([], [], []),
            "copy_engine_eager": ([], [], []), "tracked": ([], [], [])}
    for row in rows:
        t = row["ms"]
        over_ideal.append(t["graphopt_auto"] / t["ideal"])
        vs_sequential.append(t["graphopt_auto"] / t["sequential"])
        fused = t.get("torch_fused_rs") if row["kind"] == "reduce_scatter" else None
        if fused:
            rs_vs_fused.append(t["graphopt_auto"] / fused)
        for prefix, (ideal, seq, vs_fused) in best.items():
            key = row.get(f"best_{prefix}")
            if key:
                ideal.append(t[key] / t["ideal"])
                seq.append(t[key] / t["sequential"])
                if fused:
                    vs_fused.append(t[key] / fused)
    summary = {
        "geomean_over_ideal": geomean(over_ideal),
        "worst_vs_sequential": max(vs_sequential) if vs_sequential else None,
        "rs_vs_torch_fused_geomean": geomean(rs_vs_fused),
        "rs_vs_torch_fused_worst": max(rs_vs_fused) if rs_vs_fused else None,
    }
    for prefix, (ideal, seq, vs_fused) in best.items():
        summary.update({
            f"{prefix}_geomean_over_ideal": geomean(ideal),
            f"{prefix}_worst_vs_sequential": max(seq) if seq else None,
            f"{prefix}_best_vs_sequential": min(seq) if seq else None,
            f"rs_{prefix}_vs_torch_fused_geomean": geomean(vs_fused),
        })
    replayed = [row["ms"][row["best_copy_engine"]] / row["ms"][row["best_copy_engine_eager"]]
                for row in rows if row.get("best_copy_engine") and row.get("best_copy_engine_eager")]
    if replayed:  # the best schedule replayed from CUDA graphs / the best one issued op by op
        summary["copy_engine_replay_vs_eager_geomean"] = geomean(replayed)
    handoff = [row["ms"][best] / row["ms"][barrier_key(best)] for row in rows
               if (best := row.get("best_copy_engine")) and barrier_key(best) in row["ms"]]
    if handoff:  # P > 2: the best copy-engine schedule with phase-1 hand-offs / with barriers
        summary["copy_engine_handoff_vs_barriers_geomean"] = geomean(handoff)
    summary["targets"] = TARGETS
    summary["ours_means"] = (
        "graphopt_auto = the variant the cost model picks, what the pass emits (sequential where it "
        "predicts no gain); rs_vs_torch_fused_* = graphopt_auto / torch fused_matmul_reduce_scatter "
        "on the reduce-scatter rows; copy_engine_* / tile_* = the best sub-chunk / SM count of that "
        "runtime regardless of the model; copy_engine_uniform_* = the best of the equal sub-chunk "
        "schedules only (no taper); copy_engine_* replay CUDA graphs of repeated calls (what the pass "
        "emits), copy_engine_eager_* issue every op from Python; all measured in the same run")
    return summary


def to_markdown(results: dict) -> str:
    lines = [f"# GEMM + collective overlap, {results['gpus']} x {results['device']}",
             f"torch {results['torch']}, triton {results['triton']}, bf16, times in ms "
             f"(mean of {results['iters']} calls, best of 3, slowest rank)", "",
             "| kind | shape | GEMM | comm | sequential | ideal | chunked:4 | best copy engine, op by op "
             "| best copy engine, equal sub-chunks | best copy engine | best tile | best tracked | torch fused RS "
             "| auto (choice) | auto/seq | auto/ideal | copy engine err |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
             "| --- | --- |"]
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else "-"  # noqa: E731
    for row in results["rows"]:
        t = row["ms"]
        best = lambda prefix: (f"{fmt(t[row[f'best_{prefix}']])} ({row[f'best_{prefix}']})"  # noqa: E731
                               if row.get(f"best_{prefix}") else "-")
        error = row.get("copy_engine_rel_err")
        lines.append(
            f"| {row['kind']} | {row['shape']} ({row['M']}x{row['N']}x{row['K']}) | {fmt(t.get('gemm'))} "
            f"| {fmt(t.get('comm'))} | {fmt(t.get('sequential'))} | {fmt(t.get('ideal'))} "
            f"| {fmt(t.get('chunked:4'))} | {best('copy_engine_eager')} | {best('copy_engine_uniform')} "
            f"| {best('copy_engine')} "
            f"| {best('tile')} | {best('tracked')} "
            f"| {fmt(t.get('torch_fused_rs'))} | {fmt(t.get('graphopt_auto'))} ({row['cost_model_choice']}) "
            f"| {fmt(t['graphopt_auto'] / t['sequential'])} | {fmt(t['graphopt_auto'] / t['ideal'])} "
            f"| {f'{error:.4f}' if error is not None else '-'} |")
    lines += ["", "Summary: " + json.dumps(results["summary"], indent=1),
              "", f"CUDA graph capture: {results.get('cuda_graph')}",
              "", "Targets: " + json.dumps(TARGETS)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    start = time.time()
    main()
    print(f"bench took {time.time() - start:.0f} s", flush=True)
