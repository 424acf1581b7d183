"""FLOPs, bytes and roofline time of aten ops in an FX graph.

Shapes may be symbolic: every count is a sympy expression over the graph's size symbols, and is
turned into a number with the symbols' hints (the sizes Dynamo saw). The time of an op is its
roofline on a :class:`~graphopt.analysis.device_profile.DeviceProfile`::

    time = launch + max(flops / matmul_rate(dtype), bytes / hbm_bandwidth)

Compute-bound ops (GEMMs, attention) use the GEMM rate; everything else is charged memory traffic
only (pointwise FLOPs are never the bound on these machines). The model ranks recompute choices; it
is not a simulator, so it ignores fusion and caching (a fused chain of pointwise ops costs less
than the sum this model gives it).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable

import sympy
import torch
import torch.fx as fx

from graphopt.analysis import op_facts
from graphopt.analysis.device_profile import DeviceProfile
from graphopt.analysis.op_facts import val

log = logging.getLogger("graphopt.analysis.cost_model")

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class OpCost:
    """FLOPs and bytes moved by one node, as sympy expressions over size symbols."""

    flops: sympy.Expr
    bytes: sympy.Expr
    compute_bound: bool  # charged at the GEMM rate (True) or as memory traffic only

    def evaluate(self, hints: dict | None = None) -> tuple[float, float]:
        return evaluate(self.flops, hints), evaluate(self.bytes, hints)


def to_sympy(value: Any) -> sympy.Expr:
    """An int or SymInt as a sympy expression."""
    if isinstance(value, bool):
        return sympy.Integer(int(value))
    if isinstance(value, int):
        return sympy.Integer(value)
    if isinstance(value, torch.SymInt):
        return value.node.expr
    if isinstance(value, float):
        return sympy.Float(value)
    raise TypeError(f"cannot turn {type(value).__name__} {value!r} into a size expression")


def numel_expr(value: torch.Tensor) -> sympy.Expr:
    return sympy.Mul(*[to_sympy(s) for s in value.shape]) if value.dim() else sympy.Integer(1)


def nbytes_expr(value: Any) -> sympy.Expr:
    """Bytes of a tensor (or of every tensor in a tuple/list), 0 for anything else."""
    if isinstance(value, torch.Tensor):
        return numel_expr(value) * value.element_size()
    if isinstance(value, (tuple, list)):
        return sympy.Add(*[nbytes_expr(v) for v in value]) if value else sympy.Integer(0)
    return sympy.Integer(0)


def hints_for(expr: sympy.Expr, values: Any = None) -> dict:
    """Hints of the free symbols of ``expr`` from the ShapeEnv that made ``values``."""
    hints = {}
    env = _shape_env(values)
    known = {}
    if env is not None:  # renamed backed_var_to_val in newer torch
        known = getattr(env, "backed_var_to_val", None) or env.var_to_val
    for symbol in expr.free_symbols:
        hint = known.get(symbol)
        hints[symbol] = int(hint) if hint is not None else _FALLBACK_HINT
    return hints


def size_hint(size: Any) -> int:
    """A concrete int for a possibly symbolic size: its hint, else 8192 (estimates only)."""
    if isinstance(size, int):
        return size
    hint = size.node.hint
    if hint is not None:
        return int(hint)
    return int(evaluate(size.node.expr, hints_for(size.node.expr, None)))


_FALLBACK_HINT = 8192


def _shape_env(values: Any):
    for value in values if isinstance(values, (list, tuple)) else [values]:
        if isinstance(value, torch.Tensor):
            for size in value.shape:
                if isinstance(size, torch.SymInt):
                    return size.node.shape_env
    return None


def evaluate(expr: sympy.Expr, hints: dict | None = None) -> float:
    """A number for ``expr``: its free symbols replaced by ``hints`` (or a fallback of 8192)."""
    if not expr.free_symbols:
        return float(expr)
    hints = dict(hints or {})
    for symbol in expr.free_symbols:
        hints.setdefault(symbol, _FALLBACK_HINT)
    return float(expr.subs(hints))


# --- FLOP formulas, as data: op -> function(node, out) returning a sympy expression ------------------

def _shape(arg: Any) -> list[sympy.Expr]:
    return [to_sympy(s) for s in val(arg).shape]


def _mm_flops(node: fx.Node, out: Any) -> sympy.Expr:
    (m, k), n = _shape(node.args[0]), _shape(node.args[1])[1]
    return 2 * m * k * n


def _addmm_flops(node: fx.Node, out: Any) -> sympy.Expr:
    (m, k), n = _shape(node.args[1]), _shape(node.args[2])[1]
    return 2 * m * k * n + m * n


def _bmm_flops(node: fx.Node, out: Any) -> sympy.Expr:
    b, m, k = _shape(node.args[0])
    return 2 * b * m * k * _shape(node.args[1])[2]


def _baddbmm_flops(node: fx.Node, out: Any) -> sympy.Expr:
    b, m, k = _shape(node.args[1])
    n = _shape(node.args[2])[2]
    return 2 * b * m * k * n + b * m * n


def _conv_flops(node: fx.Node, out: Any) -> sympy.Expr:
    weight = _shape(node.args[1])
    out_numel = numel_expr(out if isinstance(out, torch.Tensor) else out[0])
    # weight [C_out, C_in / groups, *kernel]: every output element reads C_in/groups * kernel inputs
    return 2 * out_numel * sympy.Mul(*weight[1:])


def _attention_flops(node: fx.Node, out: Any, backward: bool) -> sympy.Expr:
    q, k = _shape(node.args[0]), _shape(node.args[1])
    batch_heads = sympy.Mul(*q[:-2])
    seq_q, head_dim, seq_k = q[-2], q[-1], k[-2]
    causal = _is_causal(node)
    flops = 4 * batch_heads * seq_q * seq_k * head_dim
    if causal:
        flops = flops / 2
    return flops * sympy.Rational(5, 2) if backward else flops


def _is_causal(node: fx.Node) -> bool:
    return bool(op_facts.argument(node, "is_causal", default=False))


# One formula per op of op_facts.GEMMS (the ops the cost category "gemm" charges at the GEMM rate).
FLOP_FORMULAS: dict[Any, Callable[[fx.Node, Any], sympy.Expr]] = {
    aten.mm.default: _mm_flops,
    aten.addmm.default: _addmm_flops,
    aten.bmm.default: _bmm_flops,
    aten.baddbmm.default: _baddbmm_flops,
    aten.convolution.default: _conv_flops,
}

def op_cost(node: fx.Node) -> OpCost:
    """FLOPs and bytes of one call_function node (zero for placeholders, views and outputs)."""
    zero = sympy.Integer(0)
    category = op_facts.cost_category(node)
    if category in ("none", "view"):
        return OpCost(zero, zero, False)
    out = node.meta.get("val")
    moved = nbytes_expr(out) + sympy.Add(*[nbytes_expr(val(a)) for a in node.all_input_nodes])
    if category == "gemm":
        return OpCost(FLOP_FORMULAS[node.target](node, out), moved, True)
    if category == "attention":
        return OpCost(_attention_flops(node, out, op_facts.is_attention_backward(node)), moved, True)
    elements = numel_expr(out) if isinstance(out, torch.Tensor) else zero
    return OpCost(elements, moved, False)


def matmul_rate(profile: DeviceProfile, dtype: torch.dtype | None) -> float:
    """FLOP/s of a large GEMM in this dtype on ``profile``."""
    if dtype in (torch.float32, torch.float64):
        return profile.matmul_tflops_fp32 * 1e12
    return profile.matmul_tflops * 1e12


def roofline_time(cost: OpCost, profile: DeviceProfile, dtype: torch.dtype | None = None,
                  hints: dict | None = None) -> float:
    flops, moved = cost.evaluate(hints)
    if flops == 0 and moved == 0:
        return 0.0
    memory_s = moved / (profile.hbm_gbps * 1e9)
    compute_s = flops / matmul_rate(profile, dtype) if cost.compute_bound else 0.0
    return profile.kernel_launch_s + max(memory_s, compute_s)


def node_time(node: fx.Node, profile: DeviceProfile) -> float:
    """Roofline seconds of one node, sizes evaluated with their hints."""
    cost = op_cost(node)
    out = node.meta.get("val")
    first = out[0] if isinstance(out, (tuple, list)) and out else out
    dtype = first.dtype if isinstance(first, torch.Tensor) else None
    values = [out] + [val(a) for a in node.all_input_nodes]
    hints = hints_for(cost.flops + cost.bytes, [v for v in values if isinstance(v, torch.Tensor)])
    return roofline_time(cost, profile, dtype, hints)


def graph_times(gm: fx.GraphModule, profile: DeviceProfile) -> dict[str, float]:
    """Seconds per node name for every node of ``gm``."""
    return {node.name: node_time(node, profile) for node in gm.graph.nodes}


# --- kernel workspaces: memory a kernel takes from the caching allocator and gives back before it
# returns. No graph value holds it, yet it counts in the measured peak of the step that runs it.

def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _sizes(arg: Any) -> list[int]:
    return [size_hint(s) for s in val(arg).shape]


def _flash_backward_workspace(node: fx.Node, heads_first: bool) -> int:
    """FlashAttention-2 backward: an fp32 dq accumulator [B, S_q (to 128), H, D (to 32, or 64
    above 128)] and softmax_d [B, H, S_q (to 128)] fp32; with fewer key/value heads than query
    heads (GQA), dk and dv at every query head, summed over each group afterwards."""
    query, key = _sizes(node.args[1]), _sizes(node.args[2])
    if heads_first:
        query, key = [query[0], query[2], query[1], query[3]], [key[0], key[2], key[1], key[3]]
    batch, seq_q, heads, head_dim = query
    seq_q_rounded = _round_up(seq_q, 128)
    dim_rounded = _round_up(head_dim, 32 if head_dim <= 128 else 64)
    workspace = 4 * batch * seq_q_rounded * heads * dim_rounded + 4 * batch * heads * seq_q_rounded
    if key[2] != heads:
        workspace += 2 * batch * key[1] * heads * head_dim * val(node.args[1]).element_size()
    return workspace


def _cudnn_backward_workspace(node: fx.Node) -> int:
    """cuDNN attention backward ([B, H, S, D] layout): the workspace its graph asks for, taken
    here as an fp32 dq accumulator and fp32 row sums -- an estimate (the size is cuDNN's choice)."""
    batch, heads, seq_q, head_dim = _sizes(node.args[1])
    return 4 * batch * heads * seq_q * head_dim + 4 * batch * heads * seq_q


def _efficient_backward_workspace(node: fx.Node, heads_first: bool) -> int:
    """Memory-efficient attention backward with a low-precision output: the gradient of the
    queries accumulated in fp32 (its key/value accumulators, when used, are not modelled)."""
    query = val(node.args[1])
    if query.dtype == torch.float32:
        return 0
    return 4 * math.prod(_sizes(node.args[1]))


def _embedding_backward_workspace(node: fx.Node) -> int:
    """CUDA embedding backward over more than 3072 indices: the indices sorted (with their
    positions and segment bookkeeping, int64) and one partial sum per segment in the accumulation
    dtype (fp32 for bf16/fp16), at most one row per index."""
    grad, indices = val(node.args[0]), val(node.args[1])
    if grad.device.type != "cuda":
        return 0
    count = math.prod(_sizes(node.args[1]))
    if count <= 3072:
        return 0
    width = size_hint(grad.shape[-1])
    accumulate = 8 if grad.dtype == torch.float64 else 4
    return count * width * accumulate + 6 * count * indices.element_size()


WORKSPACE_FORMULAS: dict[str, Callable[[fx.Node], int]] = {
    "_scaled_dot_product_flash_attention_backward": lambda n: _flash_backward_workspace(n, True),
    "_flash_attention_backward": lambda n: _flash_backward_workspace(n, False),
    "_scaled_dot_product_efficient_attention_backward": lambda n: _efficient_backward_workspace(n, True),
    "_efficient_attention_backward": lambda n: _efficient_backward_workspace(n, False),
    "_scaled_dot_product_cudnn_attention_backward": _cudnn_backward_workspace,
    "embedding_dense_backward": _embedding_backward_workspace,
}


def workspace_bytes(node: fx.Node) -> int:
    """Bytes the kernel of ``node`` allocates for itself while it runs (0 when none is known).

    cuBLAS's workspace is not counted: torch allocates it once per handle and keeps it, so it is
    part of the memory in use before a step, not of the step's peak."""
    if node.op != "call_function":
        return 0
    formula = WORKSPACE_FORMULAS.get(op_facts.op_name(node))
    if formula is None or not all(isinstance(val(a), torch.Tensor) for a in node.args[:3]
                                  if isinstance(a, fx.Node)):
        return 0
    return int(formula(node))


def tensor_nbytes(value: Any) -> int:
    """Concrete bytes of a meta value (hints for symbolic sizes); tuples summed."""
    if isinstance(value, torch.Tensor):
        numel = 1
        for size in value.shape:
            numel *= size_hint(size)
        return numel * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(tensor_nbytes(v) for v in value)
    return 0


def total_flops(gm: fx.GraphModule) -> float:
    """FLOPs of the whole graph, sizes evaluated with their hints."""
    total = []
    for node in gm.graph.nodes:
        cost = op_cost(node)
        total.append(evaluate(cost.flops, hints_for(cost.flops, node.meta.get("val"))))
    return math.fsum(total)
