"""shard_attention: every attention of a sequence-sharded graph -> graphopt::sp_attention.

Stage "pre_grad" (Dynamo's torch IR). Each rank runs the model on its contiguous slice of the
sequence; this pass makes every attention span the whole sequence over ``config.sp_group``::

    before                                          after
    o = F.scaled_dot_product_attention(             r = graphopt.sp_attention(q, k0, v0, scale,
            q, k, v, is_causal=c, scale=s,                  c, group_name, load_balance)
            enable_gqa=g)                           o = r[0]

    s = matmul(q, k.transpose(-2, -1))              r = graphopt.sp_attention(q, k, v, scale,
    s = s * scale | s / sqrt(d)                             True, group_name, load_balance)
    s = s + triu(full((S, S), -inf), 1)             o = r[0]   (.to(o's dtype) where it differs)
      | s.masked_fill(~tril(ones(S, S)), -inf)
    p = softmax(s.float(), -1).type_as(q)
    o = matmul(p, v)

k0, v0: where k and v are ``repeat_interleave(k0, n, dim=1)`` (or ``k0[:, :, None].expand(...)
.reshape(...)``) of fewer heads, the op takes k0 and v0, so only the Hkv heads travel. Upcasts to
float32 in front of the matmuls are dropped (the block kernels compute scores in float32 anyway).

Safe because the op computes the same function over the gathered sequence (the contract: rank r
holds tokens [r*S/P, (r+1)*S/P) of q, k, v in dim 2, the model gets global position ids), in float32
with a log-sum-exp merge: the result matches softmax attention within the input dtype's rounding.

Refused (graph unchanged, reason in PassResult.refusals): dropout > 0; an attn_mask; a decomposed
mask that is not an in-graph causal mask of the scores' shape (a mask tensor from an input or a
buffer cannot be proven causal); query and key lengths that differ (cross attention, KV caches);
inputs that are not 4-D [B, H, S, D]; attention probabilities used outside the attention; a
non-constant scale; torch.distributed not initialised.

Attention inside ``torch.utils.checkpoint`` regions (higher-order-op subgraphs) is rewritten too; a
plain region that now holds the op gets graphopt's checkpoint policy, so recomputing the region
reuses the op's saved (out, lse) instead of running distributed attention again.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn.functional as F

from graphopt import _compat
from graphopt.passes.manager import PassContext, PassResult

log = logging.getLogger("graphopt.passes.shard_attention")

_NEG_INF = float("-inf")


# --- op specs: how a torch-IR node is recognised and its arguments named ------------------------

@dataclasses.dataclass(frozen=True)
class OpSpec:
    """An operation as Dynamo records it: as functions and/or Tensor methods with named params."""

    name: str
    functions: tuple[Callable, ...] = ()
    methods: tuple[str, ...] = ()
    params: tuple[str, ...] = ()
    defaults: tuple[tuple[str, Any], ...] = ()
    ignored_kwargs: tuple[str, ...] = ()  # keyword arguments that do not change the values
    varargs: bool = False  # the last param also takes sizes given one by one: x.view(B, H, S, D)

    def bind(self, node: fx.Node) -> Optional[dict[str, Any]]:
        """The node's arguments by parameter name, or None when the node is not this op."""
        if not ((node.op == "call_function" and node.target in self.functions)
                or (node.op == "call_method" and node.target in self.methods)):
            return None
        kwargs = {k: v for k, v in node.kwargs.items() if k not in self.ignored_kwargs}
        args = tuple(node.args)
        if self.varargs and len(args) >= len(self.params) and not (
                len(args) == len(self.params) and isinstance(args[-1], (tuple, list))):
            args = args[:len(self.params) - 1] + (args[len(self.params) - 1:],)
        if len(args) > len(self.params) or any(k not in self.params for k in kwargs):
            return None
        bound = dict(self.defaults)
        bound.update(zip(self.params, args))
        bound.update(kwargs)
        return bound if all(p in bound for p in self.params) else None


def _spec(name, functions=(), methods=(), params=(), ignored_kwargs=(), varargs=False,
          **defaults) -> OpSpec:
    return OpSpec(name, tuple(functions), tuple(methods), tuple(params), tuple(defaults.items()),
                  tuple(ignored_kwargs), varargs)


_FACTORY_KWARGS = ("device", "dtype", "layout", "pin_memory", "requires_grad")


