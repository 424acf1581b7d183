"""Items of different weights into bins of equal capacity and equal count: the assignment of samples
to data-parallel ranks (a multiple-knapsack problem whose bins are the ranks).

Every bin takes exactly ``per_bin`` items (a rank's batch has a fixed size) and the objective is the
heaviest bin (the rank every other rank waits for): the smallest capacity C such that the items fit
in the bins at C each. ``partition`` solves it

- exactly, by branch and bound, while the search stays under ``node_limit`` nodes (small
  instances: heaviest item first, each into a bin whose load and count differ from the bins tried
  before it, pruned at the best maximum found and stopped at the lower bound
  max(heaviest item, total / bins));
- else from the longest-processing-time assignment with a count limit, improved by exchanging
  pairs of items between the heaviest bin and another one while that lowers the maximum.

``partition_hierarchical`` decouples the assignment as a cluster is built: the items are split
over the nodes first (bins of ``gpus_per_node x per_gpu``), then each node's share over its GPUs.
Every choice is a function of the weights and their order alone (ties go to the lower index), so
every rank that solves the same instance gets the same assignment.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class Partition:
    """Item indices per bin (ascending), the bins' loads, and whether the maximum is proven optimal."""

    bins: tuple[tuple[int, ...], ...]
    loads: tuple[float, ...]
    optimal: bool

    @property
    def max_load(self) -> float:
        return max(self.loads) if self.loads else 0.0

    def imbalance(self) -> float:
        """Heaviest bin over the mean bin (1.0: perfectly balanced)."""
        mean = sum(self.loads) / len(self.loads) if self.loads else 0.0
        return self.max_load / mean if mean > 0 else 1.0


def _check(weights: Sequence[float], bins: int, per_bin: int) -> None:
    if bins < 1 or per_bin < 1:
        raise ValueError(f"bins ({bins}) and items per bin ({per_bin}) must be at least 1")
    if len(weights) != bins * per_bin:
        raise ValueError(f"{len(weights)} items do not fill {bins} bins of {per_bin} items each "
                         f"({bins * per_bin} items)")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError("item weights must be finite and >= 0")


def _finish(weights: Sequence[float], assignment: list[list[int]], optimal: bool) -> Partition:
    bins = tuple(tuple(sorted(items)) for items in assignment)
    loads = tuple(math.fsum(weights[i] for i in items) for items in bins)
    return Partition(bins, loads, optimal)


def contiguous(weights: Sequence[float], bins: int, per_bin: int) -> Partition:
    """Bin b takes items [b * per_bin, (b + 1) * per_bin): what a sampler that ignores the weights
    hands each rank."""
    _check(weights, bins, per_bin)
    return _finish(weights, [list(range(b * per_bin, (b + 1) * per_bin)) for b in range(bins)],
                   optimal=False)


def _greedy(weights: Sequence[float], order: list[int], bins: int, per_bin: int) -> list[list[int]]:
    assignment: list[list[int]] = [[] for _ in range(bins)]
    loads = [0.0] * bins
    for item in order:
        open_bins = [b for b in range(bins) if len(assignment[b]) < per_bin]
        target = min(open_bins, key=lambda b: (loads[b], b))
        assignment[target].append(item)
        loads[target] += weights[item]
    return assignment


