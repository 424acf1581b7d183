"""The Triton flash-attention kernels on a CUDA GPU: every dtype, head dims, GQA, offsets, ring steps.

References: float64 attention on the GPU for the numerics, torch SDPA for the custom op.
"""

import math

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(autouse=True)
def first_config_only(monkeypatch):
    """One untimed config per kernel: these tests compile many shapes; the bench tunes."""
    from graphopt.kernels import flash_attention_fwd
    monkeypatch.setattr(flash_attention_fwd, "AUTOTUNE", False)


def plain_attention(q, k, v, scale, causal, q_offset=0, k_offset=0):
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, 1)
    v = v.double().repeat_interleave(group, 1)
    s = q.double() @ k.transpose(-1, -2) * scale
    if causal:
        q_pos = torch.arange(q.shape[2], device=q.device) + q_offset
        k_pos = torch.arange(k.shape[2], device=q.device) + k_offset
        s = s.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v, lse


def make_qkv(batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(batch, heads_q, seqlen_q, head_dim), (batch, heads_kv, seqlen_k, head_dim),
              (batch, heads_kv, seqlen_k, head_dim)]
    return [torch.randn(shape, generator=gen, device="cuda").to(dtype) for shape in shapes]


def tolerances(dtype):
    """(forward, backward) tolerances against float64."""
    if dtype == torch.float32:
        return dict(atol=1e-4, rtol=1e-4), dict(atol=5e-4, rtol=5e-4)
    if dtype == torch.float16:
        return dict(atol=4e-3, rtol=4e-3), dict(atol=2e-2, rtol=2e-2)
    return dict(atol=2e-2, rtol=2e-2), dict(atol=8e-2, rtol=8e-2)


def assert_lse_close(actual, expected):
    assert torch.equal(torch.isneginf(actual), torch.isneginf(expected))
    finite = ~torch.isneginf(expected)
    torch.testing.assert_close(actual.double()[finite], expected[finite], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype, head_dim", [
    (torch.bfloat16, 128), (torch.bfloat16, 64), (torch.float16, 128), (torch.float32, 64),
    (torch.bfloat16, 96), (torch.float16, 32)])
@pytest.mark.parametrize(
    "heads_q, heads_kv, seqlen_q, seqlen_k, causal, q_offset, k_offset", [
        (4, 1, 300, 500, True, 200, 0),
        (4, 4, 257, 129, False, 0, 0),
        (2, 1, 256, 256, True, 0, 0),
        (4, 2, 190, 333, True, 0, 150),
    ])
