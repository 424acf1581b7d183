"""Which blocks go to torch's cuDNN attention kernels, and that routing them there is exact.

cuDNN runs only on CUDA, so here float64 stand-ins with the kernels' contract take their place: no
sequence offsets, ``is_causal`` masks a square block top-left, the backward derives delta from out.
If graphopt handed them a block whose mask they cannot express, or a delta they would ignore, the
results below would be wrong. tests/gpu/test_flash_attention_gpu.py runs the real kernels.
"""

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_reference import plain_attention

import graphopt.ops.attention as attention


def _repeat(q, k, v):
    group = q.shape[1] // k.shape[1]
    return k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1), group


def _scores(q, k, scale, is_causal):
    s = q.double() @ k.transpose(-1, -2) * scale
    if is_causal:
        s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
    return s


def contract_forward(q, k, v, *, scale, is_causal):
    kr, vr, _ = _repeat(q, k, v)
    s = _scores(q, kr, scale, is_causal)
    return (torch.softmax(s, -1) @ vr).to(q.dtype), torch.logsumexp(s, -1).float()


def contract_backward(q, k, v, out, lse, dout, *, scale, is_causal):
    kr, vr, group = _repeat(q, k, v)
    p = torch.exp(_scores(q, kr, scale, is_causal) - lse.double()[..., None])
    delta = (dout.double() * out.double()).sum(-1, keepdim=True)
    ds = p * (dout.double() @ vr.transpose(-1, -2) - delta) * scale
    dk = (ds.transpose(-1, -2) @ q.double()).unflatten(1, (k.shape[1], group)).sum(2)
    dv = (p.transpose(-1, -2) @ dout.double()).unflatten(1, (k.shape[1], group)).sum(2)
    return (ds @ kr).to(q.dtype), dk.float(), dv.float()


@pytest.fixture
def stand_in(monkeypatch):
    """Route eligible CPU blocks to the contract stand-ins; record (pass, is_causal) per call."""
    calls = []

    def forward(*args, **kwargs):
        calls.append(("fwd", kwargs["is_causal"]))
        return contract_forward(*args, **kwargs)

    def backward(*args, **kwargs):
        calls.append(("bwd", kwargs["is_causal"]))
        return contract_backward(*args, **kwargs)

    monkeypatch.setattr(attention, "_cudnn_supports", lambda q, k: True)
    monkeypatch.setattr(attention, "_cudnn_block_forward", forward)
    monkeypatch.setattr(attention, "_cudnn_block_backward", backward)
    monkeypatch.setattr(attention, "_CUDNN_REFUSED", {})
    return calls


@settings(max_examples=200, deadline=None)
@given(seqlen_q=st.integers(1, 12), seqlen_k=st.integers(1, 12), causal=st.booleans(),
       q_offset=st.integers(0, 20), k_offset=st.integers(0, 20))
def test_block_mask_classes_match_the_causal_mask(seqlen_q, seqlen_k, causal, q_offset, k_offset):
    kind = attention.flash_block_mask(seqlen_q, seqlen_k, causal, q_offset, k_offset)
    q_pos = torch.arange(seqlen_q) + q_offset
    k_pos = torch.arange(seqlen_k) + k_offset
    visible = (k_pos[None, :] <= q_pos[:, None]) if causal else torch.ones(seqlen_q, seqlen_k).bool()
    if kind is False:
        assert visible.all()
    elif kind is True:
        assert torch.equal(visible, torch.ones(seqlen_q, seqlen_q).bool().tril())
    else:  # partial masks are left to graphopt's kernel, and only those
        assert causal and not visible.all()
        assert not (seqlen_q == seqlen_k and q_offset == k_offset)


