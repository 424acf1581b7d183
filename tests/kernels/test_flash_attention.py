"""The Triton flash-attention kernels, run by the Triton interpreter on CPU tensors.

The ``triton_interpreter`` tests run in one subprocess with TRITON_INTERPRET=1 (tests/conftest.py
starts it and reports each test's outcome here); run with TRITON_INTERPRET=1 already set, they run
in this process.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_reference import plain_attention

interpreted = pytest.mark.triton_interpreter


def make_qkv(batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads_q, seqlen_q, head_dim), (batch, heads_kv, seqlen_k, head_dim),
              (batch, heads_kv, seqlen_k, head_dim)]
    return [torch.randn(shape, generator=gen).to(dtype) for shape in shapes]


def tolerance(dtype):
    return dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=4e-3, rtol=4e-3)


def assert_lse_close(actual, expected):
    assert actual.dtype == torch.float32
    assert torch.equal(torch.isneginf(actual), torch.isneginf(expected))
    finite = ~torch.isneginf(expected)
    torch.testing.assert_close(actual.double()[finite], expected[finite], atol=2e-5, rtol=2e-5)


def check_forward_and_backward(batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, dtype,
                               causal, q_offset, k_offset, seed=0):
    from graphopt.ops.attention import attention_block_backward, attention_block_forward
    q, k, v = make_qkv(batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, dtype, seed)
    scale = 1.0 / math.sqrt(head_dim)
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    out_ref, lse_ref = plain_attention(qd, kd, vd, scale, causal, q_offset, k_offset)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    grads_ref = torch.autograd.grad(out_ref, (qd, kd, vd), dout.double())

    out, lse = attention_block_forward(q, k, v, scale=scale, causal=causal, q_offset=q_offset,
                                       k_offset=k_offset, impl="triton")
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), out_ref.detach(), **tolerance(dtype))
    assert_lse_close(lse, lse_ref.detach())

    # The backward gets the exact out/lse, so its error is the kernel's own.
    grads = attention_block_backward(q, k, v, out_ref.detach().to(dtype), lse_ref.float(), dout,
                                     scale=scale, causal=causal, q_offset=q_offset,
                                     k_offset=k_offset, impl="triton")
    grad_tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for grad, grad_ref, like in zip(grads, grads_ref, (q, k, v)):
        assert grad.dtype == dtype and grad.shape == like.shape
        torch.testing.assert_close(grad.double(), grad_ref, **grad_tol)


@interpreted
@pytest.mark.parametrize(
    "batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, dtype, causal, q_offset, k_offset", [
        (1, 4, 2, 37, 45, 64, torch.float32, True, 8, 0),     # GQA, ragged, causal with offset
        (2, 2, 2, 20, 33, 32, torch.float16, False, 0, 0),    # Sq != Sk, fp16
        (1, 2, 1, 33, 21, 96, torch.float32, True, 0, 12),    # head dim padded to 128
        (1, 1, 1, 32, 32, 128, torch.float16, True, 0, 0),    # block-aligned diagonal
        (1, 2, 1, 18, 16, 16, torch.float32, True, 0, 5),     # first rows see no key at all
    ])
def test_interpreted_kernels_match_float64(batch, heads_q, heads_kv, seqlen_q, seqlen_k,
                                           head_dim, dtype, causal, q_offset, k_offset):
    check_forward_and_backward(batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, dtype,
                               causal, q_offset, k_offset)


@interpreted
@settings(max_examples=8, deadline=None)
@given(heads_kv=st.integers(1, 2), group=st.sampled_from([1, 3]), seqlen_q=st.integers(1, 40),
       seqlen_k=st.integers(1, 40), head_dim=st.sampled_from([16, 32]), causal=st.booleans(),
       q_offset=st.integers(0, 24), k_offset=st.integers(0, 24))
def test_interpreted_kernels_over_shapes(heads_kv, group, seqlen_q, seqlen_k, head_dim, causal,
                                         q_offset, k_offset):
    check_forward_and_backward(1, heads_kv * group, heads_kv, seqlen_q, seqlen_k, head_dim,
                               torch.float32, causal, q_offset, k_offset)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interpreted_ring_steps_merge_and_accumulate_gradients(dtype):
    """Key blocks merged in the kernel give full attention; block gradients sum to full ones."""
    from graphopt.ops.attention import (attention_block_backward, attention_block_forward,
                                        attention_delta)
    q, k, v = make_qkv(1, 4, 2, 24, 40, 32, dtype, seed=3)
    q_offset, scale = 16, 0.2
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    out_ref, lse_ref = plain_attention(qd, kd, vd, scale, True, q_offset)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    dq_ref, dk_ref, dv_ref = torch.autograd.grad(out_ref, (qd, kd, vd), dout.double())

    blocks = [(17, 40), (0, 17)]
    out_acc = torch.zeros(q.shape, dtype=torch.float32)
    lse_acc = torch.full(q.shape[:3], float("-inf"))
    for start, stop in blocks:
        attention_block_forward(q, k[:, :, start:stop], v[:, :, start:stop], scale=scale,
                                causal=True, q_offset=q_offset, k_offset=start, out_acc=out_acc,
                                lse_acc=lse_acc, impl="triton")
    torch.testing.assert_close(out_acc.double(), out_ref.detach(), **tolerance(dtype))
    assert_lse_close(lse_acc, lse_ref.detach())

    out = out_acc.to(dtype)
    delta = attention_delta(out, dout, impl="triton")
    torch.testing.assert_close(delta, (out.float() * dout.float()).sum(-1), atol=1e-5, rtol=1e-5)
    dq_acc = torch.zeros(q.shape, dtype=torch.float32)
    dks, dvs = {}, {}
    for start, stop in blocks:
        dq, dks[start], dvs[start] = attention_block_backward(
            q, k[:, :, start:stop], v[:, :, start:stop], out, lse_acc, dout, scale=scale,
            causal=True, q_offset=q_offset, k_offset=start, delta=delta, dq_acc=dq_acc,
            impl="triton")
        assert dq is dq_acc and dks[start].dtype == torch.float32
    grad_tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(dq_acc.double(), dq_ref, **grad_tol)
    torch.testing.assert_close(torch.cat([dks[0], dks[17]], 2).double(), dk_ref, **grad_tol)
    torch.testing.assert_close(torch.cat([dvs[0], dvs[17]], 2).double(), dv_ref, **grad_tol)


@interpreted
def test_interpreted_kernels_agree_with_the_reference_path():
    from graphopt.ops.attention import attention_block_backward, attention_block_forward
    q, k, v = make_qkv(2, 2, 1, 19, 26, 16, torch.float32, seed=7)
    kwargs = dict(scale=0.3, causal=True, q_offset=10, k_offset=3)
    fwd = {impl: attention_block_forward(q, k, v, impl=impl, **kwargs)
           for impl in ("triton", "reference")}
    torch.testing.assert_close(fwd["triton"][0], fwd["reference"][0], atol=1e-5, rtol=1e-5)
    out, lse = fwd["reference"]
    dout = torch.randn_like(q)
    bwd = {impl: attention_block_backward(q, k, v, out, lse, dout, impl=impl, **kwargs)
           for impl in ("triton", "reference")}
    for a, b in zip(bwd["triton"], bwd["reference"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@interpreted
def test_interpreted_kernels_accept_row_views():
    """Ring schedules hand the kernels row slices of q, the accumulators, lse and delta."""
    from graphopt.ops.attention import (attention_block_backward, attention_block_forward,
                                        attention_delta)
    q, k, v = make_qkv(1, 4, 2, 40, 24, 16, torch.float32, seed=11)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(12))
    rows = slice(8, 30)
    kwargs = dict(scale=0.25, causal=True, q_offset=8 + 20, k_offset=16)
    results = {}
    for impl in ("triton", "reference"):
        out_acc = torch.zeros(q.shape)
        lse_acc = torch.full(q.shape[:3], float("-inf"))
        attention_block_forward(q[:, :, rows], k, v, out_acc=out_acc[:, :, rows],
                                lse_acc=lse_acc[:, :, rows], impl=impl, **kwargs)
        delta = attention_delta(out_acc, dout, impl=impl)
        dq_acc = torch.zeros(q.shape)
        _, dk, dv = attention_block_backward(
            q[:, :, rows], k, v, None, lse_acc[:, :, rows], dout[:, :, rows],
            delta=delta[:, :, rows], dq_acc=dq_acc[:, :, rows], impl=impl, **kwargs)
        results[impl] = (out_acc, lse_acc, dq_acc, dk, dv)
    for a, b in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def random_documents(batch, length, generator):
    """(position ids restarting at each document, document id per position), [batch, length]."""
    positions, ids = torch.zeros(batch, length, dtype=torch.long), torch.zeros(batch, length,
                                                                              dtype=torch.long)
    for b in range(batch):
        cuts = sorted(torch.randperm(length - 1, generator=generator)[:3].add(1).tolist())
        for doc, (lo, hi) in enumerate(zip([0] + cuts, cuts + [length])):
            positions[b, lo:hi] = torch.arange(hi - lo)
            ids[b, lo:hi] = doc
    return positions, ids


@interpreted
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), window=st.sampled_from([0, 1, 5, 17]), documents=st.booleans(),
       shared_documents=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float16]),
       q_start=st.integers(0, 30), k_start=st.integers(0, 30), seqlen_q=st.integers(1, 35),
       seqlen_k=st.integers(1, 35))
def test_interpreted_window_and_document_masks(seed, window, documents, shared_documents, dtype,
                                              q_start, k_start, seqlen_q, seqlen_k):
    """A block of rows [q_start, +Sq) against keys [k_start, +Sk) of a 70-token sequence, with a
    sliding window and/or packed documents: both kernels and the reference path equal float64
    attention, forward and backward (blocks whose rows see no key give out 0, lse -inf)."""
    from graphopt.ops.attention import (attention_block_backward, attention_block_forward,
                                        document_bounds)
    if not window and not documents:
        window = 3
    gen = torch.Generator().manual_seed(seed)
    batch = 2
    q, k, v = make_qkv(batch, 4, 2, seqlen_q, seqlen_k, 16, dtype, seed)
    positions, ids = random_documents(1 if shared_documents else batch, 70, gen)
    rows, cols = slice(q_start, q_start + seqlen_q), slice(k_start, k_start + seqlen_k)
    masks = dict(window=window)
    if documents:
        row_start, col_stop = document_bounds(positions)
        masks.update(row_start=row_start[:, rows], col_stop=col_stop[:, cols])
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    out_ref, lse_ref = plain_attention(qd, kd, vd, 0.3, True, q_start, k_start, window,
                                       ids.expand(batch, -1) if documents else None)
    dout = torch.randn(q.shape, generator=gen).to(dtype)
    grads_ref = torch.autograd.grad(out_ref, (qd, kd, vd), dout.double())
    grad_tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for impl in ("triton", "reference"):
        forward_masks = {key: value for key, value in masks.items() if key != "col_stop"}
        out, lse = attention_block_forward(q, k, v, scale=0.3, causal=True, q_offset=q_start,
                                           k_offset=k_start, impl=impl, **forward_masks)
        torch.testing.assert_close(out.double(), out_ref.detach(), **tolerance(dtype))
        assert_lse_close(lse, lse_ref.detach())
        grads = attention_block_backward(q, k, v, out_ref.detach().to(dtype), lse_ref.float(),
                                         dout, scale=0.3, causal=True, q_offset=q_start,
                                         k_offset=k_start, impl=impl, **masks)
        for grad, grad_ref in zip(grads, grads_ref):
            torch.testing.assert_close(grad.double(), grad_ref, **grad_tol)


@interpreted
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), window=st.sampled_from([0, 6, 20]), documents=st.booleans(),
       q_offset=st.integers(0, 20), k_offset=st.integers(0, 20))
def test_interpreted_key_block_ranges_are_exactly_the_visible_blocks(seed, window, documents,
                                                                     q_offset, k_offset):
    """The key blocks a query block walks are those holding a key one of its rows sees (hidden
    blocks are skipped, not masked), and the unmasked middle ones are seen whole by every row."""
    import triton
    from key_ranges import key_ranges_kernel

    from graphopt.ops.attention import _allowed, document_bounds

    if not window and not documents:
        window = 6
    seqlen_q, seqlen_k, block = 40, 40, 8
    positions, _ = random_documents(1, 64, torch.Generator().manual_seed(seed))
    row_start = document_bounds(positions)[0][:, q_offset:q_offset + seqlen_q].contiguous()
    out = torch.zeros(triton.cdiv(seqlen_q, block), 4, dtype=torch.int32)
    key_ranges_kernel[(out.shape[0],)](out, row_start, q_offset, k_offset, seqlen_q, seqlen_k, window,
                                       BLOCK_M=block, BLOCK_N=block, HAS_WINDOW=window > 0,
                                       HAS_ROW_START=documents)
    seen = _allowed(seqlen_q, seqlen_k, True, q_offset, k_offset, torch.device("cpu"), window,
                    row_start if documents else None).reshape(seqlen_q, seqlen_k)
    for program, (start, full_start, full_stop, stop) in enumerate(out.tolist()):
        rows = seen[program * block:(program + 1) * block]
        blocks = [j for j in range(0, seqlen_k, block) if rows[:, j:j + block].any()]
        walked = list(range(start, stop, block))
        assert walked == blocks, (program, walked, blocks)
        for j in range(full_start, full_stop, block):
            assert rows[:, j:j + block].all()


@interpreted
def test_interpreted_fused_merge_matches_the_torch_merge():
    """The one-pass merge used after cuDNN blocks, into row views, with rows that saw no key."""
    from graphopt.kernels.merge_attention import merge_blocks_fused
    from graphopt.ops.attention import merge_attention_blocks
    gen = torch.Generator().manual_seed(3)
    out_acc = torch.randn(2, 3, 40, 24, generator=gen)
    lse_acc = torch.randn(2, 3, 40, generator=gen)
    lse_acc[:, :, :5] = float("-inf")  # no key seen yet
    out_acc[:, :, :5] = 0.0
    rows = slice(3, 37)
    block = torch.randn(2, 3, 34, 24, generator=gen).half()
    block_lse = torch.randn(2, 3, 34, generator=gen)
    block_lse[:, :, :1] = float("-inf")  # rows 3: neither has seen a key
    expected = out_acc.clone(), lse_acc.clone()
    merge_attention_blocks(expected[0][:, :, rows], expected[1][:, :, rows], block, block_lse)
    merge_blocks_fused(out_acc[:, :, rows], lse_acc[:, :, rows], block, block_lse)
    torch.testing.assert_close(out_acc, expected[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse_acc, expected[1], atol=1e-6, rtol=1e-6)
    assert torch.isneginf(lse_acc[:, :, 3]).all() and (out_acc[:, :, 3] == 0).all()


@interpreted
@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_interpreted_partial_sum_rounds_once(count):
    """The one-pass sum of gradient partials (bf16 and float32 mixed, row views of larger
    tensors) equals their float32 sum rounded once to the output's dtype."""
    from graphopt.kernels.sum_partials import sum_partials_fused
    gen = torch.Generator().manual_seed(count)
    bases = [torch.randn(2, 3, 40, 24, generator=gen) for _ in range(count)]
    inputs = [b[:, :, 5:35].to(torch.float16 if i % 2 else torch.float32)
              for i, b in enumerate(bases)]
    out = torch.zeros(2, 3, 50, 24, dtype=torch.float16)
    sum_partials_fused(out[:, :, 10:40], inputs)
    expected = sum(x.float() for x in inputs).half()
    assert torch.equal(out[:, :, 10:40], expected)
    assert (out[:, :, :10] == 0).all() and (out[:, :, 40:] == 0).all()