@pytest.mark.parametrize("impl", [None, "triton"])
def test_forward_backward_match_float64(dtype, head_dim, heads_q, heads_kv, seqlen_q, seqlen_k,
                                        causal, q_offset, k_offset, impl):
    """impl=None sends blocks without a partial mask (fp16/bf16, D <= 128) to torch's cuDNN."""
    from graphopt.ops.attention import (attention_block_backward, attention_block_forward,
                                        uses_cudnn)
    q, k, v = make_qkv(2, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, dtype)
    scale = 1.0 / math.sqrt(head_dim)
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    out_ref, lse_ref = plain_attention(qd, kd, vd, scale, causal, q_offset, k_offset)
    dout = torch.randn_like(q)
    grads_ref = torch.autograd.grad(out_ref, (qd, kd, vd), dout.double())
    fwd_tol, bwd_tol = tolerances(dtype)

    out, lse = attention_block_forward(q, k, v, scale=scale, causal=causal, q_offset=q_offset,
                                       k_offset=k_offset, impl=impl)
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), out_ref.detach(), **fwd_tol)
    assert_lse_close(lse, lse_ref.detach())

    cudnn = uses_cudnn(q, k, causal, q_offset, k_offset, impl)
    assert cudnn == (impl is None and dtype != torch.float32 and head_dim <= 128
                     and (not causal or q_offset == k_offset and seqlen_q == seqlen_k))
    grads = attention_block_backward(q, k, v, out_ref.detach().to(dtype), lse_ref.float(), dout,
                                     scale=scale, causal=causal, q_offset=q_offset,
                                     k_offset=k_offset, impl=impl)
    for grad, grad_ref in zip(grads, grads_ref):
        assert grad.dtype == dtype
        torch.testing.assert_close(grad.double(), grad_ref, **bwd_tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kernel", ["auto", "triton"])
def test_ring_steps_merge_and_accumulate(dtype, kernel, monkeypatch):
    """Blocks [0, 256) and [256, 512) see every key (torch's cuDNN under 'auto' in bf16);
    [512, 768) and [768, 1024) are partially masked (graphopt's kernel)."""
    monkeypatch.setenv("GRAPHOPT_ATTENTION_KERNEL", kernel)
    from graphopt.ops.attention import (attention_block_backward, attention_block_forward,
                                        attention_delta)
    q, k, v = make_qkv(1, 8, 2, 384, 1024, 128, dtype, seed=1)
    q_offset, scale = 640, 1.0 / math.sqrt(128)
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    out_ref, lse_ref = plain_attention(qd, kd, vd, scale, True, q_offset)
    dout = torch.randn_like(q)
    dq_ref, dk_ref, dv_ref = torch.autograd.grad(out_ref, (qd, kd, vd), dout.double())
    fwd_tol, bwd_tol = tolerances(dtype)

    blocks = [(768, 1024), (0, 256), (256, 512), (512, 768)]
    out_acc = torch.zeros(q.shape, dtype=torch.float32, device="cuda")
    lse_acc = torch.full(q.shape[:3], float("-inf"), device="cuda")
    for start, stop in blocks:
        attention_block_forward(q, k[:, :, start:stop], v[:, :, start:stop], scale=scale,
                                causal=True, q_offset=q_offset, k_offset=start,
                                out_acc=out_acc, lse_acc=lse_acc)
    torch.testing.assert_close(out_acc.double(), out_ref.detach(), **fwd_tol)
    assert_lse_close(lse_acc, lse_ref.detach())

    out = out_acc.to(dtype)
    delta = attention_delta(out, dout)
    dq_acc = torch.zeros(q.shape, dtype=torch.float32, device="cuda")
    dk, dv = torch.empty_like(dk_ref), torch.empty_like(dv_ref)
    for start, stop in blocks:
        _, dk_block, dv_block = attention_block_backward(
            q, k[:, :, start:stop], v[:, :, start:stop], out, lse_acc, dout, scale=scale,
            causal=True, q_offset=q_offset, k_offset=start, delta=delta, dq_acc=dq_acc)
        dk[:, :, start:stop], dv[:, :, start:stop] = dk_block, dv_block
    torch.testing.assert_close(dq_acc.double(), dq_ref, **bwd_tol)
    torch.testing.assert_close(dk, dk_ref, **bwd_tol)
    torch.testing.assert_close(dv, dv_ref, **bwd_tol)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads_kv", [8, 2])
def test_flash_attention_op_matches_sdpa(causal, heads_kv):
    from graphopt.ops.attention import flash_attention
    q, k, v = make_qkv(2, 8, heads_kv, 1024, 1024, 128, torch.bfloat16, seed=2)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    dout = torch.randn_like(q)
    out, lse = flash_attention(q, k, v, causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    group = q.shape[1] // heads_kv
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1),
        is_causal=causal)
    grads_ref = torch.autograd.grad(ref, (q, k, v), dout.float())
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad.float(), grad_ref.float(), atol=5e-2, rtol=5e-2)


def test_autotuned_launch_matches_the_default_config(monkeypatch):
    from graphopt.kernels import flash_attention_fwd
    from graphopt.ops.attention import attention_block_backward, attention_block_forward
    q, k, v = make_qkv(1, 4, 2, 1000, 1000, 128, torch.bfloat16, seed=3)
    dout = torch.randn_like(q)
    results = {}
    for autotune in (False, True):
        monkeypatch.setattr(flash_attention_fwd, "AUTOTUNE", autotune)
        out, lse = attention_block_forward(q, k, v, scale=0.09, causal=True)
        results[autotune] = (out, lse) + attention_block_backward(q, k, v, out, lse, dout,
                                                                  scale=0.09, causal=True)
    for a, b in zip(results[False], results[True]):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("forward, backward", [
    ("pointer", "two_pass"), ("tma", "atomic_dq_tma"), ("tma_ws", "atomic_dq"),
    ("tma_persistent", "atomic_dq_tma")])
