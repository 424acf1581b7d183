"""graphopt's Triton flash attention against torch SDPA (flash backend) on one GPU.

    python3 bench/attention.py --out bench/results          # full table
    python3 bench/attention.py --out /tmp/x --quick         # two cases, for a smoke run

``--jobs N`` first compiles every kernel config the run will tune, in N processes at once (Triton's
disk cache then serves the autotuner), which keeps device time short.

For every case: correctness against SDPA first (forward output; gradients at the smaller sizes),
then the median time of the forward and of forward + backward (triton.testing.do_bench), TFLOP/s
and the ratio SDPA time / ours (above 1 means faster than SDPA). FLOPs: forward 4 * B * Hq * S^2 * D,
halved when causal; forward + backward counts 3.5x the forward (backward = 2.5x, the convention of
the FlashAttention papers; our backward executes 3.5x because dq recomputes P).
Grouped-query cases give SDPA ``enable_gqa=True`` where this torch supports it with the flash
backend, else K/V repeated to Hq heads (recorded per case as ``sdpa_gqa``).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import pathlib
import platform
import sys
import time

import torch
import triton
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from graphopt.kernels import flash_attention_bwd, flash_attention_fwd  # noqa: E402
from graphopt.ops.attention import (  # noqa: E402
    attention_block_backward,
    attention_block_forward,
    flash_attention,
)

TARGET = 1.0
STRETCH = 1.3

# (batch, seqlen, heads_q, heads_kv, head_dim, causal)
FULL_CASES = [
    (batch, seqlen, 32, heads_kv, 128, causal)
    for causal in (True, False)
    for heads_kv in (32, 8)
    for batch, seqlen in ((1, 8192), (1, 16384), (1, 32768), (4, 8192))
] + [
    (batch, seqlen, 32, 32, 64, causal)
    for causal in (True, False)
    for batch, seqlen in ((1, 16384), (4, 8192))
] + [(4, 32768, 32, 8, 128, True)]
QUICK_CASES = [(1, 8192, 32, 32, 128, True), (1, 8192, 32, 8, 128, False)]


def attention_flops(batch, seqlen, heads_q, head_dim, causal):
    return 4 * batch * heads_q * seqlen * seqlen * head_dim * (0.5 if causal else 1.0)


def sdpa_runner(heads_q, heads_kv):
    """SDPA on the flash backend, and how grouped K/V are given to it."""
    group = heads_q // heads_kv
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def native(q, k, v, causal):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return sdpa(q, k, v, is_causal=causal, enable_gqa=group > 1)

    def repeated(q, k, v, causal):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return sdpa(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                        is_causal=causal)

    if group == 1:
        return native, "none"
    probe = [torch.randn(1, h, 256, 64, device="cuda", dtype=torch.bfloat16)
             for h in (heads_q, heads_kv, heads_kv)]
    try:
        native(*probe, True)
        return native, "enable_gqa"
    except RuntimeError:
        return repeated, "repeat_interleave"


def bench(fn, grad_to_none=None):
    return triton.testing.do_bench(fn, warmup=10, rep=60, grad_to_none=grad_to_none,
                                   return_mode="median")


def max_rel_error(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


def run_case(batch, seqlen, heads_q, heads_kv, head_dim, causal):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(batch, heads_q, seqlen, head_dim, device="cuda", dtype=torch.bfloat16,
                    generator=gen).requires_grad_()
    k, v = (torch.randn(batch, heads_kv, seqlen, head_dim, device="cuda", dtype=torch.bfloat16,
                        generator=gen).requires_grad_() for _ in range(2))
    dout = torch.randn_like(q)
    sdpa, gqa_mode = sdpa_runner(heads_q, heads_kv)
    row = dict(batch=batch, seqlen=seqlen, heads_q=heads_q, heads_kv=heads_kv, head_dim=head_dim,
               causal=causal, dtype="bfloat16", sdpa_gqa=gqa_mode)

    with torch.no_grad():
        ours_out = flash_attention(q, k, v, causal=causal)[0]
        ref_out = sdpa(q, k, v, causal)
    row["fwd_max_rel_err_vs_sdpa"] = max_rel_error(ours_out, ref_out)
    if batch * seqlen <= 16384:
        grads = torch.autograd.grad(flash_attention(q, k, v, causal=causal)[0], (q, k, v), dout)
        grads_ref = torch.autograd.grad(sdpa(q, k, v, causal), (q, k, v), dout)
        row["bwd_max_rel_err_vs_sdpa"] = max(max_rel_error(a, b)
                                             for a, b in zip(grads, grads_ref))
    del ours_out, ref_out

    def ours_fwd():
        with torch.no_grad():
            flash_attention(q, k, v, causal=causal)

    def sdpa_fwd():
        with torch.no_grad():
            sdpa(q, k, v, causal)

    def ours_fwd_bwd():
        flash_attention(q, k, v, causal=causal)[0].backward(dout)

    def sdpa_fwd_bwd():
        sdpa(q, k, v, causal).backward(dout)

    flops = attention_flops(batch, seqlen, heads_q, head_dim, causal)
    for name, ours, theirs, work in (("fwd", ours_fwd, sdpa_fwd, flops),
                                     ("fwd_bwd", ours_fwd_bwd, sdpa_fwd_bwd, 3.5 * flops)):
        ours()  # tune + compile outside the timing
        ms_ours = bench(ours, grad_to_none=[q, k, v])
        ms_sdpa = bench(theirs, grad_to_none=[q, k, v])
        row[f"{name}_ms"] = ms_ours
        row[f"{name}_sdpa_ms"] = ms_sdpa
        row[f"{name}_tflops"] = work / ms_ours * 1e-9
        row[f"{name}_sdpa_tflops"] = work / ms_sdpa * 1e-9
        row[f"{name}_vs_sdpa"] = ms_sdpa / ms_ours
    return row


def tuned_configs():
    """The config each autotuner picked, per tuning key, as text."""
    tuners = {"fwd": flash_attention_fwd._flash_fwd_tuned["half"],
              "bwd_dkdv": flash_attention_bwd._dkdv_tuned["half"],
              "bwd_dq": flash_attention_bwd._dq_tuned["half"]}
    return {name: {str(key): str(config) for key, config in tuner.cache.items()}
            for name, tuner in tuners.items()}


def _compile_one_config(item):
    """Runs forward + backward with one fixed config at a small shape of the same specialisation."""
    causal, head_dim, config_index = item
    flash_attention_fwd.AUTOTUNE = False
    flash_attention_fwd.UNTUNED_CONFIG = config_index
    q = torch.randn(1, 4, 256, head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 1, 256, head_dim, device="cuda", dtype=torch.bfloat16)
            for _ in range(2))
    out, lse = attention_block_forward(q, k, v, scale=0.1, causal=causal)
    attention_block_backward(q, k, v, out, lse, torch.randn_like(q), scale=0.1, causal=causal)
    torch.cuda.synchronize()
    return item


def precompile(cases, jobs):
    started = time.time()
    most_configs = max(len(tuner.configs) for tuner in (
        flash_attention_fwd._flash_fwd_tuned["half"], flash_attention_bwd._dkdv_tuned["half"],
        flash_attention_bwd._dq_tuned["half"]))
    items = sorted({(case[5], case[4], index) for case in cases for index in range(most_configs)})
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        pool.map(_compile_one_config, items)
    print(f"compiled {len(items)} (causal, head dim, config) variants with {jobs} processes in "
          f"{time.time() - started:.0f} s", flush=True)


def summarize(rows):
    eligible = [r for r in rows if r["seqlen"] >= 8192 and r["head_dim"] == 128]
    if not eligible:
        return {}
    return {
        "fwd_vs_sdpa_min": min(r["fwd_vs_sdpa"] for r in eligible),
        "fwd_bwd_vs_sdpa_min": min(r["fwd_bwd_vs_sdpa"] for r in eligible),
        "fwd_vs_sdpa_geomean": math.exp(sum(math.log(r["fwd_vs_sdpa"]) for r in eligible)
                                        / len(eligible)),
        "fwd_bwd_vs_sdpa_geomean": math.exp(sum(math.log(r["fwd_bwd_vs_sdpa"]) for r in eligible)
                                            / len(eligible)),
        "over": "cases with S >= 8K and D = 128; ratio = SDPA time / ours",
        "target": TARGET,
        "stretch_target": STRETCH,
        "fwd_meets_target": min(r["fwd_vs_sdpa"] for r in eligible) >= TARGET,
        "fwd_bwd_meets_target": min(r["fwd_bwd_vs_sdpa"] for r in eligible) >= TARGET,
    }


def markdown(result):
    env = result["environment"]
    lines = [
        "# Flash attention: graphopt Triton vs torch SDPA (flash backend)",
        "",
        f"Device: {env['device']}; torch {env['torch']}; triton {env['triton']}; bf16; "
        "median of triton.testing.do_bench. Ratio = SDPA time / ours (> 1: ours faster).",
        "",
        "| B | S | Hq | Hkv | D | causal | fwd ms | SDPA fwd ms | fwd TFLOP/s | fwd ratio | "
        "fwd+bwd ms | SDPA fwd+bwd ms | fwd+bwd TFLOP/s | fwd+bwd ratio | SDPA GQA |",
        "| " + " | ".join(["---"] * 15) + " |",
    ]
    for r in result["cases"]:
        lines.append(
            f"| {r['batch']} | {r['seqlen']} | {r['heads_q']} | {r['heads_kv']} | {r['head_dim']} "
            f"| {r['causal']} | {r['fwd_ms']:.3f} | {r['fwd_sdpa_ms']:.3f} | {r['fwd_tflops']:.0f} "
            f"| {r['fwd_vs_sdpa']:.2f} | {r['fwd_bwd_ms']:.3f} | {r['fwd_bwd_sdpa_ms']:.3f} "
            f"| {r['fwd_bwd_tflops']:.0f} | {r['fwd_bwd_vs_sdpa']:.2f} | {r['sdpa_gqa']} |")
    s = result["summary"]
    if not s:
        return "\n".join(lines) + "\n"
    lines += [
        "",
        f"Summary over {s['over']}: forward min ratio {s['fwd_vs_sdpa_min']:.2f} "
        f"(geomean {s['fwd_vs_sdpa_geomean']:.2f}), forward+backward min ratio "
        f"{s['fwd_bwd_vs_sdpa_min']:.2f} (geomean {s['fwd_bwd_vs_sdpa_geomean']:.2f}); "
        f"target >= {s['target']}x, stretch {s['stretch_target']}x.",
        "",
    ]
    return "\n".join(lines)


def write_results(out_dir, rows, started):
    result = {
        "environment": {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "python": platform.python_version(),
            "seconds": round(time.time() - started, 1),
        },
        "summary": summarize(rows),
        "tuned_configs": tuned_configs(),
        "cases": rows,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "attention.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "attention.md").write_text(markdown(result))
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench/results"))
    parser.add_argument("--quick", action="store_true", help="two cases only")
    parser.add_argument("--jobs", type=int, default=0,
                        help="compile all configs first in this many processes (0: no)")
    parser.add_argument("--compile-only", action="store_true", help="stop after --jobs compiling")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/attention.py needs a CUDA GPU")

    cases = QUICK_CASES if args.quick else FULL_CASES
    if args.jobs:
        precompile(cases, args.jobs)
    if args.compile_only:
        return
    started = time.time()
    rows = []
    for case in cases:
        row = run_case(*case)
        rows.append(row)
        print(f"B={row['batch']} S={row['seqlen']} Hkv={row['heads_kv']} D={row['head_dim']} "
              f"causal={row['causal']}: fwd {row['fwd_ms']:.3f} ms ({row['fwd_vs_sdpa']:.2f}x) "
              f"fwd+bwd {row['fwd_bwd_ms']:.3f} ms ({row['fwd_bwd_vs_sdpa']:.2f}x) "
              f"err {row['fwd_max_rel_err_vs_sdpa']:.1e}/{row.get('bwd_max_rel_err_vs_sdpa', 0):.1e}",
              flush=True)
        torch.cuda.empty_cache()
        result = write_results(args.out, rows, started)  # partial results survive a time-out
    print(markdown(result))


if __name__ == "__main__":
    main()