@interpreted
@pytest.mark.parametrize("count", [1, 2, 4])
def test_interpreted_merge_of_partial_results_matches_the_torch_merge(count):
    """merge_parts_fused: up to four (out, lse) partials, one of them a row view, rows that no
    part has seen (lse -inf everywhere) give out 0 and lse -inf."""
    from graphopt.kernels.merge_attention import merge_parts_fused
    from graphopt.ops.attention import merge_attention_blocks
    gen = torch.Generator().manual_seed(10 + count)
    parts = []
    for i in range(count):
        out = torch.randn(1, 3, 40, 24, generator=gen)
        lse = torch.randn(1, 3, 40, generator=gen)
        lse[:, :, 4:6] = float("-inf")  # rows 0-1 of every part: no key seen
        out[:, :, 4:6] = 0.0
        parts.append((out[:, :, 4:36].half(), lse[:, :, 4:36]) if i == 0 else
                     (out[:, :, 4:36].contiguous().half(), lse[:, :, 4:36].contiguous()))
    out_acc, lse_acc = parts[0][0].float().clone(), parts[0][1].clone()
    for part in parts[1:]:
        merge_attention_blocks(out_acc, lse_acc, *part)
    out = torch.full((1, 3, 32, 24), 7.0, dtype=torch.float16)
    lse = torch.empty(1, 3, 32)
    merge_parts_fused(out, lse, parts)
    torch.testing.assert_close(out, out_acc.half(), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse, lse_acc, atol=1e-5, rtol=1e-5)
    assert torch.isneginf(lse[:, :, :2]).all() and (out[:, :, :2] == 0).all()


