"""Inductor's kernels of a planned graph, run in the order the remat planner simulated.

The planner (``passes/plan_rematerialization``) scores a plan by simulating the memory of the
forward and backward in their FX order, with Inductor's inlining and sibling fusion modelled
(``analysis/liveness.inline_pointwise``). After fusing, Inductor sorts its kernels depth first,
each kernel at its first member and every kernel it depends on pulled in front of it::

    FX order            mlp_norm_wgrad  mlp_wgrad_mm x3  attention_bwd  attn_norm_wgrad
    Inductor (fused)    [mlp_norm_wgrad + attn_norm_wgrad]  <- placed at its first member,
                        so attention_bwd is pulled in front of the three mlp_wgrad_mm,
                        whose [tokens, ffn] inputs stay live through the attention backward
    this pass           mlp_wgrad_mm x3  attention_bwd  [mlp_norm_wgrad + attn_norm_wgrad]

The layer's two RMSNorm weight gradients read the same residual stream, so Inductor fuses them
into one kernel. In the lowest-peak plan of the 4-layer 7B-dimension Llama at 16K tokens, three
[tokens, 11008] buffers stayed live through an attention backward this way: measured 6.70 GiB
against 6.08 planned; 5.95 in the planned order (bench/results/remat.md, 1 x H100). At 32K and
half the saved set, 1.016 of the planned peak before, 0.996 after (remat_32k.md). In plans that
recompute little it moved nothing (8K and 32K tokens at 100 % and 70 % of the saved set).

The pass lists the kernels again: at each step, of the kernels whose inputs are all computed, the
one whose first member comes first in the graph. A fused kernel so runs as soon as its inputs are
ready, and no kernel runs before one that precedes it in the graph unless it is ready and that
one is not -- which is the order the planner's simulation assumes.

Safe: the result is a topological order of the same dependencies Inductor's own sort uses (every
``unmet_dependency``, weak and mutation-ordering ones included, on a buffer that a listed kernel
writes). It only reorders kernels; their code and what they compute are unchanged. A kernel list
it cannot order (a node without ``min_order``, or a cycle) is returned unchanged and logged.
Inductor's ``reorder_for_peak_memory`` would run after it and keep whichever order its own peak
estimate (not the planner's) prefers, so the backend turns it off where this pass is installed.
"""

from __future__ import annotations

import heapq
import logging
from typing import Any, Callable, Sequence

from graphopt import _compat, config

log = logging.getLogger("graphopt.backend")


def graph_order(nodes: Sequence[Any]) -> list[Any] | None:
    """``nodes`` (Inductor scheduler nodes, topologically sorted) listed ready-first by their
    first member's place in the graph (``min_order``), ties in their current order; None when
    they cannot be (a node without ``min_order``, or dependencies that form a cycle)."""
    if not all(isinstance(getattr(node, "min_order", None), int) for node in nodes):
        return None
    writer = {name: node for node in nodes for name in node.get_buffer_names()}
    position = {id(node): i for i, node in enumerate(nodes)}
    waiting_on = {}
    readers: dict[int, list[Any]] = {id(node): [] for node in nodes}
    for node in nodes:
        producers = {id(writer[dep.name]): writer[dep.name] for dep in node.unmet_dependencies
                     if dep.name in writer and writer[dep.name] is not node}
        waiting_on[id(node)] = len(producers)
        for producer in producers.values():
            readers[id(producer)].append(node)
    ready = [(node.min_order, position[id(node)], node) for node in nodes if not waiting_on[id(node)]]
    heapq.heapify(ready)
    order = []
    while ready:
        node = heapq.heappop(ready)[2]
        order.append(node)
        for reader in readers[id(node)]:
            waiting_on[id(reader)] -= 1
            if not waiting_on[id(reader)]:
                heapq.heappush(ready, (reader.min_order, position[id(reader)], reader))
    return order if len(order) == len(nodes) else None


class PlannedOrder(_compat.SchedulerPassBase):
    """Inductor's post-fusion scheduler pass for the graphs graphopt's planner partitioned:
    :func:`graph_order`, with what it moved handed to ``record`` (kernels listed, kernels whose
    place changed, the fused kernels that span others)."""

    def __init__(self, label: str, record: Callable[[dict], None] | None = None):
        self.label = label
        self.record = record

    def __call__(self, nodes: list[Any]) -> list[Any]:
        order = graph_order(nodes)
        if order is None:
            log.info("[%s] planned order: Inductor's %d kernels kept in its own order (a kernel without "
                     "min_order, or a dependency cycle)", self.label, len(nodes))
            return nodes
        moved = sum(a is not b for a, b in zip(nodes, order))
        spanning = sum(getattr(node, "max_order", node.min_order) - node.min_order > 1 for node in order)
        if moved:
            log.info("[%s] planned order: %d of %d kernels moved back to the graph's order "
                     "(%d fused kernels span others)", self.label, moved, len(nodes), spanning)
        if self.record is not None:
            self.record({"kernels": len(nodes), "moved": moved, "spanning_kernels": spanning})
        return order

    def uuid(self) -> str:
        """Inductor's cache key for the pass: graphopt's source (this module's included)."""
        return config.source_digest()

    def __reduce__(self):
        # Inductor pickles its config for its cache key: equal passes pickle equal.
        return (str, (f"PlannedOrder:{self.uuid()}",))
