"""Attention modules of a Dynamo graph: the attention core and the ``nn.Module`` around it.

A rewrite that treats attention as a unit -- from the q/k/v projections to the output projection --
finds it here (``attention_selection`` does)::

    core     F.scaled_dot_product_attention(q, k, v, ...)            any mask, any options
           | softmax(matmul(q, k^T) ...) feeding matmul(., v)       written out
           | graphopt::sp_attention(q, k, v, ...)                   after shard_attention
    module   the innermost nn.Module on the core's ``nn_module_stack`` whose nodes hold a projection
             (a linear or matmul with a parameter) upstream of the core and one downstream of it,
             and no other core

The module is the set of graph nodes Dynamo traced inside it (its forward and every function it
called), so peft's LoRA adapters on the projections, rotary embeddings applied inside it and GQA key
repeats are part of it; what it reads from outside (the hidden states, a mask, rotary tables,
parameters) are its inputs, what is read outside it its outputs.

The core patterns are the op specs shard_attention matches with (``analysis/attention_sites.py``: ``SDPA``, ``MATMUL``, ``SOFTMAX``): attention is
recognised here as the sequence-parallel pass recognises it, without its conditions for sharding
(a mask, dropout or a non-causal pattern does not stop a module from being found).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from graphopt import _compat
from graphopt.analysis.attention_sites import MATMUL, SDPA, SOFTMAX
from graphopt.analysis.torch_ir import OpSpec

LINEAR = OpSpec("linear", (F.linear,), params=("input", "weight", "bias"), defaults=(("bias", None),))
# Between softmax and the value matmul, or between the score matmul and softmax: casts, dropout,
# scaling and an additive or filled mask.
_SCORE_STEPS = ("float", "to", "type_as", "dropout", "mul", "div", "add", "masked_fill", "__mul__",
                "__truediv__", "__add__")
_MAX_SCORE_STEPS = 8


@dataclasses.dataclass
class AttentionModule:
    """One attention module of a graph, as Dynamo traced it."""

    path: str                 # the module as Dynamo names it, e.g. "L['self'].layers[0].self_attn"
    core: fx.Node             # the attention itself (SDPA, the softmax of a written-out one, sp_attention)
    nodes: list[fx.Node]      # every call node traced inside the module, in graph order
    inputs: list[fx.Node]     # nodes outside the module it reads, in graph order
    outputs: list[fx.Node]    # its nodes read outside it, in graph order
    projections: list[fx.Node]  # linear / matmul nodes with a parameter operand

    @property
    def distributed(self) -> bool:
        return is_sp_attention(self.core)


def is_sp_attention(node: fx.Node) -> bool:
    ops = getattr(torch.ops, "graphopt", None)
    op = getattr(ops, "sp_attention", None) if ops is not None else None
    return op is not None and node.op == "call_function" and node.target in (op, op.default)


def _step_input(node: Any) -> Optional[fx.Node]:
    """The tensor a cast / scale / mask / dropout step of a written-out attention reads."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return None
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if name not in _SCORE_STEPS or not node.args:
        return None
    first = node.args[0]
    return first if isinstance(first, fx.Node) else None


def _reaches(start: Any, spec: OpSpec, forward: bool) -> bool:
    """Whether ``spec`` is within a few score steps of ``start`` (upstream, or downstream)."""
    frontier = [start]
    for _ in range(_MAX_SCORE_STEPS):
        following = []
        for node in frontier:
            if not isinstance(node, fx.Node):
                continue
            if spec.bind(node) is not None:
                return True
            if forward:
                following += [user for user in node.users if _step_input(user) is node
                              or spec.bind(user) is not None]
            else:
                step_input = _step_input(node)
                following += [step_input] if step_input is not None else []
        frontier = following
    return False


def is_attention_core(node: fx.Node) -> bool:
    """SDPA, graphopt::sp_attention, or the softmax of a written-out attention."""
    if node.op not in ("call_function", "call_method"):
        return False
    if SDPA.bind(node) is not None or is_sp_attention(node):
        return True
    soft = SOFTMAX.bind(node)
    return soft is not None and _reaches(soft["input"], MATMUL, forward=False) and \
        _reaches(node, MATMUL, forward=True)


def is_parameter(node: Any) -> bool:
    """A parameter or buffer of the model (Dynamo's lifted static inputs, or a get_attr)."""
    return isinstance(node, fx.Node) and (node.op == "get_attr" or _compat.is_static_graph_input(node))


def _projection(node: fx.Node) -> bool:
    linear = LINEAR.bind(node)
    if linear is not None:
        return is_parameter(_strip_views(linear["weight"]))
    matmul = MATMUL.bind(node)
    return matmul is not None and any(is_parameter(_strip_views(matmul[name]))
                                      for name in ("input", "other"))


def _strip_views(node: Any) -> Any:
    """The tensor under casts and transposes of a weight (``w.t()``, ``w.to(dtype)``)."""
    while isinstance(node, fx.Node) and node.op == "call_method" and \
            node.target in ("t", "to", "transpose", "T", "float", "half", "bfloat16", "contiguous"):
        node = node.args[0]
    return node


def module_paths(node: fx.Node) -> list[str]:
    """The modules ``node`` was traced in, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    return [entry[0] for entry in stack.values()]


def _closure(starts: Iterable[fx.Node], members: set, forward: bool) -> set:
    seen, pending = set(), list(starts)
    while pending:
        node = pending.pop()
        for nxt in (node.users if forward else node.all_input_nodes):
            if nxt in members and nxt not in seen:
                seen.add(nxt)
                pending.append(nxt)
    return seen


def _module_at(gm: fx.GraphModule, path: str, core: fx.Node,
               order: dict[fx.Node, int]) -> Optional[AttentionModule]:
    nodes = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")
             and path in module_paths(n)]
    members = set(nodes)
    if core not in members or any(is_attention_core(n) for n in nodes if n is not core):
        return None
    projections = [n for n in nodes if _projection(n)]
    upstream = _closure([core], members, forward=False)
    downstream = _closure([core], members, forward=True)
    if not any(p in upstream for p in projections) or not any(p in downstream for p in projections):
        return None
    inputs = sorted({a for n in nodes for a in n.all_input_nodes if a not in members},
                    key=order.__getitem__)
    outputs = [n for n in nodes if any(u not in members for u in n.users)]
    return AttentionModule(path, core, nodes, inputs, outputs, projections)


def find_attention_modules(gm: fx.GraphModule) -> tuple[list[AttentionModule], list[str]]:
    """Every attention module of ``gm``'s own graph in graph order, and why cores were left out
    (no enclosing module with projections on both sides; inside a checkpoint region)."""
    order = {node: index for index, node in enumerate(gm.graph.nodes)}
    modules, refusals, taken = [], [], set()
    for node in gm.graph.nodes:
        if not is_attention_core(node) or node in taken:
            continue
        paths = module_paths(node)
        found = next((m for m in (_module_at(gm, path, node, order) for path in reversed(paths))
                      if m is not None), None)
        if found is None:
            refusals.append(f"{node.name}: no module around this attention holds its q/k/v and "
                            f"output projections (module stack: {paths or 'none'}); only whole "
                            "attention modules are found")
            continue
        taken.update(found.nodes)
        modules.append(found)
    for body in _compat.checkpoint_regions(gm):
        cores = [n.name for n in body.graph.nodes if is_attention_core(n)]
        if cores:
            refusals.append(f"{', '.join(cores)}: inside a torch.utils.checkpoint region, whose "
                            "body is a separate graph; call checkpoint around the MLP only, or "
                            "not at all, to have these attention modules found")
    return modules, refusals
