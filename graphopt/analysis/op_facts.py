"""What graphopt knows about an op, in one table that every module consults.

For a node of an FX graph (aten ops, collectives, graphopt:: ops):

    fact               function               consulted by
    value              val(node)              every module that reads shapes, dtypes, devices
    name, arguments    op_name, argument      the cost model, agreement, op timing
    communicates       communicates           the partitioner (never recomputed), op timing (untimed)
    random             is_random              the partitioner, op timing
    view               is_view                cost model (no bytes), liveness (no memory), planners
    in-place           is_in_place            the partitioner, op timing
    attention          is_attention(_backward) cost model (FLOPs), partitioner (never recomputed)
    recomputable       recomputable           the partitioner (plan_rematerialization)
    never recompute    why_never_recompute    the partitioner; the reason says which fact forbids it
    cost category      cost_category          cost model: "gemm" / "attention" are compute-bound,
                                              "cheap" and "memory" are charged their bytes,
                                              "view" and "none" cost nothing; the min-cut recomputes
                                              "cheap" ops for free
    launches a kernel  launches_kernel        op timing (views and getitems are not timed)
    fusion kind        fusion_kind            liveness and the planner (what Inductor computes
                                              inside its readers' kernels)
    Inductor's kernel  inductor_writes_kernel the time model (priced from bytes under Inductor,
                                              not from the op's own time; analysis/kernel_time)
    output from data   output_depends_on_data op timing

The rows are data below (namespaces, op sets, tags); a new op is classified here, once.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

aten = torch.ops.aten

# Namespaces whose ops talk to other ranks.
COMMUNICATING_NAMESPACES = frozenset({"_c10d_functional", "c10d_functional", "_dtensor", "c10d"})
# graphopt's own ops: several communicate (sp_attention, matmul_all_reduce, ...), others keep state
# across calls (the offload pool). graphopt treats every one of them as communicating.
GRAPHOPT_NAMESPACE = "graphopt"

# Ops whose output shares storage with an input although their schema says otherwise.
VIEW_LIKE = frozenset({aten._unsafe_view.default, aten.alias.default})

# Compute-bound ops charged at the GEMM rate (their FLOP formulas: cost_model.FLOP_FORMULAS).
GEMMS = frozenset({aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
                   aten.convolution.default})

ATTENTION_FORWARD = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                     "_scaled_dot_product_cudnn_attention",
                     "_scaled_dot_product_flash_attention_for_cpu", "_flash_attention_forward",
                     "_efficient_attention_forward", "scaled_dot_product_attention")
ATTENTION_BACKWARD = tuple(f"{name}_backward" for name in ATTENTION_FORWARD) + (
    "_flash_attention_backward", "_efficient_attention_backward")

# Memory-bound ops the min-cut may recompute for free besides pointwise ops: cheap reductions,
# copies and fills.
CHEAP_OPS = frozenset({
    aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default,
    aten._to_copy.default, aten.clone.default, aten.cat.default, aten.full.default,
    aten.arange.start_step, aten.arange.default, aten.scalar_tensor.default,
})

# Ops Inductor computes inside its consumers' loops besides pointwise ops (a dtype conversion, an
# indirect load); a reduction reads such producers in its own loop too.
INLINED_BY_INDUCTOR = frozenset({aten._to_copy.default, aten.gather.default})
# Ops Inductor lowers as a copy of their first input that they then write into (its lowering.py).
SCATTERS = frozenset({aten.index_put.default, aten._unsafe_index_put.default,
                      aten._unsafe_masked_index_put_accumulate.default, aten.scatter.src,
                      aten.scatter.value, aten.scatter_add.default, aten.scatter_reduce.two,
                      aten.as_strided_scatter.default})
REDUCTION_NAMES = frozenset({"prepare_softmax_online", "var_mean"})


def val(arg: Any) -> Any:
    """The value a graph node stands for (its fake tensor, SymInt, tuple, ...): ``meta["val"]``, or
    Dynamo's ``meta["example_value"]``; anything that is not a node is its own value."""
    if not isinstance(arg, fx.Node):
        return arg
    return arg.meta.get("val", arg.meta.get("example_value"))


def _overload(node: fx.Node) -> torch._ops.OpOverload | None:
    target = node.target
    return target if node.op == "call_function" and isinstance(target, torch._ops.OpOverload) else None


def op_name(node: fx.Node) -> str:
    target = node.target
    packet = getattr(target, "_overloadpacket", None)
    return getattr(packet, "__name__", None) or getattr(target, "__name__", str(target))


def argument(node: fx.Node, name: str, default: Any = None) -> Any:
    """The value ``node`` passes for its op's argument ``name``: by keyword, by position, else the
    schema's default; ``default`` where the op has no such argument (or no schema)."""
    if name in node.kwargs:
        return node.kwargs[name]
    schema = getattr(node.target, "_schema", None)
    for index, arg in enumerate(schema.arguments if schema is not None else ()):
        if arg.name == name:
            return node.args[index] if index < len(node.args) else arg.default_value
    return default


def communicates(node: fx.Node) -> bool:
    """The op talks to other ranks (a collective), or is a graphopt:: op (which may, or keeps state):
    its time and its effects depend on more than its inputs."""
    op = _overload(node)
    return op is not None and (op.namespace in COMMUNICATING_NAMESPACES
                               or op.namespace == GRAPHOPT_NAMESPACE)


