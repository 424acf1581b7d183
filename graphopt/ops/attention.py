"""Block-wise flash attention with log-sum-exp, sequence offsets and grouped-query heads.

Shapes: q [B, Hq, Sq, D]; k, v [B, Hkv, Sk, D] with Hq a multiple of Hkv (query head h reads
key/value head h // (Hq // Hkv); K/V are never repeated in memory). Query i sits at global position
``q_offset + i``, key j at ``k_offset + j``; causal attention lets a query see keys whose position is
not after its own. A query row that sees no key gets out = 0 and lse = -inf, so partial results over
key blocks merge exactly:

    lse = logaddexp(lse_a, lse_b)
    out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)

The backward of one key block needs the FINAL (merged) out and lse of the whole attention:
p = exp(q k^T * scale - lse), delta = rowsum(dout * out), ds = p * (dout v^T - delta).

CUDA tensors run the Triton kernels in ``graphopt/kernels``; CPU tensors run a float32 torch
reference of the same function. ``impl="triton"`` forces the kernels (CPU tensors then need
TRITON_INTERPRET=1 set before triton is imported); ``impl="reference"`` forces the torch path.

``graphopt::flash_attention(q, k, v, scale, causal) -> (out, lse)`` is the differentiable custom op;
its backward uses the saved out and lse and never re-runs the forward.
``graphopt::attention_block_forward`` / ``graphopt::attention_block_backward`` are the traceable
(functional, offset-taking) forms of the two block functions, for graphs that schedule blocks.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "attention_block_forward",
    "attention_block_backward",
    "attention_delta",
    "merge_attention_blocks",
    "flash_attention",
    "reference_attention",
]

_IMPLS = (None, "triton", "reference")


def _use_triton(q: Tensor, impl: Optional[str]) -> bool:
    if impl not in _IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {_IMPLS}; pass None to pick by device")
    if impl is None:
        return q.is_cuda
    return impl == "triton"


def _check_shapes(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention expects q [B, Hq, Sq, D] and k, v [B, Hkv, Sk, D]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch and head dim")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads; "
            "grouped-query attention needs Hq % Hkv == 0")


# --- float32 torch reference: the function the kernels compute ------------------------------------

def _grouped(x: Tensor, hkv: int) -> Tensor:
    """[B, Hq, S, ...] -> [B, Hkv, G, S, ...] (a view: query heads of one group are adjacent)."""
    return x.unflatten(1, (hkv, x.shape[1] // hkv))


def _allowed(sq: int, sk: int, causal: bool, q_offset: int, k_offset: int,
             device: torch.device) -> Optional[Tensor]:
    if not causal:
        return None
    q_pos = torch.arange(sq, device=device) + q_offset
    k_pos = torch.arange(sk, device=device) + k_offset
    return k_pos[None, :] <= q_pos[:, None]


def _scores(q: Tensor, k: Tensor, scale: float, causal: bool, q_offset: int, k_offset: int,
            dtype: torch.dtype) -> Tensor:
    """Scaled, masked scores [B, Hkv, G, Sq, Sk] in ``dtype`` (masked entries are -inf)."""
    hkv = k.shape[1]
    s = torch.einsum("bhgqd,bhkd->bhgqk", _grouped(q.to(dtype), hkv), k.to(dtype)) * scale
    allowed = _allowed(q.shape[2], k.shape[2], causal, q_offset, k_offset, q.device)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return s


def _reference_forward(q, k, v, scale, causal, q_offset, k_offset, dtype=torch.float32):
    """(out, lse) in ``dtype``; rows without an allowed key give out 0 and lse -inf."""
    s = _scores(q, k, scale, causal, q_offset, k_offset, dtype)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.masked_fill(torch.isneginf(lse), 0.0)[..., None])
    out = torch.einsum("bhgqk,bhkd->bhgqd", p, v.to(dtype))
    return out.flatten(1, 2), lse.flatten(1, 2)


def _reference_backward(q, k, v, out, lse, dout, scale, causal, q_offset, k_offset, delta,
                        dtype=torch.float32):
    """(dq, dk, dv) in ``dtype`` from the final out/lse; dk, dv summed over each query group."""
    hkv = k.shape[1]
    s = _scores(q, k, scale, causal, q_offset, k_offset, dtype)
    lse_g = _grouped(lse.to(dtype), hkv)
    p = torch.exp(s - lse_g.masked_fill(torch.isneginf(lse_g), float("inf"))[..., None])
    if delta is None:
        delta = attention_delta(out, dout)
    do_g = _grouped(dout.to(dtype), hkv)
    dv = torch.einsum("bhgqk,bhgqd->bhkd", p, do_g)
    dp = torch.einsum("bhgqd,bhkd->bhgqk", do_g, v.to(dtype))
    ds = p * (dp - _grouped(delta.to(dtype), hkv)[..., None]) * scale
    dq = torch.einsum("bhgqk,bhkd->bhgqd", ds, k.to(dtype)).flatten(1, 2)
    dk = torch.einsum("bhgqk,bhgqd->bhkd", ds, _grouped(q.to(dtype), hkv))
    return dq, dk, dv


def reference_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool,
                        q_offset: int = 0, k_offset: int = 0,
                        dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Plain (non-blocked) attention in ``dtype`` with the same conventions, for tests."""
    _check_shapes(q, k, v)
    return _reference_forward(q, k, v, scale, causal, q_offset, k_offset, dtype)


