"""What holds the measured peak of a step: the CUDA caching allocator's record of one step, read
back to the moment the most bytes were allocated, with the blocks live then grouped by the line of
code that allocated them.

A plan says which tensors it expects at its peak; when the GPU's peak is higher (issue 23 measured
7 % above the plan on HF Llama at 16K with offload), the question is which allocations the plan did
not count. The allocator records each block's Python stack; the innermost frame in a file of the
step (an Inductor-generated module, an aten op's caller) names the buffer, so the excess reads as
"buf412 = empty_strided_cuda(...) in the backward: 256 MiB".

    from graphopt.debug import peak_holders
    report = peak_holders.record_step(lambda: train_step(batch))   # CUDA only
    print(peak_holders.format_report(report))
"""

from __future__ import annotations

import linecache
import os
from typing import Any, Callable, Iterable, Sequence

import torch

from graphopt import _compat

# Frames inside these folders are not where a buffer is named: the innermost frame outside them is.
_LIBRARY_PARTS = (os.sep + "torch" + os.sep, os.sep + "graphopt" + os.sep + "ops" + os.sep,
                  os.sep + "graphopt" + os.sep + "kernels" + os.sep)


def record_step(step: Callable[[], Any], top: int = 12) -> dict | None:
    """Runs ``step`` once under the allocator's record (Python stacks) and returns
    :func:`holders_at_peak` of it, or None off CUDA."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    _compat.record_cuda_memory_history(True, stacks="python")
    try:
        step()
        torch.cuda.synchronize()
        trace = _compat.cuda_memory_trace()
    finally:
        _compat.record_cuda_memory_history(False)
    return holders_at_peak(trace, top)


def holders_at_peak(trace: Sequence[dict], top: int = 12) -> dict:
    """The allocator events of one step (``alloc`` / ``free_completed``, each with ``addr``,
    ``size`` and ``frames``) replayed: the bytes the step had allocated at its highest point, and
    the blocks live then, grouped by (phase, allocating line), largest first. Blocks allocated
    before the record began are not in it: the bytes are over what was allocated then."""
    def replay(events):
        """(the blocks live after ``events``, the bytes most allocated and after which event)."""
        live: dict[int, dict] = {}
        current = peak = 0
        peak_at = -1
        for position, event in enumerate(events):
            if event.get("action") == "alloc":
                live[event["addr"]] = event
                current += event.get("size", 0)
                if current > peak:
                    peak, peak_at = current, position
            elif event.get("action") == "free_completed" and event.get("addr") in live:
                current -= live.pop(event["addr"]).get("size", 0)
        return live, peak, peak_at

    peak, peak_at = replay(trace)[1:]
    at_peak = replay(trace[:peak_at + 1])[0]   # the same replay, stopped at the peak
    groups: dict[tuple[str, str], list[int]] = {}
    for block in at_peak.values():
        key = (_phase(block.get("frames") or ()), _allocating_line(block.get("frames") or ()))
        entry = groups.setdefault(key, [0, 0])
        entry[0] += block.get("size", 0)
        entry[1] += 1
    ranked = sorted(groups.items(), key=lambda item: -item[1][0])
    holders = [{"phase": phase, "where": where, "bytes": size, "blocks": count}
               for (phase, where), (size, count) in ranked[:top]]
    return {"peak_over_start_bytes": peak,
            "allocations": sum(event.get("action") == "alloc" for event in trace),
            "live_blocks_at_peak": len(at_peak),
            # the phase of the allocation that made the peak
            "phase_at_peak": _phase(trace[peak_at].get("frames") or ()) if peak_at >= 0 else "-",
            "holders": holders, "other_bytes": sum(size for _, (size, _) in ranked[top:])}


def _phase(frames: Iterable[dict]) -> str:
    names = {frame.get("name") for frame in frames}
    return "backward" if "backward" in names else "forward"


def _allocating_line(frames: Sequence[dict]) -> str:
    """``file:line: source`` of the innermost frame outside torch and graphopt's ops and kernels
    (frames are innermost first)."""
    for frame in frames:
        filename = frame.get("filename", "")
        if not filename or filename.startswith("<") or any(part in filename for part in _LIBRARY_PARTS):
            continue
        line = frame.get("line", 0)
        source = linecache.getline(filename, line).strip()
        return f"{os.path.basename(filename)}:{line} {frame.get('name', '?')}: {source[:160]}"
    innermost = frames[0] if frames else {}
    return f"{innermost.get('name', 'unknown')} (no frame outside torch)"


def format_report(report: dict | None, top: int = 8) -> str:
    if not report:
        return "no allocator record (CUDA only)"
    lines = [f"peak {report['peak_over_start_bytes'] / 2**20:.1f} MiB over the step's start, "
             f"{report['live_blocks_at_peak']} blocks live, in the {report['phase_at_peak']}:"]
    for holder in report["holders"][:top]:
        lines.append(f"  {holder['bytes'] / 2**20:9.1f} MiB  {holder['blocks']:4d} blocks  "
                     f"{holder['phase']:8s} {holder['where']}")
    return "\n".join(lines)