def is_random(node: fx.Node) -> bool:
    op = _overload(node)
    return op is not None and torch.Tag.nondeterministic_seeded in op.tags


def is_in_place(node: fx.Node) -> bool:
    """The op writes into one of its inputs (a mutable schema)."""
    op = _overload(node)
    return op is not None and op._schema.is_mutable


def written_inputs(node: fx.Node) -> list[fx.Node]:
    """The inputs an in-place op writes into (its schema's mutable arguments): ``copy_``'s
    destination, ``add_``'s self, an ``out=`` tensor."""
    op = _overload(node)
    if op is None or not op._schema.is_mutable:
        return []
    written = []
    for index, argument in enumerate(op._schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = (node.args[index] if index < len(node.args) and not argument.kwarg_only
                 else node.kwargs.get(argument.name))
        written.extend(v for v in (value if isinstance(value, (list, tuple)) else [value])
                       if isinstance(v, fx.Node))
    return written


def is_view(node: fx.Node) -> bool:
    """The output aliases an input (a view in the schema, or a known view-like op)."""
    if node.op != "call_function":
        return False
    if node.target in VIEW_LIKE:
        return True
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.returns:
        return False
    alias = schema.returns[0].alias_info
    return alias is not None and not alias.is_write


def is_attention(node: fx.Node) -> bool:
    """aten SDPA / flash / efficient / cudnn attention (forward or backward), or a graphopt::
    attention op."""
    if node.op != "call_function":
        return False
    name = op_name(node)
    if getattr(node.target, "namespace", "") == GRAPHOPT_NAMESPACE and "attention" in name:
        return True
    return name in ATTENTION_FORWARD or name in ATTENTION_BACKWARD


def is_attention_backward(node: fx.Node) -> bool:
    return node.op == "call_function" and op_name(node) in ATTENTION_BACKWARD


def output_depends_on_data(node: fx.Node) -> bool:
    """The output's shape or values depend on the input data in a way the meta cannot stand for."""
    op = _overload(node)
    return op is not None and bool({torch.Tag.dynamic_output_shape,
                                    torch.Tag.data_dependent_output} & set(op.tags))


def why_never_recompute(node: fx.Node) -> str | None:
    """Why replaying ``node`` in backward could change values or have other effects, or None."""
    if node.target is operator.getitem:
        parent = node.args[0]
        if not (isinstance(parent, fx.Node) and parent.op == "call_function"):
            return "an output of a value that is not an op"
        return why_never_recompute(parent)
    if _overload(node) is None:
        return "not an operator overload (a higher-order op or a Python function)"
    if communicates(node):
        return f"{node.target.namespace}:: op: it communicates or keeps state"
    if is_attention(node):
        return "attention (its output and LSE are kept)"
    if is_random(node):
        return "random"
    if is_in_place(node):
        return "mutates its inputs"
    return None


def recomputable(node: fx.Node) -> bool:
    """Replaying this op in backward gives the same values and has no other effect."""
    return why_never_recompute(node) is None


def cost_category(node: fx.Node) -> str:
    """How the cost model prices ``node``: "none" (not an op), "view" (aliases an input: nothing
    moved), "gemm" (compute-bound, a FLOP formula), "attention" (compute-bound), "cheap"
    (memory-bound and recomputed for free by the min-cut: pointwise ops, ``CHEAP_OPS``, getitem) or
    "memory" (every other op: charged the bytes it reads and writes)."""
    if node.op != "call_function":
        return "none"
    if is_view(node):
        return "view"
    target = node.target
    if target in GEMMS:
        return "gemm"
    if is_attention(node) and node.args and isinstance(val(node.args[0]), torch.Tensor):
        return "attention"
    if (target is operator.getitem or target in CHEAP_OPS
            or (isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags)):
        return "cheap"
    return "memory"


def launches_kernel(node: fx.Node) -> bool:
    """Views and getitem (an output of a multi-output op) launch nothing."""
    return node.op == "call_function" and not is_view(node) and node.target is not operator.getitem


def fusion_kind(node: fx.Node) -> str:
    """How Inductor treats ``node``'s op: "pointwise" (computed inside its readers' kernels unless
    stored, see ``liveness.inline_pointwise``), "reduction" (a kernel that reads pointwise producers
    in its own loop), "scatter" (writes into a copy of its first input) or "" (a buffer of its own:
    matmuls, attention, views, copies into a layout)."""
    op = _overload(node)
    if op is None or is_view(node) or not isinstance(node.meta.get("val"), torch.Tensor):
        return ""
    if torch.Tag.pointwise in op.tags or op in INLINED_BY_INDUCTOR:
        return "pointwise"
    if op in SCATTERS:
        return "scatter"
    if torch.Tag.reduction in op.tags or op_name(node) in REDUCTION_NAMES:
        return "reduction"
    return ""


# Namespaces of the ops Inductor lowers to kernels of its own (every other op is a call out).
INDUCTOR_LOWERED_NAMESPACES = frozenset({"aten", "prims"})


def inductor_writes_kernel(node: fx.Node) -> bool:
    """Inductor writes the kernel of this op itself (pointwise ops, reductions, copies, scatters,
    fills, indexing: the memory-bound aten ops), rather than calling a library or a custom op
    (GEMMs, attention, collectives, graphopt:: ops)."""
    op = _overload(node)
    return (op is not None and op.namespace in INDUCTOR_LOWERED_NAMESPACES
            and cost_category(node) in ("cheap", "memory"))
