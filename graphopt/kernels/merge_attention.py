"""Merge one key block's (out, lse) into float32 accumulators in a single pass (Triton).

For every query row:  lse = logaddexp(lse_acc, lse_blk)
                      out_acc = out_acc * exp(lse_acc - lse) + out_blk * exp(lse_blk - lse)
A row that has seen no key (both lse -inf) keeps out 0 and lse -inf. The torch form of the same
merge (``graphopt.ops.attention.merge_attention_blocks``) makes several passes over the float32
accumulator; this kernel reads each operand once, which matters when a block kernel without an
accumulate mode (torch's cuDNN attention) runs the blocks.

Accumulators may be row views of larger tensors ([B, H, rows, D] with any batch/head strides, rows
and D contiguous per head as the sequence-parallel runtime slices them); the block is contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def merge_rows(out_old, lse_old, out_new, lse_new):
    """(out, lse) of two float32 partial results [rows, D] / [rows] over disjoint key blocks."""
    top = tl.maximum(lse_old, lse_new)
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    w_old = tl.exp(lse_old - top_safe)
    w_new = tl.exp(lse_new - top_safe)
    total = w_old + w_new
    any_seen = total > 0.0
    total_safe = tl.where(any_seen, total, 1.0)
    lse = tl.where(any_seen, top_safe + tl.log(total_safe), float("-inf"))
    out = out_old * (w_old / total_safe)[:, None] + out_new * (w_new / total_safe)[:, None]
    return out, lse


@triton.jit
def _merge_kernel(Out, Lse, Blk, BlkLse, heads, rows,
                  stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                  HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_R: tl.constexpr):
    bh = tl.program_id(1)
    batch, head = bh // heads, bh % heads
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    row_ok = offs_r < rows
    tile_ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    lse_ptrs = Lse + batch * stride_lb + head * stride_lh + offs_r
    out_ptrs = (Out + batch * stride_ob + head * stride_oh + offs_r[:, None] * stride_os
                + offs_d[None, :])
    out, lse = merge_rows(
        tl.load(out_ptrs, mask=tile_ok, other=0.0),
        tl.load(lse_ptrs, mask=row_ok, other=float("-inf")),
        tl.load(Blk + (bh * rows + offs_r[:, None]) * HEAD_DIM + offs_d[None, :], mask=tile_ok,
                other=0.0).to(tl.float32),
        tl.load(BlkLse + bh * rows + offs_r, mask=row_ok, other=float("-inf")))
    tl.store(out_ptrs, out, mask=tile_ok)
    tl.store(lse_ptrs, lse, mask=row_ok)


def merge_blocks_fused(out_acc: Tensor, lse_acc: Tensor, out: Tensor, lse: Tensor) -> None:
    """In place: merge (out [B, H, rows, D], lse float32 [B, H, rows]) into the float32 accumulators."""
    if out_acc.stride(-1) != 1 or lse_acc.stride(-1) != 1 or out_acc.stride(1) % out_acc.shape[-1]:
        raise ValueError("merge_blocks_fused needs accumulators contiguous within each head "
                         f"(strides {out_acc.stride()} / {lse_acc.stride()})")
    if out_acc.stride(2) != out_acc.shape[-1]:
        raise ValueError(f"out_acc rows must be contiguous (strides {out_acc.stride()})")
    batch, heads, rows, head_dim = out_acc.shape
    out, lse = out.contiguous(), lse.contiguous()
    block_r = 64
    grid = (triton.cdiv(rows, block_r), batch * heads)
    _merge_kernel[grid](out_acc, lse_acc, out, lse, heads, rows,
                        out_acc.stride(0), out_acc.stride(1), out_acc.stride(2),
                        lse_acc.stride(0), lse_acc.stride(1),
                        HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
                        BLOCK_R=block_r)


__all__ = ["merge_blocks_fused", "merge_rows"]
