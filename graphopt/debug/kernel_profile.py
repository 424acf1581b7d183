"""What kernels a call ran and how long each took on the device, grouped by kind.

Two compiled steps that should cost the same and do not (issue 23: transformers' Llama with offload
ran its forward 15-18 ms slower than the same plan without offload, where graphopt's own Llama ran
0-6 ms slower) differ in some kernels: a copy the plan did not expect, a fusion split by a new op, a
kernel running at another shape. This runs the call once under torch's profiler and sums the device
time of every kernel by name and by kind, so two calls read side by side (``compare``). A step can
also lose time with no kernel longer: the compute stream standing idle while it waits on a copy's
event (an offload wait placed before its copy ends) or on the host; ``stream_timeline`` measures
the busiest stream's idle time and its longest gaps, with the kernels on either side
(``idle_gaps``, which ``bench/profile_offload.py`` also uses, where it names each gap's cause).

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

__all__ = ["KINDS", "kind_of", "profile_call", "summarize_events", "stream_timeline", "idle_gaps",
           "compare", "format_comparison"]

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
    kernels on CUDA, CPU ops elsewhere), on CUDA with ``streams``: :func:`stream_timeline` of the
    kernels. The device is synchronised before and after."""
    cuda = torch.cuda.is_available()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        call()
        if cuda:
            torch.cuda.synchronize()
    if not cuda:
        return summarize_events([(e.name, float(e.self_cpu_time_total)) for e in prof.events()
                                 if e.device_type == torch.autograd.DeviceType.CPU], top)
    kernels = [(e.name, float(e.time_range.start), float(e.time_range.end), e.device_resource_id)
               for e in prof.events() if _is_device_event(e)]
    summary = summarize_events([(name, end - start) for name, start, end, _ in kernels], top)
    summary["streams"] = stream_timeline(kernels)
    return summary


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


def stream_timeline(kernels: list[tuple[str, float, float, Any]], gaps: int = 5) -> dict:
    """Per stream, the time its kernels kept it busy; for the busiest (the compute stream) also
    its span, the time it stood idle inside it (waiting on another stream's event, or on the host
    launching its next kernel) and the ``gaps`` longest idle stretches, each with the kernels on
    either side. ``kernels``: (name, start us, end us, stream)."""
    by_stream: dict[Any, list[tuple[float, float, str, None]]] = {}
    for name, start, end, stream in kernels:
        by_stream.setdefault(stream, []).append((start, end, name, None))
    busy = {}
    for stream, spans in by_stream.items():
        spans.sort()
        total, reach = 0.0, float("-inf")
        for start, end, _, _ in spans:
            total += max(0.0, end - max(start, reach))
            reach = max(reach, end)
        busy[stream] = total
    if not busy:
        return {"busy_ms": {}, "compute": None}
    compute = max(busy, key=busy.get)
    spans = by_stream[compute]
    span_us = max(end for _, end, _, _ in spans) - spans[0][0]
    return {"busy_ms": {str(stream): us / 1e3 for stream, us in busy.items()},
            "compute": {"stream": str(compute), "span_ms": span_us / 1e3,
                        "idle_ms": (span_us - busy[compute]) / 1e3,
                        "gaps": [{"ms": gap["us"] / 1e3, "after": gap["after"][:80],
                                  "before": gap["before"][:80]} for gap in idle_gaps(spans)[:gaps]]}}


def idle_gaps(spans: list[tuple[float, float, str, Any]], min_us: float = 0.0) -> list[dict]:
    """The idle stretches of one stream longer than ``min_us``, longest first, each {"us", "start",
    "end", "after", "before", "next"}: ``spans`` are (start us, end us, name, payload) of its ops,
    sorted by start; "after" names the op that ended last before the gap, "before" the op after
    it, and "next" is that op's payload (bench/profile_offload: the correlation id of its launch)."""
    gaps, end, before = [], None, None
    for start, stop, name, payload in spans:
        if end is not None and start - end > min_us:
            gaps.append({"us": start - end, "start": end, "end": start, "after": before,
                         "before": name, "next": payload})
        if end is None or stop > end:
            end, before = stop, name
    return sorted(gaps, key=lambda gap: -gap["us"])


def compare(profile: dict, baseline: dict) -> dict:
    """Per kind, (ms, calls) of ``profile`` minus ``baseline``, largest time difference first, and
    the kernels of ``profile`` whose names the baseline's top list does not hold."""
    kinds = sorted(set(profile["by_kind"]) | set(baseline["by_kind"]))
    zero = {"ms": 0.0, "calls": 0}
    ours, theirs = profile["by_kind"], baseline["by_kind"]
    delta = {kind: {"ms": ours.get(kind, zero)["ms"] - theirs.get(kind, zero)["ms"],
                    "calls": ours.get(kind, zero)["calls"] - theirs.get(kind, zero)["calls"]}
             for kind in kinds}
    known = {k["name"] for k in baseline["kernels"]}
    idle = [(p.get("streams") or {}).get("compute") for p in (profile, baseline)]
    return {"total_ms": profile["total_ms"] - baseline["total_ms"],
            "compute_idle_ms": idle[0]["idle_ms"] - idle[1]["idle_ms"] if all(idle) else None,
            "by_kind": dict(sorted(delta.items(), key=lambda item: -abs(item[1]["ms"]))),
            "new_kernels": [k for k in profile["kernels"] if k["name"] not in known]}


def format_comparison(difference: dict, limit: int = 6) -> str:
    """One line: the total difference, then each kind's, largest first."""
    parts = [f"{kind} {d['ms']:+.2f} ms ({d['calls']:+d} calls)"
             for kind, d in list(difference["by_kind"].items())[:limit] if d["ms"] or d["calls"]]
    idle = difference.get("compute_idle_ms")
    return (f"{difference['total_ms']:+.2f} ms of kernel time: " + (", ".join(parts) or "no difference")
            + ("" if idle is None else f"; the compute stream idle {idle:+.2f} ms"))