# --- the block API ---------------------------------------------------------------------------------

def merge_attention_blocks(out_acc: Tensor, lse_acc: Tensor, out: Tensor, lse: Tensor) -> None:
    """Merges (out, lse) of another key block into the float32 (out_acc, lse_acc), in place."""
    lse_new = torch.logaddexp(lse_acc, lse.float())
    finite = ~torch.isneginf(lse_new)
    safe = torch.where(finite, lse_new, torch.zeros_like(lse_new))
    w_acc = torch.where(finite, torch.exp(lse_acc - safe), torch.zeros_like(safe))
    w_new = torch.where(finite, torch.exp(lse.float() - safe), torch.zeros_like(safe))
    out_acc.mul_(w_acc[..., None]).add_(out.float() * w_new[..., None])
    lse_acc.copy_(lse_new)


def _check_acc(q: Tensor, out_acc: Optional[Tensor], lse_acc: Optional[Tensor]) -> None:
    if (out_acc is None) != (lse_acc is None):
        raise ValueError("accumulate mode needs both out_acc and lse_acc (or neither)")
    if out_acc is None:
        return
    if out_acc.dtype != torch.float32 or lse_acc.dtype != torch.float32:
        raise ValueError(
            f"out_acc/lse_acc must be float32 (got {out_acc.dtype}/{lse_acc.dtype}); allocate them "
            "with torch.zeros(..., dtype=torch.float32) and torch.full(..., -inf)")
    if out_acc.shape != q.shape or lse_acc.shape != q.shape[:3]:
        raise ValueError(
            f"out_acc {tuple(out_acc.shape)} / lse_acc {tuple(lse_acc.shape)} must be "
            f"{tuple(q.shape)} / {tuple(q.shape[:3])}")