SDPA = _spec("scaled_dot_product_attention", [F.scaled_dot_product_attention],
             params=("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
                     "enable_gqa"),
             attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False)
MATMUL = _spec("matmul", [torch.matmul, operator.matmul], ["matmul", "__matmul__"],
               ("input", "other"))
SOFTMAX = _spec("softmax", [F.softmax, torch.softmax], ["softmax"], ("input", "dim", "dtype"),
                dtype=None)
DROPOUT = _spec("dropout", [F.dropout, torch.dropout], ["dropout"], ("input", "p", "training"),
                p=0.5, training=True)
TRANSPOSE = _spec("transpose", [torch.transpose], ["transpose"], ("input", "dim0", "dim1"))
PERMUTE = _spec("permute", [torch.permute], ["permute"], ("input", "dims"), varargs=True)
MUL = _spec("mul", [operator.mul, torch.mul], ["mul", "__mul__"], ("input", "other"))
DIV = _spec("div", [operator.truediv, torch.div], ["div", "__truediv__"], ("input", "other"))
ADD = _spec("add", [operator.add, torch.add], ["add", "__add__"], ("input", "other"))
MASKED_FILL = _spec("masked_fill", [torch.masked_fill], ["masked_fill"], ("input", "mask", "value"))
FLOAT = _spec("float", methods=["float"], params=("input",))
TO = _spec("to", methods=["to"], params=("input", "dtype"))
TYPE_AS = _spec("type_as", methods=["type_as"], params=("input", "other"))
REPEAT_INTERLEAVE = _spec("repeat_interleave", [torch.repeat_interleave], ["repeat_interleave"],
                          ("input", "repeats", "dim"), dim=None)
UNSQUEEZE = _spec("unsqueeze", [torch.unsqueeze], ["unsqueeze"], ("input", "dim"))
GETITEM = _spec("getitem", [operator.getitem], params=("input", "index"))
EXPAND = _spec("expand", methods=["expand"], params=("input", "size"), varargs=True)
RESHAPE = _spec("reshape", [torch.reshape], ["reshape", "view"], ("input", "shape"), varargs=True)
FLATTEN = _spec("flatten", [torch.flatten], ["flatten"], ("input", "start_dim", "end_dim"),
                start_dim=0, end_dim=-1)

# Mask constructions, from their leaves up: (op, input kind, condition) -> kind of the result.
FULL = _spec("full", [torch.full], params=("size", "fill_value"), ignored_kwargs=_FACTORY_KWARGS)
ONES = _spec("ones", [torch.ones], params=("size",), ignored_kwargs=_FACTORY_KWARGS, varargs=True)
TRIU = _spec("triu", [torch.triu], ["triu"], ("input", "diagonal"), diagonal=0)
TRIL = _spec("tril", [torch.tril], ["tril"], ("input", "diagonal"), diagonal=0)
LOGICAL_NOT = _spec("logical_not", [torch.logical_not, operator.invert],
                    ["logical_not", "__invert__", "bitwise_not"], ("input",))
EQ_ZERO = _spec("eq", [operator.eq, torch.eq], ["eq", "__eq__"], ("input", "other"))
BOOL = _spec("bool", methods=["bool"], params=("input",))

# kind names: "ninf" full of -inf, "ones" all ones, "additive_causal" 0 on/below the diagonal and
# -inf above, "keep_causal" true on/below the diagonal, "drop_causal" true above it.
MASK_RULES: tuple[tuple[OpSpec, Optional[str], Callable[[dict], bool], str], ...] = (
    (FULL, None, lambda a: a["fill_value"] == _NEG_INF, "ninf"),
    (ONES, None, lambda a: True, "ones"),
    (TRIU, "ninf", lambda a: a["diagonal"] == 1, "additive_causal"),
    (TRIU, "ones", lambda a: a["diagonal"] == 1, "drop_causal"),
    (TRIL, "ones", lambda a: a["diagonal"] == 0, "keep_causal"),
    (LOGICAL_NOT, "keep_causal", lambda a: True, "drop_causal"),
    (LOGICAL_NOT, "drop_causal", lambda a: True, "keep_causal"),
    (EQ_ZERO, "keep_causal", lambda a: a["other"] == 0, "drop_causal"),
    (EQ_ZERO, "drop_causal", lambda a: a["other"] == 0, "keep_causal"),
    (BOOL, "keep_causal", lambda a: True, "keep_causal"),
    (BOOL, "drop_causal", lambda a: True, "drop_causal"),
    (BOOL, "ones", lambda a: True, "ones"),
    (UNSQUEEZE, "*", lambda a: True, "*"),          # "*": the kind passes through unchanged
    (GETITEM, "*", lambda a: _only_new_axes(a["index"]), "*"),
)
# How a mask kind enters the scores: (op, mask kind, condition on the op's args).
MASK_USES: tuple[tuple[OpSpec, str, Callable[[dict], bool]], ...] = (
    (ADD, "additive_causal", lambda a: True),
    (MASKED_FILL, "drop_causal", lambda a: a["value"] == _NEG_INF),
)
UPCASTS = (FLOAT, TO, TYPE_AS)
SCORE_SCALES = ((MUL, lambda c: c), (DIV, lambda c: 1.0 / c))