def test_kernel_variants_match_float64(forward, backward, dtype):
    """Every variant on the GPU (TMA loads and reductions, warp specialisation, persistent tiles,
    dQ by atomics): ragged lengths, GQA, offsets, a window, documents, and ring-step dQ
    accumulation into a float32 buffer."""
    from graphopt.kernels.flash_attention_bwd import flash_attention_backward
    from graphopt.kernels.flash_attention_fwd import flash_attention_forward
    from graphopt.ops.attention import document_bounds
    fwd_tol, bwd_tol = tolerances(dtype)
    lengths = [100, 37, 400, 230]
    positions = torch.cat([torch.arange(n) for n in lengths])[None].cuda()
    row_start, col_stop = document_bounds(positions)
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None].cuda()
    for seqlen_q, seqlen_k, q_offset, k_offset, window, docs in [
            (300, 500, 200, 0, 0, False), (640, 767, 0, 0, 0, True), (333, 401, 300, 100, 129, True),
            (256, 256, 0, 0, 64, False)]:
        q, k, v = make_qkv(1, 8, 2, seqlen_q, seqlen_k, 128, dtype, seed=seqlen_q)
        masks = dict(window=window)
        if docs:
            masks.update(row_start=row_start[:, q_offset:q_offset + seqlen_q],
                         col_stop=col_stop[:, k_offset:k_offset + seqlen_k])
        scale = 1.0 / math.sqrt(128)
        qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
        s = qd @ kd.repeat_interleave(4, 1).transpose(-1, -2) * scale
        q_pos = torch.arange(seqlen_q, device="cuda") + q_offset
        k_pos = torch.arange(seqlen_k, device="cuda") + k_offset
        hidden = k_pos[None, :] > q_pos[:, None]
        if window:
            hidden |= q_pos[:, None] - k_pos[None, :] >= window
        if docs:
            hidden |= ids[0, q_pos][:, None] != ids[0, k_pos][None, :]
        s = s.masked_fill(hidden, float("-inf"))
        lse_ref = torch.logsumexp(s, -1)
        out_ref = torch.softmax(s, -1).nan_to_num(0.0) @ vd.repeat_interleave(4, 1)
        dout = torch.randn_like(q)
        grads_ref = torch.autograd.grad(out_ref, (qd, kd, vd), dout.double())
        fwd_masks = {key: value for key, value in masks.items() if key != "col_stop"}
        out, lse = flash_attention_forward(q, k, v, scale=scale, causal=True, q_offset=q_offset,
                                           k_offset=k_offset, variant=forward, **fwd_masks)
        torch.testing.assert_close(out.double(), out_ref.detach(), **fwd_tol)
        assert_lse_close(lse, lse_ref.detach())
        grads = flash_attention_backward(q, k, v, out_ref.detach().to(dtype), lse_ref.float(),
                                         dout, scale=scale, causal=True, q_offset=q_offset,
                                         k_offset=k_offset, variant=backward, **masks)
        for grad, grad_ref in zip(grads, grads_ref):
            torch.testing.assert_close(grad.double(), grad_ref, **bwd_tol)
        # A ring step: dQ added into a float32 accumulator that already holds a partial sum.
        dq_acc = torch.ones(q.shape, dtype=torch.float32, device="cuda")
        dq, _, _ = flash_attention_backward(
            q, k, v, out_ref.detach().to(dtype), lse_ref.float(), dout, scale=scale, causal=True,
            q_offset=q_offset, k_offset=k_offset, variant=backward, dq_acc=dq_acc, **masks)
        assert dq is dq_acc
        torch.testing.assert_close(dq.double() - 1.0, grads_ref[0], **bwd_tol)


def test_checked_positions_are_read_ahead_and_pick_the_kernel():
    """graphopt::checked_positions copies its documents check to pinned memory at once: the
    attention and its backward read that copy (no blocking read of the positions); one document
    per row runs cuDNN's causal kernels, packed documents graphopt's Triton kernels."""
    from graphopt.kernels import launch_counts
    from graphopt.ops.attention import flash_attention
    q, k, v = (x.requires_grad_() for x in make_qkv(1, 4, 2, 256, 256, 64, torch.bfloat16))
    single = torch.arange(256, device="cuda")[None]
    packed = torch.cat([torch.arange(100), torch.arange(156)])[None].cuda()
    for positions, kernel in ((single, "cudnn_forward"), (packed, "triton_forward")):
        checked = torch.ops.graphopt.checked_positions(positions)
        before = dict(launch_counts)
        out, _ = flash_attention(q, k, v, causal=True, positions=checked)
        out.float().square().sum().backward()
        torch.cuda.synchronize()
        counts = {key: launch_counts[key] - before.get(key, 0) for key in launch_counts}
        assert counts.get("positions_read_blocking", 0) == 0 and counts["positions_read_ahead"] == 1
        assert any(key.startswith(kernel) and n > 0 for key, n in counts.items()), counts
