"""The work of selected attention: what one sample costs an attention module, how a step's selection
is planned over data-parallel ranks, and how a warm-up's importance becomes per-module capacities.

Work of a module, per sample, forward + backward (the cost model's conventions)::

    projection GEMM (x W^T):  forward F, backward F (dX) + F (dW, when W is trained)
    attention (q k^T, p v):   forward F, backward 5/2 F
    seconds = FLOPs / matmul_rate(profile, dtype)

A step's plan (``plan_step``), for M modules of capacity C_m samples per rank, R ranks of B samples,
and a priority per (module, sample) of the global batch (the selection strategy's)::

    planned[m]   = the R * C_m samples of highest priority           (ties: lower position first)
    work[i]      = sum over m with i in planned[m] of seconds_m       (the sample's selected work)
    ranks        = multi_knapsack.partition_hierarchical(work, ...)  (B samples each)
    chosen[r][m] = the C_m samples of rank r of highest priority      (the compiled capacity)

A rank runs exactly C_m samples of module m (the static shapes); ``moved`` counts the planned
(module, sample) cells a rank had no room for, which the capacity replaced by the rank's next best.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from graphopt.analysis import multi_knapsack

ATTENTION_BACKWARD_FACTOR = 2.5  # as the cost model prices an attention backward


@dataclasses.dataclass(frozen=True)
class Gemm:
    """One matrix product of an attention module, for one sample."""

    flops: float          # forward FLOPs for one sample
    attention: bool       # q k^T / p v (or an attention kernel), else a projection by a weight
    trained: bool = True  # a projection whose weight gets a gradient (a dW product in the backward)

    def forward_backward(self) -> float:
        if self.attention:
            return self.flops * (1.0 + ATTENTION_BACKWARD_FACTOR)
        return self.flops * (2.0 + (1.0 if self.trained else 0.0))


def module_flops(gemms: Sequence[Gemm]) -> float:
    """Forward + backward FLOPs of one sample through a module."""
    return math.fsum(g.forward_backward() for g in gemms)


def capacity(fraction: float, batch: int) -> int:
    """Samples a module runs on: round(fraction x batch), at least one when the fraction is > 0."""
    kept = int(math.floor(fraction * batch + 0.5))
    return min(batch, max(1 if fraction > 0 else 0, kept))


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """One step's selection over the ranks of a data-parallel group."""

    rank_samples: tuple[tuple[int, ...], ...]           # global batch positions per rank, ascending
    chosen: tuple[tuple[tuple[int, ...], ...], ...]     # [rank][module]: local indices that run
    work_before: tuple[float, ...]                      # per rank, contiguous assignment
    work_after: tuple[float, ...]                       # per rank, the knapsack's assignment
    moved: int                                          # planned cells the capacities moved
    planned_cells: int
    optimal: bool                                       # the assignment's maximum proven optimal

    @staticmethod
    def _imbalance(work: Sequence[float]) -> float:
        mean = math.fsum(work) / len(work) if work else 0.0
        return max(work) / mean if mean > 0 else 1.0

    @property
    def imbalance_before(self) -> float:
        return self._imbalance(self.work_before)

    @property
    def imbalance_after(self) -> float:
        return self._imbalance(self.work_after)


def _top(priority: Sequence[float], positions: Sequence[int], count: int) -> list[int]:
    ranked = sorted(positions, key=lambda i: (-priority[i], i))
    return sorted(ranked[:count])


def plan_step(priority: Sequence[Sequence[float]], capacities: Sequence[int], batch: int,
              ranks: int, gpus_per_node: int, seconds_per_sample: Sequence[float],
              node_limit: int = 20_000) -> StepPlan:
    """Plan one step: which samples each rank takes and which of them each module runs.

    ``priority[m][i]``: module m's priority for sample i of the global batch (ranks x batch
    samples); ``capacities[m]``: samples per rank module m runs (0..batch)."""
    samples = ranks * batch
    if len(priority) != len(capacities) or len(capacities) != len(seconds_per_sample):
        raise ValueError("priority, capacities and seconds_per_sample need one entry per module")
    if any(len(row) != samples for row in priority):
        raise ValueError(f"every module needs a priority for each of the {samples} samples of the "
                         f"global batch ({ranks} ranks x {batch})")
    if ranks % gpus_per_node:
        raise ValueError(f"{ranks} ranks are not whole nodes of {gpus_per_node} GPUs")
    everyone = list(range(samples))
    planned = [set(_top(row, everyone, ranks * cap)) for row, cap in zip(priority, capacities)]
    work = [math.fsum(seconds for cells, seconds in zip(planned, seconds_per_sample) if i in cells)
            for i in everyone]
    before = multi_knapsack.contiguous(work, ranks, batch)
    after = multi_knapsack.partition_hierarchical(work, ranks // gpus_per_node, gpus_per_node, batch,
                                                  node_limit)
    chosen, moved = [], 0
    for members in after.bins:
        local = []
        for row, cap, cells in zip(priority, capacities, planned):
            picked = _top(row, members, cap)
            local.append(tuple(members.index(i) for i in picked))
            moved += len([i for i in members if i in cells]) - len([i for i in picked if i in cells])
        chosen.append(tuple(local))
    return StepPlan(after.bins, tuple(chosen), before.loads, after.loads, moved,
                    sum(len(cells) for cells in planned), after.optimal)


def layer_fractions(importance: Sequence[float], kept_fraction: float, batch: int) -> tuple[float, ...]:
    """Per-module kept fractions from a warm-up's importance: capacities proportional to the
    importance, none above the batch, summing to round(kept_fraction x modules x batch).

    Water-filling: c_m = min(batch, lambda x importance_m) with lambda chosen so the capacities sum
    to the budget, then rounded by largest remainder. No importance at all keeps the fraction
    everywhere."""
    modules = len(importance)
    if modules == 0:
        return ()
    if any(not math.isfinite(x) or x < 0 for x in importance):
        raise ValueError("importance must be finite and >= 0")
    budget = min(modules * batch, int(math.floor(kept_fraction * modules * batch + 0.5)))
    if math.fsum(importance) <= 0:
        return tuple(capacity(kept_fraction, batch) / batch for _ in importance)
    low, high = 0.0, batch / min(x for x in importance if x > 0) * 2
    for _ in range(200):
        scale = (low + high) / 2
        if math.fsum(min(batch, scale * x) for x in importance) < budget:
            low = scale
        else:
            high = scale
    exact = [min(batch, high * x) for x in importance]
    caps = [int(math.floor(c)) for c in exact]
    remainders = sorted(range(modules), key=lambda m: (-(exact[m] - caps[m]), m))
    for m in remainders[:max(0, budget - sum(caps))]:
        caps[m] = min(batch, caps[m] + 1)
    return tuple(c / batch for c in caps)
