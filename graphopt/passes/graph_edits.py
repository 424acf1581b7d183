"""Small graph edits the attention passes share: insert a call with its fake value, replace an
attention's output, erase what only the attention read."""

from __future__ import annotations

import operator
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from graphopt.analysis.attention_masks import Documents
from graphopt.analysis.torch_ir import fake_value

COPIED_META = ("nn_module_stack", "source_fn_stack", "stack_trace")


def meta_keys(like: fx.Node) -> tuple[str, ...]:
    """Dynamo graphs carry fake values as ``example_value`` too; set both there."""
    return ("val", "example_value") if "example_value" in like.meta else ("val",)


def set_fake(node: fx.Node, value, keys: tuple[str, ...]) -> fx.Node:
    for key in keys:
        node.meta[key] = value
    return node


def fake_mode_of(*nodes: Any):
    for node in nodes:
        value = fake_value(node)
        if value is not None and getattr(value, "fake_mode", None) is not None:
            return value.fake_mode
    raise ValueError("none of the nodes carries a fake tensor")


def insert_call(graph: fx.Graph, target: Callable, args: tuple, kwargs: Optional[dict],
                fake: Callable[[], Any], keys: tuple[str, ...], like: fx.Node,
                method: bool = False) -> fx.Node:
    """A call_function (or call_method) node inserted at the graph's insertion point, with the
    fake value ``fake()`` computes and the source metadata of ``like``."""
    kwargs = kwargs or {}
    node = (graph.call_method(target, args, kwargs) if method
            else graph.call_function(target, args, kwargs))
    set_fake(node, fake(), keys)
    for key in COPIED_META:
        if key in like.meta:
            node.meta[key] = like.meta[key]
    return node


def fake_args(args):
    """``args`` with nodes replaced by their fake values."""
    return tuple(fake_value(a) if isinstance(a, fx.Node) else a for a in args)


def output_of(graph: fx.Graph, call: fx.Node, wanted: Optional[torch.Tensor], keys, like: fx.Node,
              index: Optional[int] = 0) -> fx.Node:
    """``call[index]`` (or ``call`` itself with index None), cast to ``wanted``'s dtype where the
    attention it replaces returned another dtype."""
    out = call
    if index is not None:
        item = call.meta["val"][index]
        out = insert_call(graph, operator.getitem, (call, index), None, lambda: item, keys, like)
    produced = out.meta["val"]
    if wanted is not None and wanted.dtype != produced.dtype:
        dtype = wanted.dtype
        with produced.fake_mode:
            cast = produced.to(dtype)
        out = insert_call(graph, "to", (out, dtype), None, lambda: cast, keys, like, method=True)
    return out


def erase_dead(nodes: list[fx.Node]) -> None:
    """Erase ``nodes`` once unused, then every pure computation that only they read (a mask, k^T,
    upcasts, grouped-query repeats)."""
    pending, erased = list(nodes), set()
    while pending:
        node = pending.pop(0)
        if node in erased or node.users or node.op not in ("call_function", "call_method") \
                or node.is_impure() or _writes_in_place(node):
            continue
        inputs = list(node.all_input_nodes)
        node.graph.erase_node(node)
        erased.add(node)
        pending += inputs


def _writes_in_place(node: fx.Node) -> bool:
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.endswith("__")
    return node.target in (operator.setitem, operator.iadd, operator.isub, operator.imul,
                           operator.iand, operator.ior, operator.itruediv)


def topological(graph: fx.Graph, nodes: list[fx.Node]) -> list[fx.Node]:
    order = {node: i for i, node in enumerate(graph.nodes)}
    return sorted({n for n in nodes if n in order}, key=order.__getitem__)


def positions_arg(graph: fx.Graph, documents: Optional[Documents], keys,
                  like: fx.Node) -> Optional[fx.Node]:
    """An attention op's [1 or B, S] position ids: the documents' tensor, one row of it, or it
    unsqueezed."""
    if documents is None:
        return None
    positions = documents.positions
    value = fake_value(positions)
    with value.fake_mode:
        if value.dim() == 1:
            fake = value.unsqueeze(0)
            return insert_call(graph, "unsqueeze", (positions, 0), None, lambda: fake, keys, like,
                               method=True)
        if documents.row is not None and value.shape[0] != 1:
            row = documents.row
            fake = value[row:row + 1]
            return insert_call(graph, operator.getitem, (positions, slice(row, row + 1)), None,
                               lambda: fake, keys, like)
    return positions