VARIANT_CASES = [
    # batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, dtype, q_offset, k_offset, window, docs
    (1, 4, 2, 37, 45, 64, torch.float32, 8, 0, 0, False),     # GQA, ragged, causal with offset
    (1, 2, 1, 33, 21, 32, torch.float16, 0, 12, 0, False),    # fp16, offset keys
    (2, 2, 1, 40, 40, 16, torch.float32, 0, 0, 7, True),      # window and documents
    (1, 2, 2, 24, 30, 32, torch.float16, 30, 4, 5, False),    # rows past every key's window
]


@interpreted
@pytest.mark.parametrize("forward, backward", [
    ("pointer", "two_pass"), ("tma", "atomic_dq_tma"), ("tma_ws", "atomic_dq"),
    ("tma_persistent", "atomic_dq_tma")])
def test_interpreted_kernel_variants_match_float64(forward, backward, monkeypatch):
    """Every forward and backward variant computes the same attention: TMA descriptor loads,
    warp-specialised and persistent loops, dQ by atomics (float32, added over key blocks); the
    grouped tile order with one head per group (an L2 budget below one head's K/V)."""
    from graphopt.kernels import flash_attention_fwd, launch_counts
    monkeypatch.setattr(flash_attention_fwd, "L2_BUDGET_BYTES", 1)
    from graphopt.kernels.flash_attention_bwd import flash_attention_backward
    from graphopt.kernels.flash_attention_fwd import flash_attention_forward
    from graphopt.ops.attention import document_bounds
    for case in VARIANT_CASES:
        batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, dtype, q_offset, k_offset, \
            window, docs = case
        q, k, v = make_qkv(batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, dtype, seed=5)
        masks, ids = {}, None
        if docs:
            positions, ids = random_documents(batch, 80, torch.Generator().manual_seed(6))
            row_start, col_stop = document_bounds(positions)
            masks = dict(row_start=row_start[:, q_offset:q_offset + seqlen_q],
                         col_stop=col_stop[:, k_offset:k_offset + seqlen_k])
        qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
        out_ref, lse_ref = plain_attention(qd, kd, vd, 0.3, True, q_offset, k_offset, window, ids)
        dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
        grads_ref = torch.autograd.grad(out_ref, (qd, kd, vd), dout.double())
        before = dict(launch_counts)
        out, lse = flash_attention_forward(
            q, k, v, scale=0.3, causal=True, q_offset=q_offset, k_offset=k_offset, window=window,
            row_start=masks.get("row_start"), variant=forward)
        torch.testing.assert_close(out.double(), out_ref.detach(), **tolerance(dtype))
        assert_lse_close(lse, lse_ref.detach())
        grads = flash_attention_backward(
            q, k, v, out_ref.detach().to(dtype), lse_ref.float(), dout, scale=0.3, causal=True,
            q_offset=q_offset, k_offset=k_offset, window=window, variant=backward, **masks)
        grad_tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else \
            dict(atol=2e-2, rtol=2e-2)
        for grad, grad_ref in zip(grads, grads_ref):
            assert grad.dtype == dtype
            torch.testing.assert_close(grad.double(), grad_ref, **grad_tol)
        for name in (f"triton_forward:{forward}", f"triton_backward:{backward}"):
            assert launch_counts[name] == before.get(name, 0) + 1


