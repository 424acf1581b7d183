"""The pipeline, in order, in one place.

    dynamo FX graph (torch IR)
      -> pre_grad:  shard_attention, specialize_attention_masks, attention_selection
      -> AOTAutograd joint graph
      -> joint:     overlap_matmul_collectives
      -> partition: plan_rematerialization (memory_budget / offload_activations): plans the saved,
                    recomputed and offloaded values and cuts the graph; with no plan, torch's min-cut
      -> forward / backward: offload_activations
      -> codegen: Inductor or eager

A graph with no backward (inference) runs the joint and forward passes on its single graph.
Passes are loaded when first enabled, so ``import graphopt`` stays light. ``config.PASS_NAMES``
names these passes for ``disabled_passes``.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch.fx as fx

from graphopt.passes.manager import GraphPass, PassContext, PassResult


def _load(path: str) -> Callable[[fx.GraphModule, PassContext], PassResult]:
    module_name, attr = path.split(":")

    def run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return getattr(importlib.import_module(module_name), attr)(gm, ctx)

    run.__qualname__ = path
    return run


SHARD_ATTENTION = GraphPass(
    "shard_attention", _load("graphopt.passes.shard_attention:shard_attention"),
    enabled=lambda c: c.sequence_parallel_attention,
    doc="SDPA / decomposed attention -> graphopt::sp_attention over the sequence-parallel group")
SPECIALIZE_ATTENTION_MASKS = GraphPass(
    "specialize_attention_masks",
    _load("graphopt.passes.specialize_attention_masks:specialize_attention_masks"),
    enabled=lambda c: c.specialize_attention_masks,
    doc="attention with a proven causal / sliding-window / document mask -> is_causal SDPA or "
        "graphopt::flash_attention")
ATTENTION_SELECTION = GraphPass(
    "attention_selection", _load("graphopt.passes.attention_selection:select_attention"),
    enabled=lambda c: c.attention_selection,
    doc="attention module -> gather the selected samples, run it on them, add back to the residual")
OVERLAP_MATMUL_COLLECTIVES = GraphPass(
    "overlap_matmul_collectives",
    _load("graphopt.passes.overlap_matmul_collectives:overlap_matmul_collectives"),
    enabled=lambda c: c.overlap_matmul_collectives,
    doc="mm -> all_reduce / reduce_scatter, all_gather -> mm  ->  overlapped graphopt:: ops")
PLAN_REMATERIALIZATION = GraphPass(
    "plan_rematerialization",
    _load("graphopt.passes.plan_rematerialization:plan_rematerialization"),
    enabled=lambda c: c.memory_budget is not None or c.offload_activations,
    doc="joint graph -> PartitionPlan: forward / backward under the memory budget, joint with offload")
OFFLOAD_ACTIVATIONS = GraphPass(
    "offload_activations", _load("graphopt.passes.offload_activations:offload_activations"),
    enabled=lambda c: c.offload_activations,
    doc="saved activations chosen by the plan -> offload / reload / wait ops")

PIPELINE: dict[str, list[GraphPass]] = {
    "pre_grad": [SHARD_ATTENTION, SPECIALIZE_ATTENTION_MASKS, ATTENTION_SELECTION],
    "joint": [OVERLAP_MATMUL_COLLECTIVES],
    "partition": [PLAN_REMATERIALIZATION],
    "forward": [OFFLOAD_ACTIVATIONS],
    "backward": [OFFLOAD_ACTIVATIONS],
    "inference": [OVERLAP_MATMUL_COLLECTIVES],
}