@pytest.mark.parametrize("heads_kv", [4, 2])
def test_blockwise_attention_through_the_kernel_contract_is_exact(stand_in, heads_kv):
    """A query chunk at offset 8 over keys [0, 16), merged and differentiated block by block: a
    block with every key visible and the diagonal go to the stand-ins; split at 4 instead, the
    partially masked block [4, 16) must not."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 8, 16, generator=gen)
    k, v = (torch.randn(1, heads_kv, 16, 16, generator=gen) for _ in range(2))
    dout = torch.randn(q.shape, generator=gen)
    scale = 0.3
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    out_ref, lse_ref = plain_attention(*leaves, scale, True, q_offset=8)
    out_ref.backward(dout.double())
    for bounds, expected in (([0, 8, 16], [False, True]), ([0, 4, 16], [False])):
        stand_in.clear()
        out_acc, lse_acc = torch.zeros(q.shape), torch.full(q.shape[:3], float("-inf"))
        blocks = list(zip(bounds, bounds[1:]))
        for start, stop in blocks:
            attention.attention_block_forward(q, k[:, :, start:stop], v[:, :, start:stop],
                                              scale=scale, causal=True, q_offset=8,
                                              k_offset=start, out_acc=out_acc, lse_acc=lse_acc)
        torch.testing.assert_close(out_acc.double(), out_ref.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse_acc.double(), lse_ref.detach(), atol=1e-5, rtol=1e-5)
        dq, dk, dv = torch.zeros(q.shape), torch.zeros(k.shape), torch.zeros(v.shape)
        for start, stop in blocks:
            _, dk_b, dv_b = attention.attention_block_backward(
                q, k[:, :, start:stop], v[:, :, start:stop], out_acc, lse_acc, dout, scale=scale,
                causal=True, q_offset=8, k_offset=start, dq_acc=dq)
            dk[:, :, start:stop] += dk_b
            dv[:, :, start:stop] += dv_b
        assert stand_in == [("fwd", c) for c in expected] + [("bwd", c) for c in expected]
        for got, leaf in zip((dq, dk, dv), leaves):
            torch.testing.assert_close(got.double(), leaf.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("groups_refused", [False, True])
def test_grouped_heads_reach_cudnn_unrepeated_or_repeated_where_refused(monkeypatch, caplog,
                                                                        groups_refused):
    """graphopt hands cuDNN K/V with their Hkv heads (it reads head h // G itself and returns
    dK/dV summed over each group, in k's dtype); where it refuses grouped heads, the refusal is
    logged once and K/V go repeated to Hq heads, dK/dV summed here. Both exact."""
    heads_seen = []

    def refuse(q, k):
        heads_seen.append(k.shape[1])
        if groups_refused and k.shape[1] != q.shape[1]:
            raise RuntimeError("no engine supports grouped heads")

    def aten_forward(q, k, v, *, scale, is_causal):
        refuse(q, k)
        out, lse = contract_forward(q, k, v, scale=scale, is_causal=is_causal)
        return out, lse.unsqueeze(-1)

    def aten_backward(q, k, v, out, lse, dout, *, scale, is_causal):
        refuse(q, k)
        dq, dk, dv = contract_backward(q, k, v, out, lse, dout, scale=scale, is_causal=is_causal)
        return dq, dk.to(k.dtype), dv.to(v.dtype)

    monkeypatch.setattr(attention, "_cudnn_supports", lambda q, k: True)
    monkeypatch.setattr(attention, "_aten_cudnn_forward", aten_forward)
    monkeypatch.setattr(attention, "_aten_cudnn_backward", aten_backward)
    monkeypatch.setattr(attention, "_CUDNN_REFUSED", {})
    monkeypatch.setattr(attention, "_CUDNN_GQA_REFUSED", {})
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 8, 16, generator=gen)
    k, v = (torch.randn(1, 2, 8, 16, generator=gen) for _ in range(2))
    dout = torch.randn(q.shape, generator=gen)
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    out_ref, lse_ref = plain_attention(*leaves, 0.3, True)
    out_ref.backward(dout.double())
    with caplog.at_level(logging.WARNING, logger="graphopt.ops.attention"):
        for _ in range(2):
            out, lse = attention.attention_block_forward(q, k, v, scale=0.3, causal=True)
            dq, dk, dv = attention.attention_block_backward(q, k, v, out, lse, dout, scale=0.3,
                                                            causal=True)
    torch.testing.assert_close(out.double(), out_ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), lse_ref.detach(), atol=1e-5, rtol=1e-5)
    for got, leaf in zip((dq, dk, dv), leaves):
        torch.testing.assert_close(got.double(), leaf.grad, atol=1e-5, rtol=1e-5)
    if groups_refused:  # forward tried grouped once, then every call ran repeated
        assert heads_seen == [2, 4, 4, 4, 4] and caplog.text.count("grouped key/value heads") == 1
        assert dk.dtype == torch.float32 and attention._CUDNN_REFUSED == {}
    else:
        assert heads_seen == [2, 2, 2, 2] and "grouped" not in caplog.text


def test_lse_gradient_triton_kernel_or_a_mask_keeps_graphopt_kernels(stand_in):
    q, k, v = (torch.randn(1, 2, 8, 8) for _ in range(3))
    out, lse = attention.attention_block_forward(q, k, v, scale=0.5, causal=True, kernel="triton")
    assert not attention.uses_cudnn(q, k, True, 0, 0, kernel="triton")
    assert not attention.cudnn_eligible(q, k, "triton")
    attention.attention_block_forward(q, k, v, scale=0.5, causal=True, window=3)
    attention.attention_block_forward(q, k, v, scale=0.5, causal=True,
                                      row_start=torch.zeros(1, 8, dtype=torch.int32))
    assert not attention.cudnn_eligible(q, k, masked=True)
    dout = torch.randn(q.shape)
    delta = attention.attention_delta(out, dout) - torch.randn(lse.shape)
    attention.attention_block_backward(q, k, v, out, lse, dout, scale=0.5, causal=True,
                                       delta=delta, lse_grad_in_delta=True)
    assert stand_in == []
    attention.attention_block_backward(q, k, v, out, lse, dout, scale=0.5, causal=True)
    assert stand_in == [("bwd", True)]


def test_a_configuration_cudnn_refused_is_logged_and_left_to_graphopt(stand_in, caplog):
    q, k = torch.randn(1, 4, 8, 8), torch.randn(1, 2, 8, 8)
    assert attention.cudnn_block_causal(q, k, False, 0, 0) is False
    with caplog.at_level(logging.WARNING, logger="graphopt.ops.attention"):
        attention._cudnn_refused(q, k, False, RuntimeError("no engine for this graph"))
    assert "no engine for this graph" in caplog.text
    assert attention.cudnn_block_causal(q, k, False, 0, 0) is None
    assert attention.cudnn_block_causal(q, k, True, 0, 0) is True  # another configuration
    attention.attention_block_forward(q, k, k, scale=0.5, causal=False)
    assert stand_in == []


def test_forcing_cudnn_where_it_cannot_run_names_the_fix():
    q, k, v = (torch.randn(1, 2, 8, 8) for _ in range(3))
    out, lse = attention.attention_block_forward(q, k, v, scale=0.5, causal=True)
    for call in (lambda: attention.attention_block_forward(q, k, v, scale=0.5, causal=True,
                                                           impl="cudnn"),
                 lambda: attention.attention_block_backward(q, k, v, out, lse, torch.randn(q.shape),
                                                            scale=0.5, causal=True, impl="cudnn")):
        with pytest.raises(ValueError, match="impl=None"):
            call()