def _only_new_axes(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return all(i is None or i == slice(None) or i is Ellipsis for i in items)


def _bind_any(node: Any, specs) -> tuple[Optional[OpSpec], Optional[dict]]:
    if isinstance(node, fx.Node):
        for spec in specs:
            args = spec.bind(node)
            if args is not None:
                return spec, args
    return None, None


# --- fake values ------------------------------------------------------------------------------

def _val(node: Any):
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("val", node.meta.get("example_value"))
    return value if isinstance(value, torch.Tensor) else None


def _static(size) -> Optional[int]:
    return None if _compat.is_symbolic(size) else int(size)


# --- matching ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Site:
    """One attention to replace: its inputs, options and the nodes that become dead."""

    anchor: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    scale: float
    causal: bool
    internal: list[fx.Node]  # scores/probabilities: nothing outside the pattern may read them


class Refused(Exception):
    """A candidate attention that cannot be proven equivalent; the message says why."""


def _check_qkv(q: fx.Node, k: fx.Node, v: fx.Node, where: str) -> None:
    qv, kv, vv = _val(q), _val(k), _val(v)
    if qv is None or kv is None or vv is None:
        raise Refused(f"{where}: q/k/v carry no fake value (meta['val'/'example_value'])")
    if qv.dim() != 4 or kv.dim() != 4 or vv.dim() != 4:
        raise Refused(f"{where}: inputs are not 4-D [B, H, S, D] (q {tuple(qv.shape)}, "
                      f"k {tuple(kv.shape)}); only that layout is sharded in dim 2")
    if kv.shape != vv.shape or qv.shape[2] != kv.shape[2]:
        raise Refused(f"{where}: query length {qv.shape[2]} and key length {kv.shape[2]} differ "
                      "(cross attention or a KV cache), which a sequence shard cannot express")
    if qv.shape[1] != kv.shape[1] and (_static(qv.shape[1]) is None or _static(kv.shape[1]) is None
                                       or qv.shape[1] % kv.shape[1]):
        raise Refused(f"{where}: {qv.shape[1]} query heads are not a multiple of {kv.shape[1]} "
                      "key/value heads")


def _strip_repeat(node: fx.Node) -> Optional[fx.Node]:
    """k0 where ``node`` repeats the heads of k0 [B, Hkv, S, D] (GQA written out), else None."""
    spec, args = _bind_any(node, (REPEAT_INTERLEAVE,))
    if spec is not None and isinstance(args["repeats"], int) and args["dim"] in (1, -3):
        source = _val(args["input"])
        return args["input"] if source is not None and source.dim() == 4 else None
    # k0[:, :, None] (or unsqueeze(2)) .expand(B, Hkv, n, S, D) .reshape(B, Hq, S, D) / flatten(1, 2)
    spec, args = _bind_any(node, (RESHAPE, FLATTEN))
    _, expanded = _bind_any(args["input"], (EXPAND,)) if spec is not None else (None, None)
    _, unsqueezed = _bind_any(expanded["input"], (UNSQUEEZE, GETITEM)) if expanded else (None, None)
    if unsqueezed is None:
        return None
    source, grouped = _val(unsqueezed["input"]), _val(args["input"])
    if (source is None or grouped is None or source.dim() != 4 or grouped.dim() != 5
            or tuple(grouped.shape[:2]) != tuple(source.shape[:2])
            or tuple(grouped.shape[3:]) != tuple(source.shape[2:])):
        return None
    return unsqueezed["input"]


def _strip_gqa_repeat(k: fx.Node, v: fx.Node) -> tuple[fx.Node, fx.Node]:
    k0, v0 = _strip_repeat(k), _strip_repeat(v)
    if k0 is None or v0 is None or _val(k0).shape != _val(v0).shape:
        return k, v
    return k0, v0


def _match_sdpa(node: fx.Node) -> Optional[Site]:
    args = SDPA.bind(node)
    if args is None:
        return None
    where = f"{node.name} (scaled_dot_product_attention)"
    if args["attn_mask"] is not None:
        raise Refused(f"{where}: has an attn_mask, which cannot be proven causal; use is_causal=True")
    if not (isinstance(args["dropout_p"], (int, float)) and args["dropout_p"] == 0):
        raise Refused(f"{where}: dropout_p={args['dropout_p']!r}; sequence-parallel attention has "
                      "no dropout (set it to 0.0)")
    if not isinstance(args["is_causal"], bool):
        raise Refused(f"{where}: is_causal is not a constant")
    q, k, v = args["query"], args["key"], args["value"]
    _check_qkv(q, k, v, where)
    scale = args["scale"]
    if scale is None:
        head_dim = _static(_val(q).shape[-1])
        if head_dim is None:
            raise Refused(f"{where}: the head dim is symbolic, so the default scale is unknown")
        scale = 1.0 / math.sqrt(head_dim)
    if not isinstance(scale, (int, float)):
        raise Refused(f"{where}: scale {scale!r} is not a constant")
    k, v = _strip_gqa_repeat(k, v)
    return Site(node, q, k, v, float(scale), args["is_causal"], [])


def _strip_upcast(node: Any) -> Any:
    """The source of an exact upcast to float32 (from bf16/fp16/fp32), else ``node`` itself."""
    spec, args = _bind_any(node, UPCASTS)
    if spec is None:
        return node
    value, source = _val(node), _val(args["input"])
    if (value is not None and source is not None and value.dtype == torch.float32
            and source.dtype in (torch.float16, torch.bfloat16, torch.float32)):
        return args["input"]
    return node


def _mask_kind(node: Any) -> Optional[str]:
    if not isinstance(node, fx.Node):
        return None
    for spec, input_kind, condition, out_kind in MASK_RULES:
        args = spec.bind(node)
        if args is None or not condition(args):
            continue
        if input_kind is None:
            return out_kind
        inner = _mask_kind(args["input"])
        if inner is not None and (input_kind == "*" or inner == input_kind):
            return inner if out_kind == "*" else out_kind
    return None


def _is_square_mask(mask: fx.Node, scores: fx.Node) -> bool:
    mask_val, scores_val = _val(mask), _val(scores)
    return (mask_val is not None and scores_val is not None and mask_val.dim() >= 2
            and tuple(mask_val.shape[-2:]) == tuple(scores_val.shape[-2:])
            and all(size == 1 for size in mask_val.shape[:-2]))


def _match_decomposed(node: fx.Node) -> Optional[Site]:
    """From the final matmul back to matmul(q, k^T); None when ``node`` is not attention."""
    pv = MATMUL.bind(node)
    if pv is None:
        return None
    internal: list[fx.Node] = []
    probs = pv["input"]
    while True:  # casts and dropout between softmax and the value matmul
        spec, args = _bind_any(probs, UPCASTS + (DROPOUT,))
        if spec is None:
            break
        if spec is DROPOUT:
            if args["p"] != 0 and args["training"] is not False:
                raise Refused(f"{node.name} (decomposed attention): dropout on the attention "
                              "probabilities; sequence-parallel attention has none")
        internal.append(probs)
        probs = args["input"]
    soft = SOFTMAX.bind(probs) if isinstance(probs, fx.Node) else None
    if soft is None:
        return None
    where = f"{node.name} (decomposed attention)"
    internal.append(probs)
    scores_val = _val(probs)
    if scores_val is None or soft["dim"] not in (-1, scores_val.dim() - 1):
        raise Refused(f"{where}: softmax is not over the last (key) dimension")
    scale, causal = 1.0, False
    scores = soft["input"]
    while True:  # casts, scaling and the mask between the score matmul and softmax
        internal.append(scores)
        spec, args = _bind_any(scores, UPCASTS)
        if spec is not None:
            scores = args["input"]
            continue
        spec, args = _bind_any(scores, (MUL, DIV, ADD, MASKED_FILL))
        if spec is None:
            break
        chain, other = args["input"], args.get("other", args.get("mask"))
        if spec in (MUL, ADD) and not _has_shape(chain, scores_val) and _has_shape(other, scores_val):
            chain, other = other, chain
        if spec in (MUL, DIV):
            if not isinstance(other, (int, float)) or other <= 0:
                # A tensor scale is not provably uniform; a non-positive one turns a -inf mask
                # applied before it into +inf or nan.
                raise Refused(f"{where}: scores are scaled by {getattr(other, 'name', other)!r}, "
                              "not a positive constant")
            scale *= dict(SCORE_SCALES)[spec](float(other))
        else:
            use = next((u for u in MASK_USES if u[0] is spec and u[2](args)), None)
            if (causal or use is None or _mask_kind(other) != use[1]
                    or not _is_square_mask(other, scores)):
                raise Refused(f"{where}: the mask {getattr(other, 'name', other)!r} is not an "
                              "in-graph causal mask of the scores' shape (triu(full(-inf), 1) "
                              "added, or masked_fill(~tril(ones), -inf)); it cannot be proven "
                              "causal")
            causal = True
        scores = chain
    internal.pop()  # ``scores`` is the q k^T matmul itself, appended last
    qk = MATMUL.bind(scores) if isinstance(scores, fx.Node) else None
    if qk is None:
        raise Refused(f"{where}: the scores do not come from matmul(q, k^T)")
    internal.append(scores)
    q, key_t = qk["input"], qk["other"]
    spec, args = _bind_any(q, (MUL,))
    if spec is not None and isinstance(args["other"], (int, float)) and args["other"] > 0:
        scale *= float(args["other"])
        q = args["input"]
    k = _untranspose(key_t)
    if k is None:
        raise Refused(f"{where}: the key operand is not k.transpose(-2, -1)")
    v = pv["other"]
    stripped = [_strip_upcast(x) for x in (q, k, v)]
    if len({_val(x).dtype for x in stripped if _val(x) is not None}) == 1:
        q, k, v = stripped
    _check_qkv(q, k, v, where)
    k, v = _strip_gqa_repeat(k, v)
    return Site(node, q, k, v, scale, causal, internal)


def _has_shape(arg: Any, like: torch.Tensor) -> bool:
    value = _val(arg)
    return value is not None and tuple(value.shape) == tuple(like.shape)


def _untranspose(node: Any) -> Optional[fx.Node]:
    value = _val(node)
    if value is None:
        return None
    rank = value.dim()
    last_two = {rank - 2, rank - 1}
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target is getattr and \
            node.args[1] == "mT":
        return node.args[0]
    spec, args = _bind_any(node, (TRANSPOSE,))
    if spec is not None and {args["dim0"] % rank, args["dim1"] % rank} == last_two:
        return args["input"]
    spec, args = _bind_any(node, (PERMUTE,))
    if spec is not None and tuple(d % rank for d in args["dims"]) == tuple(range(rank - 2)) + (
            rank - 1, rank - 2):
        return args["input"]
    return None


MATCHERS: tuple[Callable[[fx.Node], Optional[Site]], ...] = (_match_sdpa, _match_decomposed)


# --- rewrite ----------------------------------------------------------------------------------

def _fake_result(site: Site, group_name: str, load_balance: bool):
    q, k, v = (_val(x) for x in (site.q, site.k, site.v))
    with q.fake_mode:
        return torch.ops.graphopt.sp_attention.default(q, k, v, site.scale, site.causal,
                                                       group_name, load_balance)


def _set_meta(node: fx.Node, value, keys: tuple[str, ...]) -> None:
    for key in keys:
        node.meta[key] = value


def _rewrite(gm: fx.GraphModule, site: Site, group_name: str, load_balance: bool) -> None:
    graph = gm.graph
    anchor = site.anchor
    keys = ("val", "example_value") if "example_value" in anchor.meta else ("val",)
    out_val, lse_val = _fake_result(site, group_name, load_balance)
    with graph.inserting_before(anchor):
        call = graph.call_function(torch.ops.graphopt.sp_attention.default,
                                   (site.q, site.k, site.v, site.scale, site.causal, group_name,
                                    load_balance))
        _set_meta(call, (out_val, lse_val), keys)
        out = graph.call_function(operator.getitem, (call, 0))
        _set_meta(out, out_val, keys)
        wanted = _val(anchor)
        if wanted is not None and wanted.dtype != out_val.dtype:
            out = graph.call_method("to", (out, wanted.dtype))
            _set_meta(out, _cast_fake(out_val, wanted.dtype), keys)
    for key in ("nn_module_stack", "source_fn_stack", "stack_trace"):
        if key in anchor.meta:
            call.meta[key] = anchor.meta[key]
    anchor.replace_all_uses_with(out)
    _erase_dead([anchor] + list(reversed(_topological(graph, site.internal))))


def _erase_dead(nodes: list[fx.Node]) -> None:
    """Erase ``nodes`` once unused, then every pure computation that only they read (the mask,
    k^T, upcasts, GQA repeats)."""
    pending, erased = list(nodes), set()
    while pending:
        node = pending.pop(0)
        if node in erased or node.users or node.op not in ("call_function", "call_method") \
                or node.is_impure():
            continue
        inputs = list(node.all_input_nodes)
        node.graph.erase_node(node)
        erased.add(node)
        pending += inputs


def _cast_fake(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    with value.fake_mode:
        return value.to(dtype)


def _topological(graph: fx.Graph, nodes: list[fx.Node]) -> list[fx.Node]:
    order = {node: i for i, node in enumerate(graph.nodes)}
    return sorted({n for n in nodes if n in order}, key=order.__getitem__)


def _internal_used_outside(site: Site) -> Optional[fx.Node]:
    """A score/probability node of the pattern that something besides the pattern reads."""
    members = set(site.internal) | {site.anchor}
    return next((node for node in site.internal if any(u not in members for u in node.users)), None)


def _find_sites(graph: fx.Graph) -> tuple[list[Site], list[str]]:
    sites, refusals = [], []
    for node in list(graph.nodes):
        if node.op not in ("call_function", "call_method"):
            continue
        for matcher in MATCHERS:
            try:
                site = matcher(node)
            except Refused as reason:
                refusals.append(str(reason))
                break
            if site is not None:
                sites.append(site)
                break
    return sites, refusals


def shard_attention(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Replace every provably-equivalent attention with graphopt::sp_attention over sp_group.

    Subgraphs of higher-order ops (the body of a ``torch.utils.checkpoint`` region) are rewritten
    too. A plain checkpoint region that now holds the op gets ``checkpoint_context_fn`` as its
    policy (recompute everything but attention's (out, lse)), so the backward never runs attention
    forward; a region with the user's own policy keeps it (noted in the stats).
    """
    from graphopt.ops.sp_attention import checkpoint_context_fn

    modules = [m for _, m in gm.named_modules() if isinstance(m, fx.GraphModule)]
    found = [(module, *_find_sites(module.graph)) for module in modules]
    refusals = [reason for _, _, reasons in found for reason in reasons]
    if any(sites for _, sites, _ in found) and not (dist.is_available() and dist.is_initialized()):
        refusals += [f"{s.anchor.name}: torch.distributed is not initialised; call "
                     "torch.distributed.init_process_group before running the compiled model"
                     for _, sites, _ in found for s in sites]
        found = []
    has_sites = any(sites for _, sites, _ in found)
    group_name = _compat.group_name(ctx.config.sp_group) if has_sites else ""
    replaced, rewritten = 0, []
    for module, sites, _ in found:
        changed = False
        for site in sites:
            outside = _internal_used_outside(site)
            if outside is not None:
                refusals.append(f"{site.anchor.name}: {outside.name} (an intermediate of the "
                                "attention) is used outside it; the sharded op does not produce it")
                continue
            _rewrite(module, site, group_name, ctx.config.sp_load_balance)
            changed = True
            replaced += 1
        if changed:
            module.graph.lint()
            rewritten.append(module)
            if module is not gm:
                module.recompile()
    stats = {"replaced": replaced, "refused": len(refusals)}
    for body in _compat.checkpoint_regions(gm):
        if not any(m is body for m in rewritten):
            continue
        if _compat.checkpoint_region_context_fn(body) is None:
            _compat.set_checkpoint_region_context_fn(body, checkpoint_context_fn)
            stats["checkpoint_regions_saving_attention"] = stats.get(
                "checkpoint_regions_saving_attention", 0) + 1
        else:
            stats.setdefault("checkpoint_regions_with_user_policy", []).append(
                "a user context_fn decides whether graphopt.sp_attention is recomputed; make it "
                "return MUST_SAVE for it (graphopt.ops.sp_attention.checkpoint_policy)")
    log.debug("replaced %d attention(s), refused %d", replaced, len(refusals))
    return PassResult(gm, modified=replaced > 0, matched=replaced, stats=stats, refusals=refusals)