@interpreted
def test_interpreted_defaults_fall_back_where_tma_cannot_address_the_tensors(monkeypatch):
    """With TMA variants as the defaults (the H100 run of bench/attention.py made the pointer /
    two-pass kernels the defaults; a later measurement may switch back), head dims that are no
    power of two (96: padded tiles) and row strides that are no 16-byte multiple (D = 20 in
    float16 = 40 bytes) run the kernels without TMA; forcing a TMA variant there is refused with
    the way out; a negative scale (no FMA softmax) still computes the right function."""
    from graphopt.kernels import flash_attention_bwd, flash_attention_fwd, launch_counts
    from graphopt.kernels.flash_attention_bwd import flash_attention_backward
    from graphopt.kernels.flash_attention_fwd import flash_attention_forward
    monkeypatch.setattr(flash_attention_fwd, "DEFAULT_FORWARD_VARIANT", "tma")
    monkeypatch.setattr(flash_attention_bwd, "DEFAULT_BACKWARD_VARIANT", "atomic_dq_tma")
    for head_dim in (96, 20):
        q, k, v = make_qkv(1, 2, 1, 19, 23, head_dim, torch.float16, seed=8)
        before = dict(launch_counts)
        out, lse = flash_attention_forward(q, k, v, scale=-0.2, causal=True)
        flash_attention_backward(q, k, v, out, lse, torch.ones_like(q), scale=-0.2, causal=True)
        assert launch_counts["triton_forward:pointer"] == before.get("triton_forward:pointer",
                                                                     0) + 1
        assert launch_counts["triton_backward:atomic_dq"] == before.get(
            "triton_backward:atomic_dq", 0) + 1
        expected, _ = plain_attention(q, k, v, -0.2, True)
        torch.testing.assert_close(out.double(), expected, **tolerance(torch.float16))
    with pytest.raises(ValueError, match="TMA descriptors"):
        flash_attention_forward(q, k, v, scale=0.2, causal=True, variant="tma")
    # Deterministic mode: the backward without atomics.
    before = launch_counts["triton_backward:two_pass"]
    torch.use_deterministic_algorithms(True)
    try:
        flash_attention_backward(q, k, v, out, lse, torch.ones_like(q), scale=-0.2, causal=True)
    finally:
        torch.use_deterministic_algorithms(False)
    assert launch_counts["triton_backward:two_pass"] == before + 1
    q, k, v = make_qkv(1, 2, 1, 19, 23, 32, torch.float32, seed=8)
    out, _ = flash_attention_forward(q, k, v, scale=-0.2, causal=False, variant="tma")
    torch.testing.assert_close(out.double(), plain_attention(q, k, v, -0.2, False)[0],
                               **tolerance(torch.float32))


