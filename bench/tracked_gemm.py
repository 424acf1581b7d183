"""Tracked GEMM on ONE GPU: a staged probe, then cuBLASLt-with-counters vs torch.mm.

    python bench/tracked_gemm.py --out DIR        (about 2 minutes on one H100)

Stages, each run and reported even when an earlier one failed (``stages`` in the JSON):
  versions     torch / CUDA / triton / cuda-bindings / nvmath-python / cuBLASLt / driver, and any
               cuBLAS 12 library on the machine (atomic-sync counters exist only in cuBLAS 12.2-12.9)
  bindings     nvmath's cuBLASLt bindings import; the CUDA driver's stream memory operations bind
  heuristic    per shape, chunk count (4, 8, 16), chunk axis (rows / cols) and counter kind (out /
               in): the refusal (status name and code) or the algorithm cuBLASLt picked (id, tile,
               stages, split-K, ATOMIC_SYNC capability, how many algorithms the heuristic returned);
               and, without counters, whether any of the top algorithms claims ATOMIC_SYNC
  plain        cuBLASLt through the bindings, no counters, vs torch.mm (bitwise / max rel. error)
  correctness  the tracked GEMM vs torch.mm, both layouts (x @ W.t(), dY @ W)
  counters     every counter reads 0 after the GEMM
  stress       a consumer on a second stream, launched first, copies chunk i once counter i is 0;
               the output starts as NaN: any early read shows; random shapes, many iterations
  speed        per bench shape (bench/matmul_allreduce.py's P = 2 shapes: Llama-70B o_proj /
               down_proj, the GPU.md probes): torch.mm, plain cuBLASLt, tracked GEMM at 4 / 8 / 16
               chunks, ms per call (CUDA events, mean of --iters after warm-up, best of 3)
  latency      GEMM end (a stamp kernel behind it on its stream) -> the consumer sees the last
               chunk (globaltimer), median over iterations

Writes DIR/tracked_gemm.json (``summary.tracked_vs_cublas_min``: min over shapes of torch.mm time /
best tracked time; target >= 0.97) and DIR/tracked_gemm.md.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.matmul_allreduce import rel_err, shapes, timed as seconds_per_call  # noqa: E402
from graphopt.distributed import cuda_driver, tracked_gemm  # noqa: E402

TARGETS = {"tracked_vs_cublas_min": ">= 0.97 (torch.mm time / tracked GEMM time, worst shape)"}
CHUNK_CHOICES = (4, 8, 16)


def bench_shapes() -> list[tuple[str, int, int, int]]:
    return shapes(2)


def timed(fn, iters: int) -> float:
    """Milliseconds per call (mean of ``iters``, best of 3, after warm-up)."""
    return seconds_per_call(fn, iters) * 1e3


def operands(m, n, k, seed=0, dtype=torch.bfloat16):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    a = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen) / k ** 0.5
    weight = torch.randn(n, k, device="cuda", dtype=dtype, generator=gen)
    return a, weight


def stage_versions() -> dict:
    report = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
              "device": torch.cuda.get_device_name(), "cuda_bindings": cuda_driver.bindings_version()}
    for name in ("triton", "nvmath", "cuda.core", "cuda.pathfinder"):
        try:
            module = __import__(name, fromlist=["__version__"])
            report[name] = getattr(module, "__version__", "present")
        except Exception as err:   # a missing or broken package is a finding, not a failure
            report[name] = f"unavailable: {err!r}"[:300]
    report["cublaslt"] = tracked_gemm.cublaslt_version()
    try:
        from cuda.bindings import driver
        report["driver"] = driver.cuDriverGetVersion()[1]
    except Exception as err:
        report["driver"] = f"unavailable: {err!r}"[:200]
    roots = [os.path.dirname(torch.__file__) + "/..", "/usr/local", "/usr/lib", "/opt"]
    report["cublas12_libraries"] = sorted({path for root in roots for path in glob.glob(
        f"{root}/**/libcublasLt.so.12*", recursive=True)})[:10]
    report["workspace_bytes"] = tracked_gemm.workspace_bytes()
    return report


def stage_bindings() -> dict:
    return {"cublaslt_bindings_error": tracked_gemm.bindings_error(),
            "stream_memops": cuda_driver.stream_memops_available()}


def stage_heuristic(shapes) -> dict:
    report = {}
    for name, m, n, k in shapes[:3] + shapes[-2:]:
        a, b, out = (tracked_gemm.contiguous(m, k), tracked_gemm.Matrix((k, n), (1, k), 256),
                     tracked_gemm.contiguous(m, n))
        row = report[f"{name} ({m}x{n}x{k})"] = {}
        plain = tracked_gemm._plan(0, torch.bfloat16, a, b, out, 1, "rows", None, False, 0)
        row["plain"] = plain if isinstance(plain, str) else plain.info
        for chunks in CHUNK_CHOICES:
            for axis in ("rows", "cols"):
                for kind in ("out", "in"):
                    found = tracked_gemm._plan(0, torch.bfloat16, a, b, out, chunks, axis, kind, False, 0)
                    row[f"{kind}:{axis}:{chunks}"] = found if isinstance(found, str) else found.info
    return report


def stage_plain() -> dict:
    report = {}
    for dtype in (torch.bfloat16, torch.float16):
        a, weight = operands(4096, 4096, 4096, dtype=dtype)
        for layout, b in (("x@W.t()", weight.t()), ("dY@W", weight.t().contiguous())):
            out = torch.empty(4096, 4096, device="cuda", dtype=dtype)
            tracked_gemm.matmul(a, b, out, None, 1, kind=None)
            reference = torch.mm(a, b)
            report[f"{dtype}:{layout}"] = {"bitwise": bool(torch.equal(out, reference)),
                                           "rel_err": rel_err(out, reference)}
    return report


def stage_correctness_and_counters() -> tuple[dict, dict]:
    correctness, counters_report = {}, {}
    for layout in ("x@W.t()", "dY@W"):
        a, weight = operands(4096, 4096, 2048)
        b = weight.t() if layout == "x@W.t()" else weight.t().contiguous()
        for chunks in CHUNK_CHOICES:
            out = torch.full((4096, 4096), float("nan"), device="cuda", dtype=torch.bfloat16)
            counters = torch.full((chunks,), 1, device="cuda", dtype=torch.int32)
            try:
                tracked_gemm.matmul(a, b, out, counters, chunks)
            except RuntimeError as err:
                correctness[f"{layout}:{chunks}"] = counters_report[f"{layout}:{chunks}"] = str(err)
                continue
            torch.cuda.synchronize()
            reference = torch.mm(a, b)
            correctness[f"{layout}:{chunks}"] = {"bitwise": bool(torch.equal(out, reference)),
                                                 "rel_err": rel_err(out, reference)}
            counters_report[f"{layout}:{chunks}"] = {"final": counters.tolist(),
                                                     "all_ready": bool((counters == 0).all())}
    return correctness, counters_report


def stage_stress(iterations: int) -> dict:
    from graphopt.kernels import counter_chunks
    gen = torch.Generator().manual_seed(11)
    side = torch.cuda.Stream()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    report = {"iterations": 0, "refused": 0, "mismatches": [], "refusal": None}
    for iteration in range(iterations):
        chunks = CHUNK_CHOICES[int(torch.randint(len(CHUNK_CHOICES), (1,), generator=gen))]
        m = chunks * 128 * int(torch.randint(1, 9, (1,), generator=gen))
        n = 256 * int(torch.randint(1, 17, (1,), generator=gen))
        k = 256 * int(torch.randint(1, 17, (1,), generator=gen))
        a, weight = operands(m, n, k, seed=iteration)
        reason = tracked_gemm.refusal(0, torch.bfloat16, tracked_gemm.Matrix.of(a),
                                      tracked_gemm.Matrix.of(weight.t()), tracked_gemm.contiguous(m, n),
                                      chunks)
        if reason is not None:
            report["refused"] += 1
            report["refusal"] = reason
            continue
        out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
        snapshot = torch.zeros_like(out)
        counters = torch.ones(chunks, device="cuda", dtype=torch.int32)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            counter_chunks.copy_ready_chunks(counters, out, snapshot, chunks, ctas=4)
        tracked_gemm.matmul(a, weight.t(), out, counters, chunks, sm_count=sms - 4)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        report["iterations"] += 1
        if not torch.equal(snapshot, out):
            bad = (snapshot != out) & ~(snapshot.isnan() & out.isnan())
            report["mismatches"].append({"m": m, "n": n, "k": k, "chunks": chunks,
                                         "rows": sorted({int(r) for r in bad.nonzero()[:, 0][:64]})})
    return report


def stage_speed(shapes, iters: int) -> list[dict]:
    rows = []
    for name, m, n, k in shapes:
        a, weight = operands(m, n, k)
        b = weight.t()
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        row = {"shape": name, "M": m, "N": n, "K": k, "ms": {}, "refusals": {}}
        row["ms"]["torch_mm"] = timed(lambda: torch.mm(a, b, out=out), iters)
        try:
            row["ms"]["cublaslt_plain"] = timed(lambda: tracked_gemm.matmul(a, b, out, None, 1, kind=None),
                                                iters)
        except Exception as err:
            row["refusals"]["cublaslt_plain"] = repr(err)[-300:]
        for chunks in CHUNK_CHOICES:
            counters = torch.ones(chunks, device="cuda", dtype=torch.int32)

            def tracked():
                counters.fill_(1)
                tracked_gemm.matmul(a, b, out, counters, chunks)
            try:
                row["ms"][f"tracked:{chunks}"] = timed(tracked, iters)
            except Exception as err:
                row["refusals"][f"tracked:{chunks}"] = str(err)[-300:]
        found = {key: value for key, value in row["ms"].items() if key.startswith("tracked:")}
        if found:
            row["best_tracked"] = min(found, key=found.get)
            row["tracked_vs_cublas"] = row["ms"]["torch_mm"] / found[row["best_tracked"]]
        if "cublaslt_plain" in row["ms"]:
            row["cublaslt_vs_cublas"] = row["ms"]["torch_mm"] / row["ms"]["cublaslt_plain"]
        print(name, {key: round(value, 4) for key, value in row["ms"].items()},
              row.get("tracked_vs_cublas"), flush=True)
        rows.append(row)
        del a, weight, out
        torch.cuda.empty_cache()
    return rows


def stage_latency(iterations: int) -> dict:
    from graphopt.kernels import counter_chunks
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    side = torch.cuda.Stream()
    report = {}
    for m, n, k, chunks in ((8192, 8192, 4096, 8), (4096, 8192, 14336, 16)):
        a, weight = operands(m, n, k)
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        snapshot = torch.empty_like(out)
        counters = torch.ones(chunks, device="cuda", dtype=torch.int32)
        seen = torch.zeros(chunks, device="cuda", dtype=torch.int64)
        ends = torch.zeros(1, device="cuda", dtype=torch.int64)
        samples = []
        for _ in range(iterations):
            counters.fill_(1)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                counter_chunks.copy_ready_chunks(counters, out, snapshot, chunks, ctas=4, stamps=seen)
            tracked_gemm.matmul(a, weight.t(), out, counters, chunks, sm_count=sms - 4)
            counter_chunks.stamp(ends, 0)
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            samples.append({"last_chunk_after_gemm_end_us": (seen[-1] - ends[0]).item() / 1e3,
                            "first_chunk_before_gemm_end_us": (ends[0] - seen[0]).item() / 1e3})
        report[f"{m}x{n}x{k}:{chunks}"] = {key: statistics.median(s[key] for s in samples)
                                           for key in samples[0]}
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--stress-iterations", type=int, default=200)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    shapes = bench_shapes()
    results = {"targets": TARGETS, "iters": args.iters, "stages": {}, "rows": []}

    def run(name, fn, *fn_args):
        start = time.time()
        try:
            value = fn(*fn_args)
            results["stages"][name] = {"ok": True, "seconds": round(time.time() - start, 1)}
            return value
        except Exception:
            results["stages"][name] = {"ok": False, "error": traceback.format_exc()[-1500:]}
            return None
        finally:
            print(f"stage {name}: {results['stages'][name]}", flush=True)
            save(results, args.out)

    results["versions"] = run("versions", stage_versions)
    print("versions:", results["versions"], flush=True)
    results["bindings"] = run("bindings", stage_bindings)
    print("bindings:", results["bindings"], flush=True)
    results["heuristic"] = run("heuristic", stage_heuristic, shapes)
    print("heuristic:", json.dumps(results["heuristic"], indent=1)[:4000], flush=True)
    results["plain"] = run("plain", stage_plain)
    print("plain cuBLASLt vs torch.mm:", results["plain"], flush=True)
    found = run("correctness", stage_correctness_and_counters)
    results["correctness"], results["counters"] = found if found else (None, None)
    print("correctness:", results["correctness"], "\ncounters:", results["counters"], flush=True)
    results["stress"] = run("stress", stage_stress, args.stress_iterations)
    print("stress:", results["stress"], flush=True)
    results["rows"] = run("speed", stage_speed, shapes, args.iters) or []
    results["latency"] = run("latency", stage_latency, 20)
    print("latency:", results["latency"], flush=True)
    results["summary"] = summarize(results)
    save(results, args.out)
    markdown = to_markdown(results)
    with open(os.path.join(args.out, "tracked_gemm.md"), "w") as handle:
        handle.write(markdown)
    print(markdown, flush=True)


def summarize(results: dict) -> dict:
    rows = results.get("rows") or []
    tracked = [row["tracked_vs_cublas"] for row in rows if "tracked_vs_cublas" in row]
    plain = [row["cublaslt_vs_cublas"] for row in rows if "cublaslt_vs_cublas" in row]
    refusals = sorted({reason for row in rows for reason in row["refusals"].values()})
    stress = results.get("stress") or {}
    return {
        "tracked_vs_cublas_min": min(tracked) if tracked else None,
        "tracked_vs_cublas_geomean": (statistics.geometric_mean(tracked) if tracked else None),
        "cublaslt_plain_vs_cublas_min": min(plain) if plain else None,
        "tracked_refusals": refusals[:5],
        "stress_iterations": stress.get("iterations"),
        "stress_mismatches": len(stress.get("mismatches", [])) if stress else None,
        "targets": TARGETS,
        "ours_means": "tracked_vs_cublas = torch.mm ms / best tracked-GEMM ms (4, 8 or 16 chunks), "
                      "same run; None where cuBLASLt refused the counters (tracked_refusals says why)",
    }


def save(results: dict, out: str) -> None:
    with open(os.path.join(out, "tracked_gemm.json"), "w") as handle:
        json.dump(results, handle, indent=1, default=str)


def to_markdown(results: dict) -> str:
    versions = results.get("versions") or {}
    lines = [f"# Tracked GEMM (cuBLASLt atomic-sync counters) vs torch.mm, 1 x {versions.get('device')}",
             f"torch {versions.get('torch')} (CUDA {versions.get('cuda')}), cuBLASLt "
             f"{versions.get('cublaslt')}, cuda-bindings {versions.get('cuda_bindings')}, nvmath "
             f"{versions.get('nvmath')}, bf16, ms per call (mean of {results['iters']}, best of 3)", "",
             "| shape | torch.mm | cuBLASLt plain | tracked:4 | tracked:8 | tracked:16 | tracked / cuBLAS |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else "-"  # noqa: E731
    for row in results.get("rows") or []:
        t = row["ms"]
        lines.append(f"| {row['shape']} ({row['M']}x{row['N']}x{row['K']}) | {fmt(t.get('torch_mm'))} "
                     f"| {fmt(t.get('cublaslt_plain'))} | {fmt(t.get('tracked:4'))} | "
                     f"{fmt(t.get('tracked:8'))} | {fmt(t.get('tracked:16'))} | "
                     f"{fmt(row.get('tracked_vs_cublas'))} |")
    lines += ["", "Stages: " + json.dumps(results["stages"]), "",
              "Summary: " + json.dumps(results.get("summary"), indent=1)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
