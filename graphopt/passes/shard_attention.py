"""shard_attention: every attention of a sequence-sharded graph -> graphopt::sp_attention.

Stage "pre_grad" (Dynamo's torch IR). Each rank runs the model on its contiguous slice of the
sequence; this pass makes every attention span the whole sequence over ``config.sp_group``::

    before                                          after
    o = F.scaled_dot_product_attention(             r = graphopt.sp_attention(q, k0, v0, positions,
            q, k, v, attn_mask=m, is_causal=c,              scale, causal, window, group_name,
            scale=s, enable_gqa=g)                          load_balance, split_diagonal, kernel,
                                                            peer_timeout_s)
    s = matmul(q, k.transpose(-2, -1)) * scale      o = r[0]   (.to(o's dtype) where it differs)
    p = softmax(s + m | s.masked_fill(m, -inf))
    o = matmul(p, v)

The mask m -- transformers' [B, 1, S, S] boolean or additive mask, a triu/tril construction, or
none -- must be proven (``graphopt.analysis.attention_masks``) to be causal, causal with a sliding
window, causal within packed documents (then ``positions``, this rank's chunk of the position ids
whose restarts delimit the documents, goes to the op), or no mask at all. k0, v0: where k and v
repeat the heads of fewer key/value heads, the op takes the unrepeated ones, so only Hkv heads
travel. The options besides the tensors come from the compile's config snapshot
(``sp_load_balance``, ``sp_split_diagonal``, ``attention_kernel``, ``sp_peer_timeout_s``): nothing
reads graphopt.config when the op runs.

Safe because the op computes the same function over the gathered sequence (the contract: rank r
holds tokens [r*S/P, (r+1)*S/P) of q, k, v in dim 2, the model gets global position ids), in
float32 with a log-sum-exp merge: the result matches softmax attention within the input dtype's
rounding.

Never silently local: an attention this pass cannot rewrite -- dropout > 0, a mask that cannot be
proven, cross attention, a layout other than [B, H, S, D], probabilities used elsewhere, a scale
that is a tensor, torch.distributed not initialised -- would see only the rank's own chunk, so the
compile fails (:class:`UnshardedAttentionError`) naming its module, source line, reason and fix. An
attention meant to stay local (an encoder's, a vision tower's) is declared with
``graphopt.config.sp_local_attention`` (module-path patterns) and left as it is.

Attention inside ``torch.utils.checkpoint`` regions (higher-order-op subgraphs) is rewritten too; a
plain region that now holds the op gets graphopt's checkpoint policy, so recomputing the region
reuses the op's saved (out, lse) instead of running distributed attention again.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging

import torch
import torch.distributed as dist
import torch.fx as fx

from graphopt import _compat
from graphopt.analysis.attention_masks import MaskAnalysis, MaskStructure, Unproven
from graphopt.analysis.attention_sites import AttentionSite, find_attention
from graphopt.analysis.torch_ir import fake_value, module_path, module_type, source_line
from graphopt.passes.graph_edits import (erase_dead, fake_args, fake_mode_of, insert_call,
                                         meta_keys, output_of, positions_arg, topological)
from graphopt.passes.manager import PassContext, PassResult

log = logging.getLogger("graphopt.passes.shard_attention")


class UnshardedAttentionError(RuntimeError):
    """Attentions that sequence parallelism would run locally; the message names each one's source
    line, the reason and the fix."""


@dataclasses.dataclass
class _Problem:
    node: fx.Node
    reason: str
    fix: str

    def describe(self) -> str:
        where = module_path(self.node)
        module = f"{where} ({module_type(self.node)}), " if where else ""
        return (f"  - {module}node {self.node.name} at {source_line(self.node)}\n"
                f"    {self.reason}\n    fix: {self.fix}")


def _local_fix(node: fx.Node) -> str:
    path = module_path(node)
    pattern = repr(path) if path else "its module path"
    return (f"or, if it is meant to see only this rank's chunk, add {pattern} to "
            "graphopt.config.sp_local_attention")


def _is_declared_local(node: fx.Node, patterns: tuple) -> bool:
    path = module_path(node)
    return bool(path) and any(fnmatch.fnmatchcase(path, pattern) for pattern in patterns)


class _Failure(Exception):
    def __init__(self, node: fx.Node, reason: str, fix: str):
        super().__init__(reason)
        self.problem = _Problem(node, reason, fix)


@dataclasses.dataclass
class _Plan:
    site: AttentionSite
    structure: MaskStructure


def _plan(site: AttentionSite, analysis: MaskAnalysis) -> _Plan:
    """What the op needs for ``site``; raises _Failure (reason and fix) where it cannot."""
    anchor = site.anchor
    q, k = fake_value(site.q), fake_value(site.k)
    if q.shape[2] != k.shape[2]:
        raise _Failure(anchor, f"queries ({q.shape[2]}) and keys ({k.shape[2]}) differ in length: "
                       "cross attention or a KV cache, whose keys are not this rank's chunk of "
                       "the same sequence", "train without a KV cache (use_cache=False) "
                       + _local_fix(anchor))
    if not isinstance(site.scale, float):
        raise _Failure(anchor, f"its scale {site.scale.name} is computed in the graph, not a "
                       "constant (torch.compile(dynamic=True) makes a module's float attributes "
                       "symbolic)", "compile with dynamic=False or None (the default) "
                       + _local_fix(anchor))
    if not (isinstance(site.dropout_p, (int, float)) and site.dropout_p == 0):
        raise _Failure(anchor, f"attention dropout p={site.dropout_p!r}: sequence-parallel "
                       "attention has no dropout", "set the attention dropout to 0.0 (transformers: "
                       "config.attention_dropout = 0.0) " + _local_fix(anchor))
    try:
        structure = site.mask_structure(analysis)
    except Unproven as unproven:
        where = unproven.node or anchor
        raise _Failure(anchor, f"its mask cannot be proven causal, sliding-window or "
                       f"document-causal: {where.name}: {unproven.reason}",
                       "pass is_causal=True, or build the mask from positions as transformers "
                       "does (causal, sliding window, packed documents from position_ids), "
                       + _local_fix(anchor)) from None
    outside = site.probabilities_used_outside()
    if outside is not None:
        raise _Failure(anchor, f"{outside.name} (scores or probabilities of the attention) is "
                       "used outside it; the sharded op does not produce them",
                       "do not return attention weights (transformers: output_attentions=False) "
                       + _local_fix(anchor))
    return _Plan(site, structure)


def _rewrite(gm: fx.GraphModule, plan: _Plan, group_name: str, config) -> None:
    site, structure = plan.site, plan.structure
    graph, anchor = gm.graph, site.anchor
    keys = meta_keys(anchor)
    with graph.inserting_before(anchor):
        positions = positions_arg(graph, structure.documents, keys, anchor)
        args = (site.q, site.k_heads, site.v_heads, positions, site.scale, structure.causal,
                structure.window or 0, group_name, config.sp_load_balance,
                config.sp_split_diagonal, config.attention_kernel,
                float(config.sp_peer_timeout_s))
        op = torch.ops.graphopt.sp_attention.default

        def fake():
            with fake_mode_of(site.q):
                return op(*fake_args(args))
        call = insert_call(graph, op, args, None, fake, keys, anchor)
        out = output_of(graph, call, fake_value(anchor), keys, anchor)
    anchor.replace_all_uses_with(out)
    erase_dead([anchor] + list(reversed(topological(graph, site.internal))))


def _graph_modules(gm: fx.GraphModule) -> list[fx.GraphModule]:
    return [m for _, m in gm.named_modules() if isinstance(m, fx.GraphModule)]


def shard_attention(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Replace every attention with graphopt::sp_attention over sp_group, or fail the compile.

    Subgraphs of higher-order ops (the body of a ``torch.utils.checkpoint`` region) are rewritten
    too. A plain checkpoint region that now holds the op gets ``checkpoint_context_fn`` as its
    policy (recompute everything but attention's (out, lse)), so the backward never runs attention
    forward; a region with the user's own policy keeps it (noted in the stats).
    """
    import graphopt.ops.sp_attention  # noqa: F401  registers graphopt::sp_attention
    from graphopt.ops.sp_attention import checkpoint_context_fn

    config = ctx.config
    local_patterns = tuple(config.sp_local_attention)
    problems: list[_Problem] = []
    plans: list[tuple[fx.GraphModule, _Plan]] = []
    kept_local: list[str] = []
    for module in _graph_modules(gm):
        sites, refusals = find_attention(module.graph)
        analysis = MaskAnalysis(module.graph)
        for refusal in refusals:
            if _is_declared_local(refusal.node, local_patterns):
                kept_local.append(refusal.node.name)
                continue
            problems.append(_Problem(refusal.node, f"an attention graphopt cannot read: "
                                     f"{refusal.reason}", "write it as F.scaled_dot_product_"
                                     "attention on [B, H, S, D] tensors " + _local_fix(
                                         refusal.node)))
        for site in sites:
            if _is_declared_local(site.anchor, local_patterns):
                kept_local.append(site.anchor.name)
                continue
            try:
                plans.append((module, _plan(site, analysis)))
            except _Failure as failure:
                problems.append(failure.problem)
    if plans and not (dist.is_available() and dist.is_initialized()):
        problems += [_Problem(plan.site.anchor, "torch.distributed is not initialised, so there "
                              "is no sequence-parallel group", "call torch.distributed."
                              "init_process_group before running the compiled model, or turn "
                              "graphopt.config.sequence_parallel_attention off")
                     for _, plan in plans]
    if problems:
        raise UnshardedAttentionError(
            f"graphopt: sequence_parallel_attention is on, but {len(problems)} attention(s) "
            "cannot run across the sequence; left as they are, each rank would attend only to "
            "its own chunk (wrong results, no error):\n"
            + "\n".join(problem.describe() for problem in problems))
    group_name = _compat.group_name(config.sp_group) if plans else ""
    rewritten: list[fx.GraphModule] = []
    kinds: dict[str, int] = {}
    for module, plan in plans:
        _rewrite(module, plan, group_name, config)
        kinds[plan.structure.kind] = kinds.get(plan.structure.kind, 0) + 1
        if not any(m is module for m in rewritten):
            rewritten.append(module)
    for module in rewritten:
        module.graph.lint()
        if module is not gm:
            module.recompile()
    stats = {"replaced": len(plans), "masks": kinds}
    if kept_local:
        stats["kept_local (config.sp_local_attention)"] = kept_local
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
    log.debug("replaced %d attention(s), kept %d local", len(plans), len(kept_local))
    return PassResult(gm, modified=bool(plans), matched=len(plans), stats=stats,
                      refusals=[f"{name}: kept local (config.sp_local_attention)"
                                for name in kept_local])