@interpreted
@pytest.mark.parametrize("query_blocks, batch_heads, head_group", [(5, 7, 3), (4, 6, 6), (3, 5, 1)])
def test_interpreted_grouped_tile_order(query_blocks, batch_heads, head_group):
    """The grouped order visits every (query block, head) once; within a group of heads the
    longest (last, causal) query blocks of every head come before any shorter one."""
    from key_ranges import tile_order_kernel
    tiles = query_blocks * batch_heads
    out = torch.zeros(tiles, 2, dtype=torch.int32)
    tile_order_kernel[(tiles,)](out, query_blocks, batch_heads, head_group, CAUSAL=True)
    order = [tuple(pair) for pair in out.tolist()]
    assert sorted(order) == [(m, bh) for m in range(query_blocks) for bh in range(batch_heads)]
    for first in range(0, batch_heads, head_group):
        heads = range(first, min(first + head_group, batch_heads))
        section = [pair for pair in order if pair[1] in heads]
        assert [m for m, _ in section] == sorted((m for m, _ in section), reverse=True)
        start = order.index(section[0])
        assert order[start:start + len(section)] == section  # a group's tiles run together


def test_an_untuned_launch_steps_past_a_config_this_device_cannot_compile(monkeypatch):
    """AUTOTUNE off runs UNTUNED_CONFIG; where that config runs out of shared memory (the fused
    backward's first config with TMA reductions on H100: 263 KB of 232 KB), the next config runs,
    as the autotuner would skip it, and later launches go straight to it. A config failing for
    another reason, or the last config failing, raises."""
    import triton
    from triton.runtime.errors import OutOfResources
    from graphopt.kernels import flash_attention_fwd

    calls = []

    class Kernel:
        def __getitem__(self, grid):
            def run(*args, BLOCK_M, **kwargs):
                calls.append(BLOCK_M)
                if BLOCK_M == 64:
                    raise OutOfResources(263200, 232448, "shared memory")
                if BLOCK_M == 16:
                    raise ValueError("not a compile failure")
            return run

    class Tuned:
        configs = [triton.Config({"BLOCK_M": m}, num_warps=4, num_stages=2) for m in (64, 32, 16)]
        fn = Kernel()

        def early_config_prune(self, configs, named_args, **meta):
            return configs

    monkeypatch.setattr(flash_attention_fwd, "AUTOTUNE", False)
    tuned = Tuned()
    flash_attention_fwd.launch(tuned, lambda meta: (1,), (), dict(CAUSAL=True))
    flash_attention_fwd.launch(tuned, lambda meta: (1,), (), dict(CAUSAL=True))
    assert calls == [64, 32, 32]
    monkeypatch.setattr(flash_attention_fwd, "UNTUNED_CONFIG", 2)
    with pytest.raises(ValueError, match="not a compile failure"):
        flash_attention_fwd.launch(tuned, lambda meta: (1,), (), dict(CAUSAL=False))
    Tuned.configs = Tuned.configs[:1]
    monkeypatch.setattr(flash_attention_fwd, "UNTUNED_CONFIG", 0)
    with pytest.raises(OutOfResources):
        flash_attention_fwd.launch(Tuned(), lambda meta: (1,), (), dict(CAUSAL=True))
    # bench/attention.py's precompile asks for exactly one config: no stepping, the failure raised
    Tuned.configs = [triton.Config({"BLOCK_M": m}, num_warps=4, num_stages=2) for m in (64, 32)]
    monkeypatch.setattr(flash_attention_fwd, "UNTUNED_STEP", False)
    with pytest.raises(OutOfResources):
        flash_attention_fwd.launch(Tuned(), lambda meta: (1,), (), dict(CAUSAL=None))


def test_forward_tiles_that_overflow_shared_memory_at_head_dim_128_are_tried_only_for_small_heads():
    """128 x 128 (2 stages) and 128 x 64 (4 stages) need 294,912+ bytes of shared memory at D = 128
    (measured on H100, every variant); no GPU gives a block more than 232,448. The autotuner tries
    them for D <= 64 only; D = 128 keeps the two tiles that compiled there."""
    from graphopt.kernels import flash_attention_fwd
    tuned = flash_attention_fwd._flash_fwd_tuned["half"]

    def tiles(head_dim):
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages)
                for c in tuned.early_config_prune(tuned.configs, {}, HEAD_DIM_PAD=head_dim)]
    assert tiles(128) == [(128, 64, 3), (64, 64, 3)]
    assert set(tiles(64)) == {(128, 64, 3), (64, 64, 3), (128, 128, 3), (128, 128, 2), (128, 64, 4)}
