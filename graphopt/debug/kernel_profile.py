"""What kernels a call ran and how long each took on the device, grouped by kind.

Two compiled steps that should cost the same and do not (issue 23: transformers' Llama with offload
ran its forward 15-18 ms slower than the same plan without offload, where graphopt's own Llama ran
0-6 ms slower) differ in some kernels: a copy the plan did not expect, a fusion split by a new op, a
kernel running at another shape. This runs the call once under torch's profiler and sums the device
time of every kernel by name and by kind, so two calls read side by side (``compare``).

    from graphopt.debug import kernel_profile
    with_offload = kernel_profile.profile_call(lambda: compiled(*inputs))
    without = kernel_profile.profile_call(lambda: other(*inputs))
    print(kernel_profile.format_comparison(kernel_profile.compare(with_offload, without)))

Kinds (first pattern that matches the kernel's name, lower case): ``gemm`` (cuBLAS / CUTLASS /
nvjet / Triton mm templates), ``attention`` (flash, cuDNN, FMHA, graphopt's attention kernels),
``copy_d2h`` / ``copy_h2d`` / ``copy_d2d`` (memcpy), ``memset``, ``triton`` (Inductor's fused
kernels, its copies among them), ``copy_kernel`` (torch's own copy and cat kernels: layout changes,
clones, as graphopt's offload ops run them), else ``other``.
Off CUDA the profile holds the CPU ops instead (their self time), which tests the bookkeeping, not
the device.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import torch

__all__ = ["KINDS", "kind_of", "profile_call", "summarize_events", "compare", "format_comparison"]

KINDS: tuple[tuple[str, str], ...] = (
    ("copy_d2h", r"memcpy.*(dtoh|device ?-> ?host)"),
    ("copy_h2d", r"memcpy.*(htod|host ?-> ?device)"),
    ("copy_d2d", r"memcpy.*(dtod|device ?-> ?device)"),
    ("memset", r"memset"),
    ("attention", r"flash|fmha|cudnn|attention|sdpa|_attn_"),
    ("gemm", r"gemm|cutlass|nvjet|cublas|xmma|triton_tem_.*mm|(^|[^a-z])(mm|addmm|bmm)([^a-z]|$)"),
    ("triton", r"^triton_"),
    ("copy_kernel", r"copy|catarray|clone"),
)
_COMPILED = [(kind, re.compile(pattern)) for kind, pattern in KINDS]


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, pattern in _COMPILED:
        if pattern.search(lowered):
            return kind
    return "other"


def profile_call(call: Callable[[], Any], top: int = 25) -> dict:
    """Runs ``call`` once under torch's profiler; :func:`summarize_events` of what ran (device
    kernels on CUDA, CPU ops elsewhere). The device is synchronised before and after."""
    cuda = torch.cuda.is_available()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        call()
        if cuda:
            torch.cuda.synchronize()
    return summarize_events(_events(prof, cuda), top)


def _events(prof, cuda: bool) -> list[tuple[str, float]]:
    """(name, device microseconds) per kernel launch on CUDA; (name, self CPU microseconds) of
    every CPU op elsewhere."""
    out = []
    for event in prof.events():
        if cuda:
            if _is_device_event(event):
                out.append((event.name, float(event.time_range.elapsed_us())))
        elif event.device_type == torch.autograd.DeviceType.CPU:
            out.append((event.name, float(event.self_cpu_time_total)))
    return out


def _is_device_event(event) -> bool:
    device_type = getattr(event, "device_type", None)
    return device_type is not None and device_type != torch.autograd.DeviceType.CPU


def summarize_events(events: list[tuple[str, float]], top: int = 25) -> dict:
    """``{"total_ms", "by_kind": {kind: {"ms", "calls"}}, "kernels": [{"name", "kind", "calls",
    "ms"}, ...]}``: the ``top`` kernels by summed time, largest first (names cut at 120
    characters; the kinds sum every kernel)."""
    by_name: dict[str, list[float]] = {}
    for name, us in events:
        entry = by_name.setdefault(name, [0.0, 0])
        entry[0] += us
        entry[1] += 1
    by_kind: dict[str, dict] = {}
    for name, (us, calls) in by_name.items():
        entry = by_kind.setdefault(kind_of(name), {"ms": 0.0, "calls": 0})
        entry["ms"] += us / 1e3
        entry["calls"] += calls
    kernels = sorted(({"name": name[:120], "kind": kind_of(name), "calls": calls, "ms": us / 1e3}
                      for name, (us, calls) in by_name.items()), key=lambda k: -k["ms"])
    return {"total_ms": sum(us for _, us in events) / 1e3,
            "by_kind": dict(sorted(by_kind.items(), key=lambda item: -item[1]["ms"])),
            "kernels": kernels[:top]}


def compare(profile: dict, baseline: dict) -> dict:
    """Per kind, (ms, calls) of ``profile`` minus ``baseline``, largest time difference first, and
    the kernels of ``profile`` whose names the baseline's top list does not hold."""
    kinds = sorted(set(profile["by_kind"]) | set(baseline["by_kind"]))
    zero = {"ms": 0.0, "calls": 0}
    delta = {kind: {"ms": profile["by_kind"].get(kind, zero)["ms"] - baseline["by_kind"].get(kind, zero)["ms"],
                    "calls": profile["by_kind"].get(kind, zero)["calls"]
                    - baseline["by_kind"].get(kind, zero)["calls"]}
             for kind in kinds}
    known = {k["name"] for k in baseline["kernels"]}
    return {"total_ms": profile["total_ms"] - baseline["total_ms"],
            "by_kind": dict(sorted(delta.items(), key=lambda item: -abs(item[1]["ms"]))),
            "new_kernels": [k for k in profile["kernels"] if k["name"] not in known]}


def format_comparison(difference: dict, limit: int = 6) -> str:
    """One line: the total difference, then each kind's, largest first."""
    parts = [f"{kind} {d['ms']:+.2f} ms ({d['calls']:+d} calls)"
             for kind, d in list(difference["by_kind"].items())[:limit] if d["ms"] or d["calls"]]
    return f"{difference['total_ms']:+.2f} ms of kernel time: " + (", ".join(parts) or "no difference")
