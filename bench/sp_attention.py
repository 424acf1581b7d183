"""Sequence-parallel attention on P GPUs: graphopt::sp_attention vs the baselines, forward + backward.

    torchrun --standalone --nproc-per-node=2 bench/sp_attention.py --out DIR

Causal, B=1, H=32, Hkv in {32, 8}, D=128, bf16, S/P tokens per rank. Measured in one run:
  ours        graphopt::sp_attention, load-balanced (DISTFLASHATTN schedule)
  ring        the same runtime with sp_load_balance=False (plain causal ring)
  cp          torch's context_parallel (ring rotation, head-tail load balance) around SDPA
  sdpa_full   single-GPU SDPA over the whole sequence S (every rank runs it on its own GPU)
  flash_full  graphopt's own block kernels over the whole sequence on one GPU (what bounds ours)
  ours_triton ours with graphopt's Triton kernels on every block (attention_kernel='triton');
              ``ours`` runs torch's cuDNN attention on the blocks it computes exactly
efficiency = (sdpa_full / P) / ours: 1.0 is a perfect split of the best single-GPU kernel, the
limit. Times are the median over iterations of the slowest rank.

Then a training step (forward, loss, backward) of the reference Llama at 7B/8B dimensions
(--llama-layers layers, vocab 32000) over --llama-seq tokens: every GPU running the whole sequence
under torch.compile (Inductor) -- what one does without the pass -- against the P GPUs each running
S/P tokens under torch.compile(backend="graphopt") with sequence_parallel_attention.
Writes sp_attention.json / .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F


TARGETS = {"efficiency_min": 0.92, "speedup_vs_context_parallel_min": 1.2,
           "speedup_vs_unbalanced_ring_min": 1.6}
HEADS, HEAD_DIM = 32, 128


def _log(*parts) -> None:
    if dist.get_rank() == 0:
        print(*parts, flush=True)


def time_ms(step, iters: int, warmup: int) -> float:
    """Median ms of ``step`` (all ranks start together), max over ranks."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for i in range(warmup + iters):
        torch.cuda.synchronize()
        dist.barrier()
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    median = torch.tensor([statistics.median(times)], device="cuda")
    dist.all_reduce(median, op=dist.ReduceOp.MAX)
    return median.item()


