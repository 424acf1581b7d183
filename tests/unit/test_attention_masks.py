"""The mask analysis on the graphs models build: what it proves must be what the mask computes.

Every proven structure is checked against the mask's actual values (the captured graph run on its
example inputs), so a wrong proof fails here, not in a model's numerics.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from attention_helpers import tiny_model, transformers_version
from graphopt.analysis.attention_masks import MaskAnalysis, MaskStructure, Unproven
from graphopt.analysis.attention_sites import find_attention

transformers = pytest.importorskip("transformers")
ISOLATES_DOCUMENTS = transformers_version() >= (4, 53)  # see attention_helpers

S = 16


def capture(fn, *args, **kwargs):
    """(Dynamo's graph of fn, example inputs); one graph, static shapes."""
    captured = []

    def backend(gm, example_inputs):
        captured.append((gm, example_inputs))
        return gm.forward

    torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)(*args, **kwargs)
    assert len(captured) == 1
    return captured[0]


class _Recorder(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.values = {}

    def run_node(self, node):
        value = super().run_node(node)
        self.values[node] = value
        return value


def concrete_values(gm, inputs) -> dict:
    recorder = _Recorder(gm)
    with torch.no_grad():
        recorder.run(*inputs)
    return recorder.values


def expected_allowed(structure: MaskStructure, batch: int, seq: int, positions=None):
    """[B, S, S] booleans the structure says the mask lets through."""
    q = torch.arange(seq)[:, None]
    k = torch.arange(seq)[None, :]
    allowed = torch.ones(batch, seq, seq, dtype=torch.bool)
    if structure.causal:
        allowed &= k <= q
    if structure.window:
        allowed &= q - k < structure.window
    if structure.documents is not None:
        rows = positions if positions.dim() == 2 else positions[None]
        if structure.documents.row is not None:
            rows = rows[structure.documents.row:structure.documents.row + 1]
        new = torch.ones_like(rows, dtype=torch.bool)
        new[:, 1:] = rows[:, 1:] - rows[:, :-1] != 1
        ids = new.cumsum(-1).expand(batch, -1)
        allowed &= ids[:, :, None] == ids[:, None, :]
    return allowed


def actual_allowed(site, values) -> torch.Tensor:
    """[B, S, S] (head 0) booleans the site's mask actually lets through."""
    mask = values[site.mask.node]
    if site.mask.use == "keep":
        allowed = mask.bool()
    elif site.mask.use == "drop":
        allowed = ~mask.bool()
    else:
        allowed = mask * site.mask.value_scale > -65504.0
    return allowed.expand(site.scores_shape())[:, 0]


def proven_sites(gm, inputs):
    """[(site, structure)] of every attention, each structure checked against the mask's values."""
    sites, refusals = find_attention(gm.graph)
    assert not refusals, [r.describe() for r in refusals]
    analysis = MaskAnalysis(gm.graph)
    values = concrete_values(gm, inputs)
    proven = []
    for site in sites:
        structure = site.mask_structure(analysis)
        if site.mask is not None:
            batch, _, seq, _ = site.scores_shape()
            positions = (values[structure.documents.positions]
                         if structure.documents is not None else None)
            assert torch.equal(actual_allowed(site, values),
                               expected_allowed(structure, batch, seq, positions)), structure
        proven.append((site, structure))
    return proven


# --- transformers models, as users compile them ---------------------------------------------------

PACKED = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3])


@pytest.mark.parametrize("kind, attn, packing, batch, expected", [
    ("llama", "sdpa", None, 1, "causal"),
    ("llama", "eager", None, 2, "causal"),
    ("mistral", "sdpa", None, 1, "causal + window 5"),
    ("mistral", "eager", None, 1, "causal + window 5"),
    ("llama", "sdpa", "shared", 1, "causal + documents"),
    ("llama", "eager", "per_row", 2, "causal + documents"),
    ("mistral", "sdpa", "per_row", 2, "causal + documents + window 5"),
])
def test_transformers_masks_are_proven(kind, attn, packing, batch, expected):
    model = tiny_model(kind, attn)
    tokens = torch.randint(0, 64, (batch, S))
    kwargs = dict(use_cache=False)
    if packing == "shared":
        kwargs["position_ids"] = PACKED[None]
    elif packing == "per_row":
        kwargs["position_ids"] = torch.stack([PACKED, PACKED.roll(3)])[:batch]
    gm, inputs = capture(model, tokens, **kwargs)
    proven = proven_sites(gm, inputs)
    assert len(proven) == 2
    if not ISOLATES_DOCUMENTS:
        expected = expected.replace(" + documents", "")
    assert {structure.kind for _, structure in proven} == {expected}
    if packing is not None and ISOLATES_DOCUMENTS:
        documents = proven[0][1].documents
        assert documents.positions.op == "placeholder"
        assert documents.row == (0 if batch == 1 else None)


# --- the constructions of other versions, written out ---------------------------------------------

