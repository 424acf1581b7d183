"""``python -m graphopt calibrate``: measure this machine and write a device profile.

Measures bf16 and fp32 GEMM throughput (briefly, and sustained at the power limit), causal
attention forward + backward throughput, device-memory bandwidth (a large copy: read + write),
peer-to-peer and all-reduce bandwidth between the first two GPUs when there are two or more, and
pinned host <-> device bandwidth. Each figure is the median of several timed repetitions after a
warm-up. The JSON it writes (``--out``) is what ``graphopt.config.device_profile`` points at; a
table is printed last. Without a GPU it measures the CPU (so CPU tests plan with this machine's
relative costs) and keeps the default link figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from typing import Callable

import torch

from graphopt.analysis.device_profile import CPU, DeviceProfile, current_profile


def _median_time(fn: Callable[[], None], repeats: int, sync: Callable[[], None]) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cuda_time(fn: Callable[[], None], repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def measure_gemm_tflops(device: str, dtype: torch.dtype, size: int, repeats: int) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    if device == "cuda":
        seconds = _cuda_time(lambda: torch.mm(a, b), repeats)
    else:
        seconds = _median_time(lambda: torch.mm(a, b), repeats, lambda: None)
    return 2 * size**3 / seconds / 1e12


def measure_sustained_gemm_tflops(size: int, warm_s: float, repeats: int) -> float:
    """bf16 GEMM throughput after ``warm_s`` seconds of GEMMs back to back: the clock a training
    step's GEMMs run at once the GPU sits at its power limit (bench/results/gemm_power.md: an H100
    drops from ~1975 to ~1400 MHz within the first second)."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    start = time.perf_counter()
    while time.perf_counter() - start < warm_s:
        for _ in range(20):
            torch.mm(a, b)
        torch.cuda.synchronize()
    return 2 * size**3 / _cuda_time(lambda: torch.mm(a, b), repeats) / 1e12


def measure_attention_tflops(seq: int, repeats: int) -> float:
    """Causal SDPA forward + backward (torch's default kernel: cuDNN on Hopper), bf16, B=1, H=32,
    D=128, FLOPs counted as graphopt's cost model counts them (backward 2.5x the forward)."""
    import torch.nn.functional as F

    q, k, v = (torch.randn(1, 32, seq, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    grad = torch.randn(1, 32, seq, 128, device="cuda", dtype=torch.bfloat16)

    def step() -> None:
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)

    forward_flops = 4 * 32 * seq * seq * 128 / 2
    return 3.5 * forward_flops / _cuda_time(step, repeats) / 1e12


def measure_copy_gbps(device: str, nbytes: int, repeats: int) -> float:
    """Device-memory bandwidth: bytes read + written by a large copy."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).fill_(1)
    dst = torch.empty_like(src)
    if device == "cuda":
        seconds = _cuda_time(lambda: dst.copy_(src), repeats)
    else:
        seconds = _median_time(lambda: dst.copy_(src), repeats, lambda: None)
    return 2 * src.numel() * src.element_size() / seconds / 1e9


def measure_host_link_gbps(nbytes: int, repeats: int) -> float:
    """Pinned host -> device and device -> host; the slower direction."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    h2d = _cuda_time(lambda: device.copy_(host, non_blocking=True), repeats)
    d2h = _cuda_time(lambda: host.copy_(device, non_blocking=True), repeats)
    return nbytes / max(h2d, d2h) / 1e9


def measure_p2p_gbps(nbytes: int, repeats: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda:1")
    seconds = _cuda_time(lambda: dst.copy_(src, non_blocking=True), repeats)
    return nbytes / seconds / 1e9


def measure_allreduce_bus_gbps(nbytes: int, repeats: int) -> float:
    """NCCL all-reduce over every visible GPU from this one process (torch.cuda.nccl)."""
    import torch.cuda.nccl as nccl
    count = torch.cuda.device_count()
    tensors = [torch.ones(nbytes // 2, dtype=torch.bfloat16, device=f"cuda:{i}") for i in range(count)]

    def run() -> None:
        nccl.all_reduce(tensors)

    run()
    for i in range(count):
        torch.cuda.synchronize(i)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        for i in range(count):
            torch.cuda.synchronize(i)
        times.append(time.perf_counter() - start)
    # bus bandwidth of a ring all-reduce: 2 (n-1)/n of the buffer crosses each link
    return 2 * (count - 1) / count * nbytes / statistics.median(times) / 1e9


def calibrate(quick: bool = False) -> tuple[DeviceProfile, dict[str, float]]:
    """Measure this machine; returns the profile and the raw figures."""
    repeats = 3 if quick else 10
    if not torch.cuda.is_available():
        size = 256 if quick else 1024
        figures = {
            "matmul_tflops": measure_gemm_tflops("cpu", torch.bfloat16, size, repeats),
            "matmul_tflops_fp32": measure_gemm_tflops("cpu", torch.float32, size, repeats),
            "hbm_gbps": measure_copy_gbps("cpu", (8 if quick else 256) * 2**20, repeats),
        }
        return dataclasses.replace(CPU, name="cpu (measured)", **figures), figures
    size = 4096 if quick else 8192
    torch.backends.cuda.matmul.allow_tf32 = False
    figures = {
        "matmul_tflops": measure_gemm_tflops("cuda", torch.bfloat16, size, repeats),
        "matmul_tflops_fp32": measure_gemm_tflops("cuda", torch.float32, size, repeats),
        "hbm_gbps": measure_copy_gbps("cuda", (256 if quick else 2048) * 2**20, repeats),
        "host_link_gbps": measure_host_link_gbps((64 if quick else 512) * 2**20, repeats),
        "attention_tflops": measure_attention_tflops(4096 if quick else 8192, repeats),
        "sustained_matmul_tflops": measure_sustained_gemm_tflops(size, 0.3 if quick else 1.5, repeats),
    }
    if torch.cuda.device_count() >= 2:
        figures["p2p_gbps"] = measure_p2p_gbps((64 if quick else 512) * 2**20, repeats)
        figures["allreduce_bus_gbps"] = measure_allreduce_bus_gbps((32 if quick else 256) * 2**20, repeats)
    default = current_profile(None)
    return dataclasses.replace(default, name=torch.cuda.get_device_name(), **figures), figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m graphopt calibrate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="device_profile.json", help="where to write the profile JSON")
    parser.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
    args = parser.parse_args(argv)
    profile, figures = calibrate(args.quick)
    with open(args.out, "w") as handle:
        json.dump(profile.to_json(), handle, indent=1)
    print(f"device profile of {profile.name} written to {args.out} "
          f"(set GRAPHOPT_DEVICE_PROFILE={args.out} to plan with it)")
    print(f"{'figure':<22}{'measured':>12}  {'in profile':>12}")
    for key, value in profile.to_json().items():
        if isinstance(value, float):
            measured = f"{figures[key]:.4g}" if key in figures else "default"
            print(f"{key:<22}{measured:>12}  {value:>12.4g}")
    return 0
