"""The block-wise attention API and graphopt::flash_attention on the CPU (float32 reference) path.

Checked against a float64 attention written the plain way (K/V repeated per query group, softmax):
outputs, log-sum-exp, gradients; causal blocks with offsets against slices of one full attention;
merging key blocks against attention over their concatenation; block-wise backward against the
full backward.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_reference import plain_attention

from graphopt.ops.attention import (
    attention_block_backward,
    attention_block_forward,
    attention_delta,
    flash_attention,
)

TOL = dict(atol=2e-5, rtol=2e-5)


def make_qkv(batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads_q, seqlen_q, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, heads_kv, seqlen_k, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, heads_kv, seqlen_k, head_dim, generator=gen).to(dtype)
    return q, k, v


def assert_lse_close(actual, expected):
    assert torch.equal(torch.isneginf(actual), torch.isneginf(expected))
    finite = ~torch.isneginf(expected)
    torch.testing.assert_close(actual.double()[finite], expected[finite], **TOL)


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 2), heads_kv=st.integers(1, 2), group=st.sampled_from([1, 2, 4]),
       seqlen_q=st.integers(1, 20), seqlen_k=st.integers(1, 20), head_dim=st.sampled_from([8, 16]),
       causal=st.booleans(), q_offset=st.integers(0, 12), k_offset=st.integers(0, 12))
def test_forward_and_backward_match_float64(batch, heads_kv, group, seqlen_q, seqlen_k, head_dim,
                                            causal, q_offset, k_offset):
    q, k, v = make_qkv(batch, heads_kv * group, heads_kv, seqlen_q, seqlen_k, head_dim)
    scale = 1.0 / math.sqrt(head_dim)
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    out_ref, lse_ref = plain_attention(qd, kd, vd, scale, causal, q_offset, k_offset)
    dout = torch.randn_like(q)
    grads_ref = torch.autograd.grad(out_ref, (qd, kd, vd), dout.double())

    out, lse = attention_block_forward(q, k, v, scale=scale, causal=causal, q_offset=q_offset,
                                       k_offset=k_offset)
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    torch.testing.assert_close(out.double(), out_ref.detach(), **TOL)
    assert_lse_close(lse, lse_ref.detach())

    grads = attention_block_backward(q, k, v, out, lse, dout, scale=scale, causal=causal,
                                     q_offset=q_offset, k_offset=k_offset)
    for grad, grad_ref, like in zip(grads, grads_ref, (q, k, v)):
        assert grad.shape == like.shape and grad.dtype == like.dtype
        torch.testing.assert_close(grad.double(), grad_ref, **TOL)


def test_causal_block_with_offsets_is_a_slice_of_full_attention():
    q, k, v = make_qkv(1, 4, 2, 24, 24, 16)
    full_out, full_lse = plain_attention(q, k, v, 0.25, causal=True)
    for q_start, q_stop, k_start, k_stop in [(8, 20, 0, 24), (5, 13, 0, 13), (16, 24, 0, 24)]:
        out, lse = attention_block_forward(
            q[:, :, q_start:q_stop], k[:, :, k_start:k_stop], v[:, :, k_start:k_stop],
            scale=0.25, causal=True, q_offset=q_start, k_offset=k_start)
        torch.testing.assert_close(out.double(), full_out[:, :, q_start:q_stop], **TOL)
        assert_lse_close(lse, full_lse[:, :, q_start:q_stop])


@pytest.mark.parametrize("causal", [False, True])
def test_merging_key_blocks_equals_attention_over_their_concatenation(causal):
    q, k, v = make_qkv(2, 4, 1, 10, 30, 16, seed=1)
    q_offset = 20  # queries 20..29 over keys 0..29: the last key block straddles the diagonal
    out_ref, lse_ref = plain_attention(q, k, v, 0.3, causal, q_offset=q_offset)
    out_acc = torch.zeros(q.shape, dtype=torch.float32)
    lse_acc = torch.full(q.shape[:3], float("-inf"))
    for start, stop in [(18, 30), (0, 7), (7, 18)]:
        merged = attention_block_forward(q, k[:, :, start:stop], v[:, :, start:stop], scale=0.3,
                                         causal=causal, q_offset=q_offset, k_offset=start,
                                         out_acc=out_acc, lse_acc=lse_acc)
        assert merged[0] is out_acc and merged[1] is lse_acc
    torch.testing.assert_close(out_acc.double(), out_ref, **TOL)
    assert_lse_close(lse_acc, lse_ref)


def test_merging_a_block_that_sees_nothing_changes_nothing():
    q, k, v = make_qkv(1, 2, 2, 6, 6, 8)
    out_acc = torch.zeros(q.shape)
    lse_acc = torch.full(q.shape[:3], float("-inf"))
    attention_block_forward(q, k, v, scale=0.5, causal=True, q_offset=6, k_offset=0,
                            out_acc=out_acc, lse_acc=lse_acc)
    before = out_acc.clone(), lse_acc.clone()
    attention_block_forward(q, k, v, scale=0.5, causal=True, q_offset=6, k_offset=100,
                            out_acc=out_acc, lse_acc=lse_acc)
    torch.testing.assert_close(out_acc, before[0])
    torch.testing.assert_close(lse_acc, before[1])


@pytest.mark.parametrize("causal", [False, True])
def test_blockwise_backward_sums_to_the_full_backward(causal):
    q, k, v = make_qkv(1, 4, 2, 16, 16, 8, seed=2)
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    out_ref, _ = plain_attention(qd, kd, vd, 0.35, causal)
    dout = torch.randn_like(q)
    dq_ref, dk_ref, dv_ref = torch.autograd.grad(out_ref, (qd, kd, vd), dout.double())

    out, lse = attention_block_forward(q, k, v, scale=0.35, causal=causal)
    delta = attention_delta(out, dout)
    dq_acc = torch.zeros(q.shape, dtype=torch.float32)
    dks, dvs = [], []
    for start, stop in [(0, 5), (5, 16)]:
        dq, dk, dv = attention_block_backward(
            q, k[:, :, start:stop], v[:, :, start:stop], out, lse, dout, scale=0.35,
            causal=causal, k_offset=start, delta=delta, dq_acc=dq_acc)
        assert dq is dq_acc and dk.dtype == torch.float32
        dks.append(dk)
        dvs.append(dv)
    torch.testing.assert_close(dq_acc.double(), dq_ref, **TOL)
    torch.testing.assert_close(torch.cat(dks, 2).double(), dk_ref, **TOL)
    torch.testing.assert_close(torch.cat(dvs, 2).double(), dv_ref, **TOL)


def test_flash_attention_op_gradients_include_the_lse_output():
    q, k, v = make_qkv(2, 4, 2, 9, 11, 8, seed=3)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out, lse = flash_attention(q, k, v, scale=0.4, causal=True)
    weight = torch.randn_like(lse)
    (out.square().sum() + (lse * weight).sum()).backward()

    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    out_ref, lse_ref = plain_attention(qd, kd, vd, 0.4, True)
    (out_ref.square().sum() + (lse_ref * weight.double()).sum()).backward()
    for x, x_ref in zip((q, k, v), (qd, kd, vd)):
        torch.testing.assert_close(x.grad.double(), x_ref.grad, atol=1e-4, rtol=1e-4)


def test_flash_attention_op_passes_opcheck():
    q, k, v = make_qkv(1, 2, 1, 5, 7, 8, seed=4)
    args = tuple(x.requires_grad_() for x in (q, k, v)) + (0.5, True)
    torch.library.opcheck(torch.ops.graphopt.flash_attention, args)
    q, k, v = make_qkv(2, 2, 1, 7, 7, 8, seed=4)
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1]])
    args = tuple(x.requires_grad_() for x in (q, k, v)) + (0.5, True, 2, positions, "auto")
    torch.library.opcheck(torch.ops.graphopt.flash_attention, args)


def test_flash_attention_op_with_window_and_documents_matches_float64():
    """Documents from position ids that restart (any value that does not continue the previous
    position starts one), a window, GQA, a batch with one row of documents each."""
    q, k, v = make_qkv(2, 4, 2, 12, 12, 8, seed=8)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 7, 8, 9, 10, 11],
                              [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]])
    ids = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2], [0] * 12])
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out, lse = flash_attention(q, k, v, scale=0.4, causal=True, window=4, positions=positions)
    weight = torch.randn_like(lse)
    (out.square().sum() + (lse * weight).sum()).backward()
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    out_ref, lse_ref = plain_attention(qd, kd, vd, 0.4, True, window=4, documents=ids)
    (out_ref.square().sum() + (lse_ref * weight.double()).sum()).backward()
    torch.testing.assert_close(out.double(), out_ref, **TOL)
    for x, x_ref in zip((q, k, v), (qd, kd, vd)):
        torch.testing.assert_close(x.grad.double(), x_ref.grad, atol=1e-4, rtol=1e-4)


def test_document_bounds_follow_position_resets():
    from graphopt.ops.attention import document_bounds
    row_start, col_stop = document_bounds(torch.tensor([[3, 4, 0, 1, 2, 9, 0], [0, 1, 2, 3, 4,
                                                                                5, 6]]))
    assert row_start.tolist() == [[0, 0, 2, 2, 2, 5, 6], [0] * 7]
    assert col_stop.tolist() == [[2, 2, 5, 5, 5, 6, 7], [7] * 7]


def test_flash_attention_op_traces_under_torch_compile():
    q, k, v = make_qkv(1, 2, 1, 6, 6, 8, seed=5)
    q, k, v = (x.requires_grad_() for x in (q, k, v))

    def loss(q, k, v):
        return flash_attention(q, k, v, causal=True)[0].sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    grads = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    grads_eager = torch.autograd.grad(loss(q, k, v), (q, k, v))
    for grad, grad_eager in zip(grads, grads_eager):
        torch.testing.assert_close(grad, grad_eager)


def test_errors_name_the_fix():
    q, k, v = make_qkv(1, 3, 2, 4, 4, 8)
    with pytest.raises(ValueError, match="Hq % Hkv"):
        attention_block_forward(q, k, v, scale=1.0, causal=False)
    q, k, v = make_qkv(1, 2, 1, 4, 4, 8)
    with pytest.raises(ValueError, match="float32"):
        attention_block_forward(q, k, v, scale=1.0, causal=False, out_acc=torch.zeros(q.shape,
                                dtype=torch.float16), lse_acc=torch.zeros(q.shape[:3]))


def test_triton_path_refuses_what_its_kernels_do_not_handle():
    q, k, v = make_qkv(1, 2, 1, 4, 4, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="impl='reference'"):
        attention_block_forward(q, k, v, scale=1.0, causal=False, impl="triton")
    q, k, v = make_qkv(1, 2, 1, 4, 4, 160)
    with pytest.raises(ValueError, match="head dim 160"):
        attention_block_forward(q, k, v, scale=1.0, causal=False, impl="triton")


def test_block_ops_pass_opcheck():
    q, k, v = make_qkv(1, 4, 2, 6, 9, 8, seed=6)
    torch.library.opcheck(torch.ops.graphopt.attention_block_forward,
                          (q, k, v, 0.5, True, 3, 0))
    out, lse = attention_block_forward(q, k, v, scale=0.5, causal=True, q_offset=3)
    dout = torch.randn_like(q)
    for delta in (None, attention_delta(out, dout)):
        torch.library.opcheck(torch.ops.graphopt.attention_block_backward,
                              (q, k, v, out, lse, dout, delta, 0.5, True, 3, 0))


def test_documents_are_read_once_per_positions_tensor_until_it_is_written():
    """has_documents reads a positions tensor on the host once, again after an in-place write,
    never for the copy graphopt::checked_positions made (its check started with the copy), and
    each time for an inference tensor (no count of its writes to trust); a dead tensor's entry
    goes with it."""
    from graphopt.kernels import launch_counts
    from graphopt.ops import attention as attention_ops

    def reads(call):
        before = launch_counts["positions_read_blocking"]
        result = call()
        return result, launch_counts["positions_read_blocking"] - before

    single = torch.arange(16).unsqueeze(0)
    assert reads(lambda: attention_ops.has_documents(single)) == (False, 1)
    assert reads(lambda: attention_ops.has_documents(single)) == (False, 0)
    single[0, 8:] -= 8  # now two documents
    assert reads(lambda: attention_ops.has_documents(single)) == (True, 1)
    checked = torch.ops.graphopt.checked_positions(single)
    assert torch.equal(checked, single) and checked.data_ptr() != single.data_ptr()
    assert reads(lambda: attention_ops.has_documents(checked)) == (True, 0)
    with torch.inference_mode():
        frozen = torch.arange(16).unsqueeze(0)
        assert reads(lambda: attention_ops.has_documents(frozen)) == (False, 1)
        assert reads(lambda: attention_ops.has_documents(frozen)) == (False, 1)
    entries = len(attention_ops._DOCUMENT_CHECKS)
    del single, checked
    assert len(attention_ops._DOCUMENT_CHECKS) == entries - 2
    torch.library.opcheck(torch.ops.graphopt.checked_positions.default, (torch.arange(8)[None],))