def attention_block_forward(q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool,
                            q_offset: int = 0, k_offset: int = 0,
                            out_acc: Optional[Tensor] = None, lse_acc: Optional[Tensor] = None,
                            impl: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Attention of q over one key block: (out in q.dtype, lse float32 [B, Hq, Sq]).

    With ``out_acc`` (float32 [B, Hq, Sq, D]) and ``lse_acc`` (float32 [B, Hq, Sq]), the block is
    merged into them in float32 (in place) and they are returned. Start a merge with out_acc = 0 and
    lse_acc = -inf.
    """
    _check_shapes(q, k, v)
    _check_acc(q, out_acc, lse_acc)
    if _use_triton(q, impl):
        from graphopt.kernels.flash_attention_fwd import flash_attention_forward
        return flash_attention_forward(q, k, v, scale=scale, causal=causal, q_offset=q_offset,
                                       k_offset=k_offset, out_acc=out_acc, lse_acc=lse_acc)
    out, lse = _reference_forward(q, k, v, scale, causal, q_offset, k_offset)
    if out_acc is None:
        return out.to(q.dtype), lse
    merge_attention_blocks(out_acc, lse_acc, out, lse)
    return out_acc, lse_acc


def attention_delta(out: Tensor, dout: Tensor, *, impl: Optional[str] = None) -> Tensor:
    """rowsum(dout * out) in float32, [B, Hq, Sq]: the softmax-backward correction term."""
    if _use_triton(out, impl):
        from graphopt.kernels.flash_attention_bwd import flash_attention_delta
        return flash_attention_delta(out, dout)
    return (dout.float() * out.float()).sum(-1)


def attention_block_backward(q: Tensor, k: Tensor, v: Tensor, out: Optional[Tensor], lse: Tensor,
                             dout: Tensor, *, scale: float, causal: bool, q_offset: int = 0,
                             k_offset: int = 0, delta: Optional[Tensor] = None,
                             dq_acc: Optional[Tensor] = None,
                             impl: Optional[str] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one key block: (dq, dk, dv); dk, dv [B, Hkv, Sk, D] summed over query groups.

    ``out`` and ``lse`` are the final (merged over all key blocks) output and log-sum-exp; ``delta``
    (from ``attention_delta``) can be computed once and passed to every block, and then ``out`` may
    be None (it enters only through delta). With ``dq_acc``
    (float32, q's shape) dq is added into it and returned, and dk, dv come back in float32;
    otherwise dq, dk, dv have q's / k's dtype.
    """
    _check_shapes(q, k, v)
    if out is None and delta is None:
        raise ValueError("attention_block_backward needs out (or delta = attention_delta(out, dout))")
    if dq_acc is not None and (dq_acc.dtype != torch.float32 or dq_acc.shape != q.shape):
        raise ValueError(
            f"dq_acc must be float32 with q's shape {tuple(q.shape)}; got {dq_acc.dtype} "
            f"{tuple(dq_acc.shape)}")
    if _use_triton(q, impl):
        from graphopt.kernels.flash_attention_bwd import flash_attention_backward
        return flash_attention_backward(q, k, v, out, lse, dout, scale=scale, causal=causal,
                                        q_offset=q_offset, k_offset=k_offset, delta=delta,
                                        dq_acc=dq_acc)
    dq, dk, dv = _reference_backward(q, k, v, out, lse, dout, scale, causal, q_offset, k_offset,
                                     delta)
    if dq_acc is not None:
        dq_acc.add_(dq)
        return dq_acc, dk, dv
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# --- custom ops ------------------------------------------------------------------------------------

@torch.library.custom_op("graphopt::attention_block_forward", mutates_args=())
def _attention_block_forward_op(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool,
                                q_offset: int, k_offset: int) -> tuple[Tensor, Tensor]:
    return attention_block_forward(q, k, v, scale=scale, causal=causal, q_offset=q_offset,
                                   k_offset=k_offset)


@_attention_block_forward_op.register_fake
def _(q, k, v, scale, causal, q_offset, k_offset):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("graphopt::attention_block_backward", mutates_args=())
def _attention_block_backward_op(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                 dout: Tensor, delta: Optional[Tensor], scale: float,
                                 causal: bool, q_offset: int,
                                 k_offset: int) -> tuple[Tensor, Tensor, Tensor]:
    return attention_block_backward(q, k, v, out, lse, dout, scale=scale, causal=causal,
                                    q_offset=q_offset, k_offset=k_offset, delta=delta)


@_attention_block_backward_op.register_fake
def _(q, k, v, out, lse, dout, delta, scale, causal, q_offset, k_offset):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@torch.library.custom_op("graphopt::flash_attention", mutates_args=())
def _flash_attention_op(q: Tensor, k: Tensor, v: Tensor, scale: float,
                        causal: bool) -> tuple[Tensor, Tensor]:
    return attention_block_forward(q, k, v, scale=scale, causal=causal)


@_flash_attention_op.register_fake
def _(q, k, v, scale, causal):
    _check_shapes(q, k, v)
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


def _flash_attention_setup_context(ctx, inputs, output):
    q, k, v, scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale, ctx.causal = scale, causal


def _flash_attention_backward(ctx, dout, dlse):
    # d lse / d s = p, so a gradient on the LSE folds into delta: ds = p * (dp - (delta - dlse)).
    q, k, v, out, lse = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else dout.contiguous()
    delta = None
    if dlse is not None:
        delta = attention_delta(out, dout) - dlse
    dq, dk, dv = _attention_block_backward_op(q, k, v, out, lse, dout, delta, ctx.scale,
                                              ctx.causal, 0, 0)
    return dq, dk, dv, None, None


_flash_attention_op.register_autograd(_flash_attention_backward,
                                      setup_context=_flash_attention_setup_context)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None,
                    causal: bool = False) -> tuple[Tensor, Tensor]:
    """Differentiable attention returning (out, lse); scale defaults to 1/sqrt(D)."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return torch.ops.graphopt.flash_attention(q, k, v, float(scale), bool(causal))