def _v451_eager(q, k, v):
    """transformers 4.4x-4.52: triu(full(min), 1) times arange > cache_position, sliding window by
    an in-place or, added to the scores."""
    cache_position = torch.arange(0, S)
    mask = torch.full((S, S + 1), torch.finfo(torch.float32).min)
    attend_later = torch.arange(S + 1) > cache_position.reshape(-1, 1)
    too_far = torch.arange(S + 1) <= cache_position.reshape(-1, 1) - 4
    attend_later.bitwise_or_(too_far)
    mask *= attend_later
    mask = mask[None, None, :, :].expand(1, 1, -1, -1)[:, :, :, :S]
    scores = torch.matmul(q, k.transpose(2, 3)) * 0.25 + mask
    return torch.matmul(F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def _v457_vmap(q, k, v):
    """transformers 4.53-4.57: the mask function vmapped over batch, head, q and kv indices."""
    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    fn = causal
    for dims in [(None, None, None, 0), (None, None, 0, None), (None, 0, None, None),
                 (0, None, None, None)]:
        fn = torch.vmap(fn, in_dims=dims, out_dims=0)
    mask = fn(torch.arange(1), torch.arange(1), torch.arange(S), torch.arange(S))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _bool_tril(q, k, v):
    keep = torch.tril(torch.ones(S, S, dtype=torch.bool))
    scores = (q * 0.25) @ k.mT
    return scores.masked_fill(~keep[None, None], float("-inf")).softmax(-1) @ v


def _all_visible(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(S, S, dtype=torch.bool))


@pytest.mark.parametrize("fn, expected", [
    (_v451_eager, "causal + window 4"),
    (_v457_vmap, "causal"),
    (_bool_tril, "causal"),
    (_all_visible, "none"),
])
def test_other_constructions_are_proven(fn, expected):
    q, k, v = (torch.randn(1, 2, S, 8) for _ in range(3))
    gm, inputs = capture(fn, q, k, v)
    ((_, structure),) = proven_sites(gm, inputs)
    assert structure.kind == expected


# --- what cannot be proven is named ---------------------------------------------------------------

def _padding(q, k, v, padding):  # a padding mask from the batch: data
    keep = torch.ones(S, S, dtype=torch.bool).tril() & padding[:, None, None, :].bool()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


def _off_by_one(q, k, v, _):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(S, S).tril(-1).bool())


def _bidirectional_window(q, k, v, _):
    i = torch.arange(S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(i[:, None] - i[None, :]).abs() < 3)


def _alibi(q, k, v, _):
    i = torch.arange(S)
    bias = (i[None, :] - i[:, None]).float() * 0.5
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def _written_through_view(q, k, v, _):
    keep = torch.ones(S, S, dtype=torch.bool).tril()
    keep[:, :2].fill_(False)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


def _wrapping_index(q, k, v, _):
    i = torch.arange(S)
    shifted = i[i - 1]  # i[-1] wraps to the last position
    return F.scaled_dot_product_attention(q, k, v, attn_mask=i[None, :] <= shifted[:, None])


def _two_documents_unrelated(q, k, v, ids):  # document ids that are data, not position resets
    i = torch.arange(S)
    keep = (i[None, :] <= i[:, None]) & (ids[:, :, None] == ids[:, None, :])[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


@pytest.mark.parametrize("fn, node, reason", [
    (_padding, "keep", "l_padding_"),
    (_off_by_one, "", "keeps only keys where k - q \\+ 1 <= 0"),
    (_bidirectional_window, "", "abs_1"),
    (_alibi, "float", "turns index data k - q into floats"),
    (_written_through_view, "", "through a view"),
    (_wrapping_index, "", "may be out of range"),
    (_two_documents_unrelated, "", "which is not part of"),
])
def test_unprovable_masks_name_the_node_and_the_reason(fn, node, reason):
    q, k, v = (torch.randn(1, 2, S, 8) for _ in range(3))
    gm, _ = capture(fn, q, k, v, torch.randint(0, 2, (1, S)))
    (site,), _ = find_attention(gm.graph)
    with pytest.raises(Unproven, match=reason) as raised:
        site.mask_structure(MaskAnalysis(gm.graph))
    assert raised.value.node is not None and node in raised.value.node.name


def test_sdpa_sites_read_their_options_and_see_through_repeated_heads():
    def fn(q, k, v):
        k = k[:, :, None].expand(1, 2, 2, S, 8).reshape(1, 4, S, 8)
        return F.scaled_dot_product_attention(q, k, v.repeat_interleave(2, dim=1), is_causal=True,
                                              scale=0.3)
    gm, _ = capture(fn, torch.randn(1, 4, S, 8), torch.randn(1, 2, S, 8), torch.randn(1, 2, S, 8))
    (site,), refusals = find_attention(gm.graph)
    assert not refusals and site.form == "sdpa" and site.is_causal and math.isclose(site.scale, 0.3)
    assert site.k_heads.meta["example_value"].shape[1] == 2 and site.mask is None
