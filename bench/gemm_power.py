"""A GEMM-bound GEMM's clock, power and time on GPU 0, alone and with peer-to-peer pulls beside it.

    python bench/gemm_power.py --out DIR          # needs 2 GPUs with peer access

Why: the GEMM + collective benchmark's ideal is max(t_gemm, t_comm) with t_gemm timed back to back
alone. On the K = 14336 rows the GEMM draws close to the card's power limit, so its time depends on
the clock the power controller allows, and that changes with whatever else the GPU does. This
measures it: three phases of ``--seconds`` each (GEMM alone, GEMM with copy-engine pulls of 3 x 128 MiB
from GPU 1 per GEMM on a side stream, GEMM alone again), GEMMs issued back to back as the bench does,
each timed with CUDA events; ``nvidia-smi`` samples GPU 0's SM clock and power every 50 ms.

Writes DIR/gemm_power.json and .md (device, versions, per phase: median GEMM ms, mean / min SM
clock, mean power, power limit).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

import torch


def _sampler() -> subprocess.Popen:
    return subprocess.Popen(["nvidia-smi", "-i", "0", "--query-gpu=clocks.sm,power.draw",
                             "--format=csv,noheader,nounits", "-lms", "50"],
                            stdout=subprocess.PIPE, text=True)


def phase(name: str, seconds: float, with_pulls: bool, m: int, n: int, k: int) -> dict:
    a = torch.randn(m, k, device="cuda:0", dtype=torch.bfloat16)
    b = torch.randn(n, k, device="cuda:0", dtype=torch.bfloat16).t()   # a linear weight, [K, N]
    c = torch.empty(m, n, device="cuda:0", dtype=torch.bfloat16)
    src = torch.randn(64 * 2 ** 20, device="cuda:1", dtype=torch.bfloat16)
    dst = torch.empty(64 * 2 ** 20, device="cuda:0", dtype=torch.bfloat16)
    side = torch.cuda.Stream("cuda:0")
    for _ in range(5):
        torch.mm(a, b, out=c)
    torch.cuda.synchronize("cuda:0")
    sampler = _sampler()
    start, times = time.time(), []
    while time.time() - start < seconds:
        events = []
        for _ in range(20):
            if with_pulls:
                with torch.cuda.stream(side):
                    for _ in range(3):
                        dst.copy_(src, non_blocking=True)
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            torch.mm(a, b, out=c)
            end.record()
            events.append((begin, end))
        torch.cuda.synchronize("cuda:0")
        times += [begin.elapsed_time(end) for begin, end in events]
    sampler.terminate()
    lines = sampler.communicate()[0].strip().splitlines()
    samples = [tuple(map(float, line.split(","))) for line in lines if "," in line][2:]
    clocks, power = [s[0] for s in samples], [s[1] for s in samples]
    times.sort()
    return {"phase": name, "gemm_ms_median": times[len(times) // 2], "gemms": len(times),
            "sm_clock_mhz_mean": sum(clocks) / len(clocks), "sm_clock_mhz_min": min(clocks),
            "power_w_mean": sum(power) / len(power), "samples": len(samples)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--shape", default="4096,8192,14336", help="M,N,K (default: 70B down_proj "
                        "at TP = 2, M = 4096)")
    args = parser.parse_args()
    if torch.cuda.device_count() < 2:
        raise SystemExit("needs 2 GPUs: the pulls come from GPU 1")
    m, n, k = map(int, args.shape.split(","))
    torch.cuda.set_device(0)
    limit = subprocess.run(["nvidia-smi", "-i", "0", "--query-gpu=power.limit,clocks.max.sm",
                            "--format=csv,noheader,nounits"], capture_output=True, text=True).stdout
    phases = [phase("gemm alone", args.seconds, False, m, n, k),
              phase("gemm + peer pulls", args.seconds, True, m, n, k),
              phase("gemm alone again", args.seconds, False, m, n, k)]
    power_limit, max_clock = (float(v) for v in limit.strip().split(","))
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "shape": [m, n, k], "power_limit_w": power_limit, "max_sm_clock_mhz": max_clock,
               "phases": phases}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gemm_power.json"), "w") as handle:
        json.dump(results, handle, indent=1)
    lines = [f"# GEMM clock and power, {results['device']} (power limit {power_limit:.0f} W, max SM "
             f"clock {max_clock:.0f} MHz)", f"torch {results['torch']}, bf16 {m}x{n}x{k}, GEMMs back "
             "to back", "", "| phase | GEMM ms (median) | SM clock MHz (mean / min) | power W (mean) |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {p['phase']} | {p['gemm_ms_median']:.3f} | {p['sm_clock_mhz_mean']:.0f} / "
              f"{p['sm_clock_mhz_min']:.0f} | {p['power_w_mean']:.0f} |" for p in phases]
    with open(os.path.join(args.out, "gemm_power.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
