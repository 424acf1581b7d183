"""specialize_attention_masks: an attention whose mask is proven structured -> the kernel for it.

Stage "pre_grad" (Dynamo's torch IR). Under torch.compile, transformers materialises its mask
([B, 1, S, S], boolean for sdpa, additive for eager attention) instead of passing is_causal, so SDPA
runs cuDNN / flash with a dense mask: at S = 16K on one H100 a layer's attention took 4x the time of
the causal kernel. Where ``graphopt.analysis.attention_masks`` proves what the mask is::

    before                                         after
    m = <mask built from positions>                (m erased once nothing reads it)
    o = F.sdpa(q, k, v, attn_mask=m)               o = F.sdpa(q, k, v, is_causal=True)       causal
    o = matmul(softmax(q k^T * s + m), v)          o = F.sdpa(q, k, v, is_causal=True, scale=s)
    o = F.sdpa(q, k, v, attn_mask=m)               r = graphopt.flash_attention(q, k0, v0, s, True,
    (or the decomposed form)                               window, positions, kernel)
                                                   o = r[0]       sliding window / packed documents
    o = F.sdpa(q, k, v, attn_mask=all_true)        o = F.sdpa(q, k, v)                 every key seen

k0, v0: the key/value heads before a grouped-query repeat (graphopt's kernels read them in place).
``graphopt.flash_attention`` runs graphopt's Triton kernels on CUDA, which skip the key blocks the
window or the documents hide, and a float32 reference on CPU; with documents, where each row holds
a single document it runs torch's cuDNN kernels as plain causal attention. Which it is, the host
learns once per step, ahead of the attention: with ``attention_kernel="auto"`` the positions pass
through ``p1 = graphopt.checked_positions(p)``, inserted where ``p`` enters the graph (after the
last placeholder, or after the node computing it), which starts the check and its copy to the host
before any other copy is queued (offloaded activations are hundreds of MiB), so no attention waits
on the host for the stream::

    p = placeholder / op                           p = placeholder / op
                                                   p1 = graphopt.checked_positions(p)
    ...                                            ...
    r = graphopt.flash_attention(..., p, ...)      r = graphopt.flash_attention(..., p1, ...)

Safe because the replacement computes the same function (the mask's proof is exact; an additive
mask's masked value v <= -65504 gives weight exp(v + s - max) = 0 in float32, see the analysis),
within the rounding of the attention's dtype: SDPA's kernels and graphopt's compute the softmax in
float32 like transformers' eager attention, and the output is cast to the dtype it had.

Left unchanged, with the reason recorded: a mask that cannot be proven (padding masks from the
batch, biases such as ALiBi, bidirectional windows); dropout > 0 where the replacement would draw
different random numbers (decomposed attention, or a window / document mask); a window / document
mask on CUDA the Triton kernels do not take (head dim > 128, a dtype other than fp16 / bf16 / fp32).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.fx as fx
import torch.nn.functional as F

from graphopt.analysis.attention_masks import Documents, MaskAnalysis, MaskStructure, Unproven
from graphopt.analysis.attention_sites import SDPA, AttentionSite, find_attention
from graphopt.analysis.torch_ir import fake_value
from graphopt.passes.graph_edits import (erase_dead, fake_args, fake_mode_of, insert_call,
                                         meta_keys, output_of, positions_arg, topological)
from graphopt.passes.manager import PassContext, PassResult

log = logging.getLogger("graphopt.passes.specialize_attention_masks")

TRITON_MAX_HEAD_DIM = 128
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class _Leave(Exception):
    """The site stays as it is; the message says why."""


def _no_dropout(site: AttentionSite, what: str) -> None:
    if not (isinstance(site.dropout_p, (int, float)) and site.dropout_p == 0):
        raise _Leave(f"attention dropout p={site.dropout_p!r}: {what} would draw other random "
                     "numbers")


def _sdpa_in_place(site: AttentionSite, causal: bool) -> None:
    """The SDPA call itself, without its mask (is_causal=True where the mask was causal)."""
    args = SDPA.bind(site.anchor)
    kwargs = dict(attn_mask=None, dropout_p=args["dropout_p"], is_causal=causal,
                  scale=args["scale"])
    if args["enable_gqa"]:
        kwargs["enable_gqa"] = True
    site.anchor.args = (site.q, site.k, site.v)
    site.anchor.kwargs = kwargs


def _sdpa_for_decomposed(gm: fx.GraphModule, site: AttentionSite, causal: bool) -> fx.Node:
    _no_dropout(site, "SDPA")
    anchor = site.anchor
    keys = meta_keys(anchor)
    args = (site.q, site.k, site.v)
    kwargs = dict(is_causal=causal, scale=site.scale)

    def fake():
        with fake_mode_of(site.q):
            return F.scaled_dot_product_attention(*fake_args(args), **kwargs)
    with gm.graph.inserting_before(anchor):
        call = insert_call(gm.graph, F.scaled_dot_product_attention, args, kwargs, fake, keys,
                           anchor)
        return output_of(gm.graph, call, fake_value(anchor), keys, anchor, index=None)


def _checked(gm: fx.GraphModule, documents: Documents, checked: dict[fx.Node, fx.Node]) -> Documents:
    """``documents`` with its positions passed through ``graphopt::checked_positions``, inserted
    once per positions node, where the positions enter the graph."""
    source = documents.positions
    if source not in checked:
        op = torch.ops.graphopt.checked_positions.default
        after = source
        if source.op == "placeholder":
            after = list(gm.graph.find_nodes(op="placeholder"))[-1]

        def fake():
            with fake_mode_of(source):
                return op(fake_value(source))
        with gm.graph.inserting_after(after):
            checked[source] = insert_call(gm.graph, op, (source,), None, fake, meta_keys(source), source)
    return dataclasses.replace(documents, positions=checked[source])


def _flash_attention(gm: fx.GraphModule, site: AttentionSite, structure: MaskStructure,
                     kernel: str, checked: dict[fx.Node, fx.Node]) -> fx.Node:
    _no_dropout(site, "graphopt's masked kernels")
    if not isinstance(site.scale, float):
        raise _Leave(f"its scale {site.scale.name} is computed in the graph; graphopt's masked "
                     "kernels take a constant (compile with dynamic=False or None)")
    q = fake_value(site.q)
    if q.is_cuda and (q.shape[-1] > TRITON_MAX_HEAD_DIM or q.dtype not in TRITON_DTYPES):
        raise _Leave(f"{structure.kind} mask on CUDA with head dim {q.shape[-1]} and {q.dtype}: "
                     f"graphopt's Triton kernels take head dims up to {TRITON_MAX_HEAD_DIM} in "
                     "fp16 / bf16 / fp32")
    import graphopt.ops.attention  # noqa: F401  registers graphopt::flash_attention
    anchor = site.anchor
    keys = meta_keys(anchor)
    op = torch.ops.graphopt.flash_attention.default
    documents = structure.documents
    if documents is not None and kernel == "auto":  # where cuDNN may run on a single document
        documents = _checked(gm, documents, checked)
    with gm.graph.inserting_before(anchor):
        positions = positions_arg(gm.graph, documents, keys, anchor)
        args = (site.q, site.k_heads, site.v_heads, site.scale, True, structure.window or 0,
                positions, kernel)

        def fake():
            with fake_mode_of(site.q):
                return op(*fake_args(args))
        call = insert_call(gm.graph, op, args, None, fake, keys, anchor)
        return output_of(gm.graph, call, fake_value(anchor), keys, anchor)


def _specialize(gm: fx.GraphModule, site: AttentionSite, structure: MaskStructure,
                kernel: str, checked: dict[fx.Node, fx.Node]) -> str:
    """Rewrites ``site``; returns what it became."""
    anchor = site.anchor
    old_mask = site.mask.node if site.mask is not None else None
    if structure.plain and site.form == "sdpa":
        _sdpa_in_place(site, structure.causal)
        erase_dead([old_mask] if old_mask is not None else [])
        return "sdpa is_causal" if structure.causal else "sdpa without mask"
    if structure.plain:
        out = _sdpa_for_decomposed(gm, site, structure.causal)
        became = "sdpa is_causal" if structure.causal else "sdpa without mask"
    else:
        out = _flash_attention(gm, site, structure, kernel, checked)
        became = f"graphopt.flash_attention ({structure.kind})"
    anchor.replace_all_uses_with(out)
    erase_dead([anchor] + list(reversed(topological(gm.graph, site.internal))))
    return became


def specialize_attention_masks(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Give every attention whose mask is proven the kernel of that mask's structure."""
    refusals: list[str] = []
    became: dict[str, int] = {}
    modules = [m for _, m in gm.named_modules() if isinstance(m, fx.GraphModule)]
    for module in modules:
        sites, unread = find_attention(module.graph)
        refusals += [f"{r.describe()}" for r in unread]
        analysis = MaskAnalysis(module.graph)
        checked: dict[fx.Node, fx.Node] = {}  # positions -> graphopt.checked_positions of them
        changed = False
        for site in sites:
            if site.mask is None:
                continue  # is_causal, or no mask: the kernels already match
            try:
                structure = site.mask_structure(analysis)
                if site.probabilities_used_outside() is not None:
                    raise _Leave("its attention probabilities are used outside it")
                kind = _specialize(module, site, structure, ctx.config.attention_kernel, checked)
            except Unproven as unproven:
                refusals.append(f"{site.describe()}: mask not proven: {unproven}")
                continue
            except _Leave as leave:
                refusals.append(f"{site.describe()}: {leave}")
                continue
            became[kind] = became.get(kind, 0) + 1
            changed = True
        if changed:
            module.graph.lint()
            if module is not gm:
                module.recompile()
    matched = sum(became.values())
    log.debug("specialised %d attention mask(s): %s", matched, became)
    return PassResult(gm, modified=matched > 0, matched=matched, stats={"became": became},
                      refusals=refusals)
