"""Seconds of a schedule as its code runs it: one kernel per op (eager FX code), or Inductor's
fused kernels.

The planners price a plan by the time its forward and backward take on the compute stream. Op by
op (eager codegen) that is the sum of the ops' own times (``measure.op_timing``: measured, or the
roofline). Inductor instead computes a pointwise chain inside the kernel that reads it
(``liveness.inline_pointwise``) and writes each kernel's loads and stores itself, so a step of the
simulated schedule costs::

    a value computed inside its readers' kernels (Step.inlined)        0
    a view, a getitem, a graph input                                   0
    an op Inductor calls out to (GEMM, attention, collectives,
      graphopt:: ops; every op under eager codegen)                    its own time (Step.seconds)
    a kernel Inductor writes (pointwise, reduction, scatter, copy)     launch + (bytes of the values
                                                                       it reads + bytes it writes)
                                                                       / memory bandwidth

The memory bandwidth is the one the device reached on the graph's own memory-bound ops, measured
at compile time (``op_timing``), else the device profile's. Why it matters: on one H100 (HF Llama
at 8B layer dimensions, 2 layers, 16K tokens; issue 23) Inductor's forward took 36 ms where the sum
of the unfused op times was 61 ms, and offload copies sized to the latter window did not hide.
"""

from __future__ import annotations

from typing import Iterable

from graphopt.analysis import liveness, op_facts
from graphopt.analysis.liveness import Step

# Where no memory-bound op of the graph was measured (op_timing="model", CPU tests): this share of
# the profile's bandwidth, an assumption; on a GPU under op_timing="auto" the measured one is used.
PROFILE_BANDWIDTH_SHARE = 0.9
# The error this model is held to against a measured compiled forward (issue 23: within 10 %).
# Offload copies under Inductor are planned with that much more slack on the host link
# (``copy_slack``): a forward that runs this much faster than modelled still hides them.
FUSED_MODEL_ERROR = 0.10


def copy_slack(link_slack: float, fuse_pointwise: bool) -> float:
    """The host-link slack offload copies are planned with: the user's
    (``config.offload_link_slack``), plus ``FUSED_MODEL_ERROR`` where the times are Inductor's
    modelled kernels rather than measured ops (eager codegen)."""
    return link_slack + (FUSED_MODEL_ERROR if fuse_pointwise else 0.0)


def step_seconds(steps: Iterable[Step], bytes_per_s: float, launch_s: float,
                 preloaded: dict[str, int] | None = None) -> list[float]:
    """Seconds of each step on the compute stream (see the module docstring). ``preloaded``:
    bytes of the values that exist before the first step (graph inputs), read where a kernel
    reads them."""
    steps = list(steps)
    value_bytes = dict(preloaded or {})
    computed_inside: set[str] = set()  # values (and their views) no kernel stores: never read
    for step in steps:
        value_bytes[step.key] = step.value_bytes
        for index, nbytes in enumerate(step.outputs):
            value_bytes[f"{step.key}#{index}"] = nbytes
        if step.inlined or (step.storage != step.key and step.storage in computed_inside):
            computed_inside.add(step.key)
    result = []
    for step in steps:
        if step.inlined:
            result.append(0.0)
        elif step.seconds is not None:
            result.append(step.seconds)
        else:  # an inlined input's own reads are among the step's inputs (inline_pointwise)
            reads = sum(value_bytes.get(name, 0) for name in dict.fromkeys(step.inputs)
                        if name not in computed_inside)
            writes = step.nbytes + sum(step.outputs)
            result.append(launch_s + (reads + writes) / bytes_per_s)
    return result


def graph_seconds(gm, node_seconds: dict[str, float], bytes_per_s: float, launch_s: float,
                  fuse_pointwise: bool) -> dict[str, float]:
    """Seconds per call_function node of one graph as its code runs it: each op's own time
    (``node_seconds``) op by op, or with ``fuse_pointwise`` (Inductor) the kernel time of the
    steps Inductor writes (``step_seconds``), 0 for what it computes inside other kernels."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    if not fuse_pointwise:
        return {n.name: node_seconds.get(n.name, 0.0) for n in nodes}
    whole = {n.name: None if op_facts.inductor_writes_kernel(n) else node_seconds.get(n.name, 0.0)
             for n in nodes}
    steps, pinned, preloaded = liveness.graph_schedule(gm, whole)
    steps = liveness.inline_pointwise(steps, pinned)
    return dict(zip((s.key for s in steps), step_seconds(steps, bytes_per_s, launch_s, preloaded)))