def _improve_by_exchange(weights: Sequence[float], assignment: list[list[int]],
                         max_rounds: int = 10_000) -> list[list[int]]:
    """Swap an item of the heaviest bin with a lighter item of another bin while that lowers the
    heaviest of the two below the current maximum; the best such swap first."""
    loads = [math.fsum(weights[i] for i in items) for items in assignment]
    for _ in range(max_rounds):
        heavy = max(range(len(loads)), key=lambda b: (loads[b], -b))
        best = None  # (new max of the pair, bin, position in heavy, position in other)
        for other in range(len(loads)):
            if other == heavy:
                continue
            for i, a in enumerate(assignment[heavy]):
                for j, b in enumerate(assignment[other]):
                    moved = weights[a] - weights[b]
                    if moved <= 0:
                        continue
                    pair_max = max(loads[heavy] - moved, loads[other] + moved)
                    if pair_max < loads[heavy] - 1e-12 * max(1.0, loads[heavy]) and (
                            best is None or pair_max < best[0]):
                        best = (pair_max, other, i, j)
        if best is None:
            break
        _, other, i, j = best
        a, b = assignment[heavy][i], assignment[other][j]
        assignment[heavy][i], assignment[other][j] = b, a
        loads[heavy] += weights[b] - weights[a]
        loads[other] += weights[a] - weights[b]
    return assignment


def _branch_and_bound(weights: Sequence[float], order: list[int], bins: int, per_bin: int,
                      incumbent: list[list[int]], node_limit: int) -> tuple[list[list[int]], bool]:
    best = [list(items) for items in incumbent]
    best_max = max(math.fsum(weights[i] for i in items) for items in best)
    lower = max(max(weights), math.fsum(weights) / bins)
    tolerance = 1e-12 * max(1.0, best_max)
    if best_max <= lower + tolerance:
        return best, True
    assignment: list[list[int]] = [[] for _ in range(bins)]
    loads = [0.0] * bins
    nodes = 0
    exhausted = False

    def search(position: int) -> bool:  # True: stop (lower bound reached or out of nodes)
        nonlocal best, best_max, nodes, exhausted
        nodes += 1
        if nodes > node_limit:
            exhausted = True
            return True
        if position == len(order):
            current = max(loads)
            if current < best_max - tolerance:
                best, best_max = [list(items) for items in assignment], current
            return best_max <= lower + tolerance
        item = order[position]
        tried = set()
        for b in range(bins):
            state = (loads[b], len(assignment[b]))
            if len(assignment[b]) >= per_bin or state in tried:
                continue
            tried.add(state)
            if loads[b] + weights[item] >= best_max - tolerance:
                continue
            assignment[b].append(item)
            loads[b] += weights[item]
            stop = search(position + 1)
            loads[b] -= weights[item]
            assignment[b].pop()
            if stop:
                return True
        return False

    search(0)
    return best, not exhausted


def partition(weights: Sequence[float], bins: int, per_bin: int,
              node_limit: int = 200_000) -> Partition:
    """``per_bin`` items in each of ``bins`` bins, the heaviest bin as light as found (proven
    optimal when ``Partition.optimal``)."""
    _check(weights, bins, per_bin)
    weights = [float(w) for w in weights]
    order = sorted(range(len(weights)), key=lambda i: (-weights[i], i))
    assignment = _improve_by_exchange(weights, _greedy(weights, order, bins, per_bin))
    optimal = bins == 1
    if bins > 1:
        assignment, optimal = _branch_and_bound(weights, order, bins, per_bin, assignment, node_limit)
    return _finish(weights, assignment, optimal)


def partition_hierarchical(weights: Sequence[float], nodes: int, gpus_per_node: int, per_gpu: int,
                           node_limit: int = 200_000) -> Partition:
    """Items over nodes, then each node's items over its GPUs: bin ``n * gpus_per_node + g`` is GPU
    g of node n. Optimal only where both levels are (and the decoupling gives up nothing)."""
    _check(weights, nodes * gpus_per_node, per_gpu)
    by_node = partition(weights, nodes, gpus_per_node * per_gpu, node_limit)
    assignment: list[tuple[int, ...]] = []
    optimal = by_node.optimal
    for items in by_node.bins:
        local = partition([weights[i] for i in items], gpus_per_node, per_gpu, node_limit)
        optimal = optimal and local.optimal and nodes == 1
        assignment += [tuple(items[k] for k in gpu) for gpu in local.bins]
    return _finish(weights, [list(items) for items in assignment], optimal)