def full_inputs(seq: int, hkv: int, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shape = lambda h: (1, h, seq, HEAD_DIM)  # noqa: E731
    q = torch.randn(shape(HEADS), device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(shape(hkv), device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(shape(hkv), device="cuda", dtype=torch.bfloat16, generator=gen)
    dout = torch.randn(shape(HEADS), device="cuda", dtype=torch.bfloat16, generator=gen)
    return q, k, v, dout


def local_chunk(x: torch.Tensor) -> torch.Tensor:
    rank, world = dist.get_rank(), dist.get_world_size()
    chunk = x.shape[2] // world
    return x[:, :, rank * chunk:(rank + 1) * chunk].contiguous()


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def check_correctness(seq_local: int, hkv: int) -> dict:
    """ours vs single-GPU attention in float32 on the gathered sequence, next to SDPA bf16's error."""
    from graphopt.ops.sp_attention import sp_attention
    world = dist.get_world_size()
    q, k, v, dout = full_inputs(seq_local * world, hkv, seed=1)
    ref = [x.float().requires_grad_() for x in (q, k, v)]
    out_ref = sdpa(*ref)
    out_ref.backward(dout.float())
    base = [x.clone().requires_grad_() for x in (q, k, v)]
    out_base = sdpa(*base)
    out_base.backward(dout)
    mine = [local_chunk(x).requires_grad_() for x in (q, k, v)]
    out = sp_attention(*mine, causal=True)
    out.backward(local_chunk(dout))
    errors = {}
    for name, ours, baseline, reference in (("out", out, out_base, out_ref),) + tuple(
            (f"d{n}", a.grad, b.grad, r.grad) for n, a, b, r in zip("qkv", mine, base, ref)):
        reference_local = local_chunk(reference)
        errors[name] = {
            "ours": (ours.float() - reference_local).abs().max().item(),
            "sdpa_bf16": (local_chunk(baseline).float() - reference_local).abs().max().item()}
    worst = torch.tensor([max(e["ours"] / max(e["sdpa_bf16"], 1e-3) for e in errors.values())],
                         device="cuda")
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return {"seq_local": seq_local, "hkv": hkv, "errors_rank0": errors,
            "worst_ratio_to_sdpa_bf16_error": worst.item(), "ok": worst.item() <= 4.0}


def bench_config(mesh, seq_local: int, hkv: int, iters: int, warmup: int) -> dict:
    from torch.distributed.tensor.experimental import context_parallel

    from graphopt.ops.attention import flash_attention
    from graphopt.ops.sp_attention import sp_attention
    world = dist.get_world_size()
    q, k, v, dout = full_inputs(seq_local * world, hkv, seed=0)
    row = {"seq_local": seq_local, "seq": seq_local * world, "hkv": hkv}

    def fwd_bwd(fn, inputs, grad):
        def step():
            out = fn(*inputs)
            out.backward(grad)
            for x in inputs:
                x.grad = None
        return step

    full = [x.clone().requires_grad_() for x in (q, k, v)]
    row["sdpa_full_ms"] = time_ms(fwd_bwd(sdpa, full, dout), iters, warmup)
    flash = lambda a, b, c: flash_attention(a, b, c, causal=True)[0]  # noqa: E731
    row["flash_full_ms"] = time_ms(fwd_bwd(flash, full, dout), iters, warmup)
    del full
    mine = [local_chunk(x).requires_grad_() for x in (q, k, v)]
    grad = local_chunk(dout)
    for name, balance in (("ours_ms", True), ("ring_ms", False)):
        fn = lambda a, b, c, lb=balance: sp_attention(a, b, c, causal=True, load_balance=lb)  # noqa: E731
        row[name] = time_ms(fwd_bwd(fn, mine, grad), iters, warmup)
    balanced = lambda a, b, c: sp_attention(a, b, c, causal=True, kernel="triton")  # noqa: E731
    row["ours_triton_ms"] = time_ms(fwd_bwd(balanced, mine, grad), iters, warmup)
    del mine
    torch.cuda.empty_cache()

    buffers = [x.clone() for x in (q, k, v, dout)]
    row["cp_kv"] = "native GQA"
    with context_parallel(mesh, buffers=buffers, buffer_seq_dims=[2, 2, 2, 2]):
        cp_inputs = [x.detach().requires_grad_() for x in buffers[:3]]
        try:
            row["cp_ms"] = time_ms(fwd_bwd(sdpa, cp_inputs, buffers[3]), iters, warmup)
        except Exception as err:  # context_parallel without GQA support: repeat K/V heads
            row["cp_kv"] = f"K/V repeated to {HEADS} heads ({type(err).__name__})"
            repeat = lambda a, b, c: sdpa(a, b.repeat_interleave(HEADS // hkv, 1),  # noqa: E731
                                          c.repeat_interleave(HEADS // hkv, 1))
            row["cp_ms"] = time_ms(fwd_bwd(repeat, cp_inputs, buffers[3]), iters, warmup)
    del buffers, cp_inputs
    torch.cuda.empty_cache()

    row["efficiency"] = row["sdpa_full_ms"] / world / row["ours_ms"]
    row["kernel_ratio_flash_vs_sdpa"] = row["sdpa_full_ms"] / row["flash_full_ms"]
    row["efficiency_vs_own_kernel"] = row["flash_full_ms"] / world / row["ours_ms"]
    row["speedup_vs_cp"] = row["cp_ms"] / row["ours_ms"]
    row["speedup_vs_ring"] = row["ring_ms"] / row["ours_ms"]
    flops = 4 * seq_local * world * seq_local * world * HEAD_DIM * HEADS / 2 * 3.5  # fwd + bwd, causal
    row["ours_tflops_per_gpu"] = flops / world / (row["ours_ms"] * 1e-3) / 1e12
    return row


def bench_llama_step(seq: int, layers: int, iters: int) -> dict:
    """Training step of the reference Llama: whole sequence per GPU (Inductor) vs S/P per GPU
    with the pass (graphopt backend, Inductor codegen)."""
    import graphopt
    from graphopt.distributed.sharding import shard_sequence
    from graphopt.models.llama import Llama, LlamaConfig, llama_loss
    world = dist.get_world_size()
    cfg = LlamaConfig.llama3_8b(n_layers=layers, vocab_size=32000, max_seq_len=seq)
    torch.manual_seed(0)
    model = Llama(cfg).to(device="cuda", dtype=torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(0)
    tokens = torch.randint(cfg.vocab_size, (1, seq + 1), device="cuda", generator=gen)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    row = {"model": f"Llama-3-8B dims, {layers} layers, vocab 32000, bf16", "seq": seq,
           "seq_local": seq // world}

    def step_of(compiled, *args, target, scale):
        def step():
            loss = llama_loss(compiled(*args), target) * scale
            loss.backward()
            model.zero_grad(set_to_none=True)
        return step

    def measure(name, compiled, *args, target, scale):
        torch.cuda.reset_peak_memory_stats()
        started = time.time()
        step_of(compiled, *args, target=target, scale=scale)()  # compile
        row[f"{name}_compile_s"] = time.time() - started
        row[f"{name}_ms"] = time_ms(step_of(compiled, *args, target=target, scale=scale), iters, 1)
        row[f"{name}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30

    torch._dynamo.reset()
    measure("whole_sequence", torch.compile(model), inputs, target=targets, scale=1.0)
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    local_inputs, positions = shard_sequence(inputs, dim=1)
    local_targets, _ = shard_sequence(targets, dim=1)
    compiled = torch.compile(model, backend=graphopt.backend(sequence_parallel_attention=True))
    measure("sequence_parallel", compiled, local_inputs, positions, target=local_targets,
            scale=1.0 / world)
    torch._dynamo.reset()
    row["speedup"] = row["whole_sequence_ms"] / row["sequence_parallel_ms"]
    row["scaling_efficiency"] = row["speedup"] / world
    return row


def summarize(rows: list[dict], world: int) -> dict:
    long = [r for r in rows if r["seq_local"] >= 16384] or rows
    summary = {
        "efficiency_min": min(r["efficiency"] for r in long),
        "speedup_vs_context_parallel_min": min(r["speedup_vs_cp"] for r in rows),
        "speedup_vs_unbalanced_ring_min": min(r["speedup_vs_ring"] for r in rows),
        "targets": TARGETS,
        "world_size": world,
        # Block work of the busiest rank: ring P - 1/2, balanced P/2 (diagonals count 1/2).
        "ideal_speedup_vs_unbalanced_ring": (2 * world - 1) / world,
    }
    summary["note_world_size"] = (
        f"measured on {world} GPUs. The balanced schedule can beat the ring by at most (2P-1)/P "
        "(busiest rank's block work): 1.50x at P=2, 1.67x at P=3, 1.75x at P=4, so the 1.6x target "
        "needs P >= 3.")
    summary["meets"] = {key: summary[key] >= target for key, target in TARGETS.items()}
    kernel = [r["kernel_ratio_flash_vs_sdpa"] for r in long]
    own = [r["efficiency_vs_own_kernel"] for r in long]
    summary["kernel_ratio_flash_vs_sdpa_range"] = [min(kernel), max(kernel)]
    summary["efficiency_vs_own_kernel_range"] = [min(own), max(own)]
    triton = [r["ours_triton_ms"] / r["ours_ms"] for r in long if "ours_triton_ms" in r]
    if triton:
        summary["speedup_from_cudnn_blocks_range"] = [min(triton), max(triton)]
    world_rows = [dict(hkv=r["hkv"], seq_local=r["seq_local"], speedup=r["speedup_vs_cp"],
                       cp_over_limit=r["cp_ms"] * world / r["sdpa_full_ms"],
                       ours_over_limit=r["ours_ms"] * world / r["sdpa_full_ms"]) for r in rows]
    summary["context_parallel_over_limit_range"] = [min(r["cp_over_limit"] for r in world_rows),
                                                    max(r["cp_over_limit"] for r in world_rows)]
    summary["context_parallel_worst_row"] = min(world_rows, key=lambda r: r["speedup"])
    summary["why"] = _why(summary)
    return summary


def _why(summary: dict) -> list[str]:
    """For each missed target, the cause the measured columns point to."""
    kernel_lo, kernel_hi = summary["kernel_ratio_flash_vs_sdpa_range"]
    own_lo, own_hi = summary["efficiency_vs_own_kernel_range"]
    why = []
    if not summary["meets"]["efficiency_min"]:
        why.append(
            f"efficiency: graphopt's block kernels (torch's cuDNN attention where it applies, else "
            f"Triton) run forward + backward over the full sequence at {kernel_lo:.2f}-"
            f"{kernel_hi:.2f}x the speed of SDPA on one GPU (flash full vs sdpa full); against that "
            f"kernel the distributed schedule reaches {own_lo:.2f}-{own_hi:.2f} (S/P >= 16K). The "
            "product of the two is the efficiency.")
    if not summary["meets"]["speedup_vs_context_parallel_min"]:
        worst = summary["context_parallel_worst_row"]
        why.append(
            "vs context_parallel: torch's ring runs SDPA's own kernels per block (cuDNN on Hopper, "
            "the same ones graphopt calls) with head-tail load balancing, which gives every rank the "
            "same causal work at any P; the two schedules then differ only by exchange and merge "
            f"overheads. Where the gain is smallest (Hkv={worst['hkv']}, S/P={worst['seq_local']}) "
            f"context_parallel runs at {worst['cp_over_limit']:.3f}x the perfect-scaling limit "
            "(single-GPU SDPA over S, / P), so 1.2x over it would need "
            f"{worst['cp_over_limit'] / 1.2:.2f}x that limit; ours runs at "
            f"{worst['ours_over_limit']:.3f}x. The gain is largest at short S/P, where "
            "context_parallel's per-step overheads are not yet amortised.")
    if not summary["meets"]["speedup_vs_unbalanced_ring_min"]:
        why.append(
            f"vs the unbalanced ring: at P={summary['world_size']} the best possible gain is "
            f"{summary['ideal_speedup_vs_unbalanced_ring']:.2f}x (busiest rank's block work); "
            f"measured {summary['speedup_vs_unbalanced_ring_min']:.2f}x at the shortest S/P, closer to "
            "the bound as S/P grows.")
    return why


def markdown(result: dict) -> str:
    lines = [f"# sp_attention on {result['world_size']} x {result['device']}",
             f"torch {result['torch']}, triton {result['triton']}; causal, B=1, H={HEADS}, D={HEAD_DIM}, "
             "bf16, forward + backward, ms (median, slowest rank)", "",
             "| Hkv | S/P | S | sdpa full | sdpa/P (limit) | flash full | ours | ours, Triton only | "
             "ring | context_parallel | efficiency | vs CP | vs ring | TFLOP/s/GPU |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    world = result["world_size"]
    for r in result["rows"]:
        triton = f"{r['ours_triton_ms']:.2f}" if "ours_triton_ms" in r else "-"
        lines.append(
            f"| {r['hkv']} | {r['seq_local']} | {r['seq']} | {r['sdpa_full_ms']:.2f} | "
            f"{r['sdpa_full_ms'] / world:.2f} | {r['flash_full_ms']:.2f} | {r['ours_ms']:.2f} | "
            f"{triton} | {r['ring_ms']:.2f} | {r['cp_ms']:.2f} | {r['efficiency']:.3f} | "
            f"{r['speedup_vs_cp']:.2f}x | {r['speedup_vs_ring']:.2f}x | {r['ours_tflops_per_gpu']:.0f} |")
    llama = result.get("llama_step")
    if llama:
        lines += ["", f"Training step, {llama['model']}, S={llama['seq']} (forward + loss + backward, "
                  "ms, slowest rank; peak GiB of rank 0):", "",
                  "| variant | tokens per GPU | step ms | peak GiB | compile s |",
                  "| --- | --- | --- | --- | --- |",
                  f"| whole sequence per GPU, torch.compile (Inductor) | {llama['seq']} | "
                  f"{llama['whole_sequence_ms']:.1f} | {llama['whole_sequence_peak_gib']:.1f} | "
                  f"{llama['whole_sequence_compile_s']:.0f} |",
                  f"| graphopt, sequence_parallel_attention, P={world} | {llama['seq_local']} | "
                  f"{llama['sequence_parallel_ms']:.1f} | {llama['sequence_parallel_peak_gib']:.1f} | "
                  f"{llama['sequence_parallel_compile_s']:.0f} |", "",
                  f"Speedup {llama['speedup']:.2f}x on {world} GPUs (scaling efficiency "
                  f"{llama['scaling_efficiency']:.2f})."]
    s = result["summary"]
    lines += ["", "| summary | measured | target | met |", "| --- | --- | --- | --- |"]
    for key, target in TARGETS.items():
        lines.append(f"| {key} | {s[key]:.3f} | {target} | {s['meets'][key]} |")
    lines += ["", f"Correctness (S/P={result['correctness']['seq_local']}, Hkv="
              f"{result['correctness']['hkv']}): worst error / SDPA-bf16 error = "
              f"{result['correctness']['worst_ratio_to_sdpa_bf16_error']:.2f} "
              f"(ok: {result['correctness']['ok']})", "", "Notes: " + s["note_world_size"]]
    lines += ["", "Why targets are missed:"] + [f"- {why}" for why in s["why"]] if s["why"] else []
    return "\n".join(lines) + "\n"


def render(json_path: str, out_dir: str) -> None:
    """Recompute the summary and tables of a measured JSON (no GPU needed)."""
    with open(json_path) as handle:
        result = json.load(handle)
    result["summary"] = summarize(result["rows"], result["world_size"])
    _write(out_dir, result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--render", metavar="JSON",
                        help="only re-summarise an existing result file into --out")
    parser.add_argument("--seq-local", default="8192,16384,32768,65536")
    parser.add_argument("--hkv", default="32,8")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--llama-seq", type=int, default=32768,
                        help="sequence length of the Llama training step (0 skips it)")
    parser.add_argument("--llama-layers", type=int, default=2)
    args = parser.parse_args()
    if args.render:
        render(args.render, args.out)
        return
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    world = dist.get_world_size()
    import triton
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "world_size": world, "rows": []}
    started = time.time()
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import _attention as cp_attention
    mesh = init_device_mesh("cuda", (world,))
    cp_attention.set_rotate_method("alltoall")  # context_parallel as a ring (rotating K/V shards)
    result["correctness"] = check_correctness(2048, 8)
    _log("correctness", json.dumps(result["correctness"]))
    for hkv in (int(h) for h in args.hkv.split(",")):
        for seq_local in (int(s) for s in args.seq_local.split(",")):
            iters = args.iters if seq_local < 65536 else max(2, args.iters // 2)
            row = bench_config(mesh, seq_local, hkv, iters, args.warmup if seq_local < 65536 else 1)
            result["rows"].append(row)
            _log(json.dumps(row))
            result["summary"] = summarize(result["rows"], world)
            if dist.get_rank() == 0:
                _write(args.out, result)
    if args.llama_seq:
        result["llama_step"] = bench_llama_step(args.llama_seq, args.llama_layers, args.iters)
        _log(json.dumps(result["llama_step"]))
    result["elapsed_s"] = time.time() - started
    if dist.get_rank() == 0:
        _write(args.out, result)
        print(markdown(result), flush=True)
    dist.destroy_process_group()


def _write(out_dir: str, result: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "sp_attention.json"), "w") as handle:
        json.dump(result, handle, indent=2)
    with open(os.path.join(out_dir, "sp_attention.md"), "w") as handle:
        handle.write(markdown(result))


if __name__ == "__main__":
    main()
