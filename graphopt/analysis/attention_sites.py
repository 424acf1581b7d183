"""Finds the attentions of a Dynamo graph, with their inputs, options and masks.

Two forms are recognised::

    o = F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=p, is_causal=c, scale=s,
                                       enable_gqa=g)

    s = matmul(q, k.transpose(-2, -1))            (q may carry a positive constant factor)
    s = s * c | s / c                             (positive constants, any number, any order)
    s = s + m | s.masked_fill(m, -inf)            (at most one mask)
    p = softmax(s(.float()), -1)(.to(dtype))      (dropout(p, 0.0) and casts allowed)
    o = matmul(p, v)

``find_attention`` returns an :class:`AttentionSite` per attention and a :class:`Refusal` for each
candidate it could not read (a softmax over q k^T whose scale is a tensor, whose probabilities are
used elsewhere, ...), naming the node and the reason. What a mask lets each query see is then the
question of :mod:`graphopt.analysis.attention_masks` (``AttentionSite.mask_structure``).

Key/value heads repeated for grouped-query attention (``repeat_interleave(k0, n, dim=1)`` or
``k0[:, :, None].expand(...).reshape(...)``) are seen through: ``k_heads`` / ``v_heads`` are the
unrepeated tensors where both are repeated alike.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from graphopt import _compat
from graphopt.analysis.attention_masks import (MASKED_ADDITIVE_MAX, MaskAnalysis, MaskStructure,
                                               Unproven)
from graphopt.analysis.torch_ir import bind_any, fake_value, module_path, source_line, spec

SDPA = spec("scaled_dot_product_attention", [F.scaled_dot_product_attention],
            params=("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
                    "enable_gqa"),
            attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False)
MATMUL = spec("matmul", [torch.matmul, operator.matmul], ["matmul", "__matmul__"],
              ("input", "other"))
SOFTMAX = spec("softmax", [F.softmax, torch.softmax], ["softmax"], ("input", "dim", "dtype"),
               ignored_kwargs=("_stacklevel",), dtype=None)
DROPOUT = spec("dropout", [F.dropout, torch.dropout], ["dropout"], ("input", "p", "training"),
               ignored_kwargs=("inplace",), p=0.5, training=True)
TRANSPOSE = spec("transpose", [torch.transpose], ["transpose"], ("input", "dim0", "dim1"))
PERMUTE = spec("permute", [torch.permute], ["permute"], ("input", "dims"), varargs=True)
MUL = spec("mul", [operator.mul, torch.mul], ["mul", "__mul__"], ("input", "other"))
DIV = spec("div", [operator.truediv, torch.div], ["div", "__truediv__"], ("input", "other"))
ADD = spec("add", [operator.add, torch.add], ["add", "__add__"], ("input", "other"))
MASKED_FILL = spec("masked_fill", [torch.masked_fill], ["masked_fill"], ("input", "mask", "value"))
FLOAT = spec("float", methods=["float"], params=("input",))
TO = spec("to", methods=["to"], params=("input", "dtype"))
TYPE_AS = spec("type_as", methods=["type_as"], params=("input", "other"))
REPEAT_INTERLEAVE = spec("repeat_interleave", [torch.repeat_interleave], ["repeat_interleave"],
                         ("input", "repeats", "dim"), dim=None)
UNSQUEEZE = spec("unsqueeze", [torch.unsqueeze], ["unsqueeze"], ("input", "dim"))
GETITEM = spec("getitem", [operator.getitem], params=("input", "index"))
EXPAND = spec("expand", methods=["expand"], params=("input", "size"), varargs=True)
RESHAPE = spec("reshape", [torch.reshape], ["reshape", "view"], ("input", "shape"), varargs=True)
FLATTEN = spec("flatten", [torch.flatten], ["flatten"], ("input", "start_dim", "end_dim"),
               start_dim=0, end_dim=-1)
EINSUM = spec("einsum", [torch.einsum], params=("equation", "operands"), varargs=True)
BMM = spec("bmm", [torch.bmm], ["bmm"], ("input", "mat2"))

UPCASTS = (FLOAT, TO, TYPE_AS)
SCORE_SCALES = ((MUL, lambda c: c), (DIV, lambda c: 1.0 / c))
PRODUCTS = (MATMUL, EINSUM, BMM)


@dataclasses.dataclass
class MaskUse:
    """How a mask enters the scores: "keep" (boolean, SDPA), "drop" (masked_fill(m, v)) or
    "additive"; ``value_scale`` multiplies it after it is applied (positive constants)."""

    node: fx.Node
    use: str
    value_scale: float = 1.0


@dataclasses.dataclass
class AttentionSite:
    """One attention: what it reads, its options, and the nodes that die when it is replaced."""

    anchor: fx.Node            # the SDPA call, or the probabilities @ v matmul
    form: str                  # "sdpa" | "decomposed"
    q: fx.Node
    k: fx.Node                 # as the attention reads them (possibly with repeated heads)
    v: fx.Node
    k_heads: fx.Node           # without the grouped-query repeat, where there is one
    v_heads: fx.Node
    scale: Any                 # a float; an SDPA's scale may be a graph value (a SymFloat where
                               # torch.compile(dynamic=True) made a module's float symbolic)
    is_causal: bool            # SDPA's flag (a decomposed attention has only its mask)
    mask: Optional[MaskUse]
    dropout_p: Any             # 0.0, a number, or a node
    enable_gqa: bool = False
    internal: list = dataclasses.field(default_factory=list)  # scores / probabilities

    def describe(self) -> str:
        where = module_path(self.anchor)
        module = f" in {where}" if where else ""
        return f"{self.anchor.name} ({self.form}{module}) at {source_line(self.anchor)}"

    def scores_shape(self) -> tuple:
        q, k = fake_value(self.q), fake_value(self.k)
        return (q.shape[0], q.shape[1], q.shape[2], k.shape[2])

    def mask_structure(self, analysis: MaskAnalysis) -> MaskStructure:
        """What each query may see (raises Unproven naming the node where that cannot be shown)."""
        if self.mask is None:
            return MaskStructure(causal=self.is_causal)
        if self.is_causal:
            raise Unproven(self.anchor, "has both is_causal=True and an attn_mask")
        return analysis.structure(self.mask.node, self.mask.use, self.scores_shape(),
                                  reader=self.anchor, value_scale=self.mask.value_scale)

    def probabilities_used_outside(self) -> Optional[fx.Node]:
        """A score/probability node that something besides the attention reads."""
        members = set(self.internal) | {self.anchor}
        return next((n for n in self.internal if any(u not in members for u in n.users)), None)


@dataclasses.dataclass
class Refusal:
    """A candidate attention this module could not read, and why."""

    node: fx.Node
    reason: str

    def describe(self) -> str:
        return f"{self.node.name} at {source_line(self.node)}: {self.reason}"


class _Refused(Exception):
    pass


def _static(size) -> Optional[int]:
    return None if _compat.is_symbolic(size) else int(size)


def _check_qkv(q: fx.Node, k: fx.Node, v: fx.Node) -> None:
    qv, kv, vv = fake_value(q), fake_value(k), fake_value(v)
    if qv is None or kv is None or vv is None:
        raise _Refused("q/k/v carry no fake value (meta['val'/'example_value'])")
    if qv.dim() != 4 or kv.dim() != 4 or vv.dim() != 4:
        raise _Refused(f"inputs are not 4-D [B, H, S, D] (q {tuple(qv.shape)}, k "
                       f"{tuple(kv.shape)})")
    if kv.shape != vv.shape:
        raise _Refused(f"k {tuple(kv.shape)} and v {tuple(vv.shape)} differ in shape")
    if qv.shape[1] != kv.shape[1] and (_static(qv.shape[1]) is None or _static(kv.shape[1]) is None
                                       or qv.shape[1] % kv.shape[1]):
        raise _Refused(f"{qv.shape[1]} query heads are not a multiple of {kv.shape[1]} key/value "
                       "heads")


def _strip_repeat(node: fx.Node) -> Optional[fx.Node]:
    """k0 where ``node`` repeats the heads of k0 [B, Hkv, S, D] (GQA written out), else None."""
    found, args = bind_any(node, (REPEAT_INTERLEAVE,))
    if found is not None and isinstance(args["repeats"], int) and args["dim"] in (1, -3):
        source = fake_value(args["input"])
        return args["input"] if source is not None and source.dim() == 4 else None
    # k0[:, :, None] (or unsqueeze(2)) .expand(B, Hkv, n, S, D) .reshape(B, Hq, S, D) / flatten(1, 2)
    found, args = bind_any(node, (RESHAPE, FLATTEN))
    _, expanded = bind_any(args["input"], (EXPAND,)) if found is not None else (None, None)
    _, unsqueezed = bind_any(expanded["input"], (UNSQUEEZE, GETITEM)) if expanded else (None, None)
    if unsqueezed is None:
        return None
    source, grouped = fake_value(unsqueezed["input"]), fake_value(args["input"])
    if (source is None or grouped is None or source.dim() != 4 or grouped.dim() != 5
            or tuple(grouped.shape[:2]) != tuple(source.shape[:2])
            or tuple(grouped.shape[3:]) != tuple(source.shape[2:])):
        return None
    return unsqueezed["input"]


def _heads(k: fx.Node, v: fx.Node) -> tuple[fx.Node, fx.Node]:
    k0, v0 = _strip_repeat(k), _strip_repeat(v)
    if k0 is None or v0 is None or fake_value(k0).shape != fake_value(v0).shape:
        return k, v
    return k0, v0


def _match_sdpa(node: fx.Node) -> Optional[AttentionSite]:
    args = SDPA.bind(node)
    if args is None:
        return None
    if not isinstance(args["is_causal"], bool):
        raise _Refused("is_causal is not a constant")
    q, k, v = args["query"], args["key"], args["value"]
    _check_qkv(q, k, v)
    scale = args["scale"]
    if scale is None:
        head_dim = _static(fake_value(q).shape[-1])
        if head_dim is None:
            raise _Refused("the head dim is symbolic, so the default scale is unknown")
        scale = 1.0 / math.sqrt(head_dim)
    if not isinstance(scale, (int, float, fx.Node)):
        raise _Refused(f"scale {scale!r} is neither a constant nor a graph value")
    mask = args["attn_mask"]
    mask_use = None
    if mask is not None:
        mask_value = fake_value(mask)
        if mask_value is None:
            raise _Refused(f"attn_mask {mask!r} is not a tensor")
        mask_use = MaskUse(mask, "keep" if mask_value.dtype == torch.bool else "additive")
    k_heads, v_heads = _heads(k, v)
    return AttentionSite(node, "sdpa", q, k, v, k_heads, v_heads,
                         scale if isinstance(scale, fx.Node) else float(scale), args["is_causal"],
                         mask_use, args["dropout_p"], bool(args["enable_gqa"]))


def _strip_upcast(node: Any) -> Any:
    """The source of an exact upcast to float32 (from bf16/fp16/fp32), else ``node`` itself."""
    found, args = bind_any(node, UPCASTS)
    if found is None:
        return node
    value, source = fake_value(node), fake_value(args["input"])
    if (value is not None and source is not None and value.dtype == torch.float32
            and source.dtype in (torch.float16, torch.bfloat16, torch.float32)):
        return args["input"]
    return node


def _has_shape(arg: Any, like: torch.Tensor) -> bool:
    value = fake_value(arg)
    return value is not None and tuple(value.shape) == tuple(like.shape)


def _is_masking_value(value: Any, value_scale: float) -> bool:
    return isinstance(value, (int, float)) and (
        value == float("-inf") or value * value_scale <= MASKED_ADDITIVE_MAX)


def _match_decomposed(node: fx.Node) -> Optional[AttentionSite]:
    """From the final matmul back to matmul(q, k^T); None when ``node`` is not attention."""
    pv = MATMUL.bind(node)
    if pv is None:
        return None
    internal: list[fx.Node] = []
    probs = pv["input"]
    dropout_p: Any = 0.0
    while True:  # casts and dropout between softmax and the value matmul
        found, args = bind_any(probs, UPCASTS + (DROPOUT,))
        if found is None:
            break
        if found is DROPOUT and args["training"] is not False:
            dropout_p = args["p"]
        internal.append(probs)
        probs = args["input"]
    soft = SOFTMAX.bind(probs) if isinstance(probs, fx.Node) else None
    if soft is None:
        return None
    internal.append(probs)
    scores_val = fake_value(probs)
    if scores_val is None or soft["dim"] not in (-1, scores_val.dim() - 1):
        raise _Refused("softmax is not over the last (key) dimension")
    scale, mask_use = 1.0, None
    scores = soft["input"]
    while True:  # casts, scaling and the mask between the score matmul and softmax
        internal.append(scores)
        found, args = bind_any(scores, UPCASTS)
        if found is not None:
            scores = args["input"]
            continue
        found, args = bind_any(scores, (MUL, DIV, ADD, MASKED_FILL))
        if found is None:
            break
        chain, other = args["input"], args.get("other", args.get("mask"))
        if found in (MUL, ADD) and not _has_shape(chain, scores_val) and _has_shape(other,
                                                                                   scores_val):
            chain, other = other, chain
        if found in (MUL, DIV):
            if not isinstance(other, (int, float)) or other <= 0:
                # A tensor scale is not provably uniform; a non-positive one turns a -inf mask
                # applied before it into +inf or nan.
                raise _Refused(f"scores are scaled by {getattr(other, 'name', other)!r}, not a "
                               "positive constant")
            scale *= dict(SCORE_SCALES)[found](float(other))
        else:
            if mask_use is not None:
                raise _Refused("the scores take two masks")
            if not isinstance(other, fx.Node):
                raise _Refused(f"the scores get {other!r} added, not a mask tensor")
            if found is MASKED_FILL and not _is_masking_value(args["value"], scale):
                raise _Refused(f"masked_fill with {args['value']!r}, not -inf or a value at most "
                               f"{MASKED_ADDITIVE_MAX}")
            mask_use = MaskUse(other, "drop" if found is MASKED_FILL else "additive", scale)
        scores = chain
    internal.pop()  # ``scores`` is the q k^T matmul itself, appended last
    qk = MATMUL.bind(scores) if isinstance(scores, fx.Node) else None
    if qk is None:
        raise _Refused("the scores do not come from matmul(q, k^T)")
    internal.append(scores)
    q, key_t = qk["input"], qk["other"]
    found, args = bind_any(q, (MUL,))
    if found is not None and isinstance(args["other"], (int, float)) and args["other"] > 0:
        scale *= float(args["other"])
        q = args["input"]
    k = _untranspose(key_t)
    if k is None:
        raise _Refused("the key operand is not k.transpose(-2, -1)")
    v = pv["other"]
    stripped = [_strip_upcast(x) for x in (q, k, v)]
    if len({fake_value(x).dtype for x in stripped if fake_value(x) is not None}) == 1:
        q, k, v = stripped
    _check_qkv(q, k, v)
    k_heads, v_heads = _heads(k, v)
    return AttentionSite(node, "decomposed", q, k, v, k_heads, v_heads, scale, False, mask_use,
                         dropout_p, internal=internal)


def _untranspose(node: Any) -> Optional[fx.Node]:
    value = fake_value(node)
    if value is None:
        return None
    rank = value.dim()
    last_two = {rank - 2, rank - 1}
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target is getattr and \
            node.args[1] == "mT":
        return node.args[0]
    found, args = bind_any(node, (TRANSPOSE,))
    if found is not None and {args["dim0"] % rank, args["dim1"] % rank} == last_two:
        return args["input"]
    found, args = bind_any(node, (PERMUTE,))
    if found is not None and tuple(d % rank for d in args["dims"]) == tuple(range(rank - 2)) + (
            rank - 1, rank - 2):
        return args["input"]
    return None


MATCHERS: tuple[Callable[[fx.Node], Optional[AttentionSite]], ...] = (_match_sdpa,
                                                                     _match_decomposed)


def find_attention(graph: fx.Graph) -> tuple[list[AttentionSite], list[Refusal]]:
    """Every attention of ``graph`` (SDPA and decomposed), and the candidates it could not read."""
    sites, refusals = [], []
    for node in list(graph.nodes):
        if node.op not in ("call_function", "call_method"):
            continue
        for matcher in MATCHERS:
            try:
                site = matcher(node)
            except _Refused as reason:
                refusals.append(Refusal(node, str(reason)))
                break
            if site is not None:
                sites.append(site)
                break
    claimed = {n for site in sites for n in site.internal} | {r.node for r in refusals}
    claimed |= {n for r in refusals for n in r.node.all_input_nodes}
    refusals += [Refusal(n, "a softmax over a product of activations whose result feeds another "
                            "product: an attention written in a form graphopt does not read")
                 for n in graph.nodes if SOFTMAX.bind(n) is not None and n not in claimed
                 and _looks_like_attention(n)]
    return sites, refusals


def _looks_like_attention(softmax: fx.Node) -> bool:
    """A softmax fed (through elementwise ops) by a product of two activations and feeding one."""
    def reaches(start: fx.Node, step: Callable[[fx.Node], list], depth: int = 6) -> bool:
        frontier = [start]
        for _ in range(depth):
            frontier = [n for node in frontier for n in step(node)]
            if any(bind_any(n, PRODUCTS)[0] is not None for n in frontier):
                return True
        return False
    return (reaches(softmax, lambda n: list(n.all_input_nodes))
            and reaches(softmax, lambda n: list(n.users)))
