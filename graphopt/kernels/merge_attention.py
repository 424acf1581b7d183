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

from typing import Optional

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


MAX_PARTS = 4


@triton.jit
def _load_part(Out, Lse, bh, offs_r, offs_d, row_ok, tile_ok, stride_o, stride_l,
               HEAD_DIM: tl.constexpr):
    out = tl.load(Out + bh * stride_o + offs_r[:, None] * HEAD_DIM + offs_d[None, :],
                  mask=tile_ok, other=0.0).to(tl.float32)
    lse = tl.load(Lse + bh * stride_l + offs_r, mask=row_ok, other=float("-inf"))
    return out, lse


@triton.jit
def _merge_parts_kernel(Out, Lse, O0, L0, O1, L1, O2, L2, O3, L3, rows, so, sl, so0, sl0, so1,
                        sl1, so2, sl2, so3, sl3, PARTS: tl.constexpr, HEAD_DIM: tl.constexpr,
                        HEAD_DIM_PAD: tl.constexpr, BLOCK_R: tl.constexpr):
    bh = tl.program_id(1).to(tl.int64)
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    row_ok = offs_r < rows
    tile_ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    out, lse = _load_part(O0, L0, bh, offs_r, offs_d, row_ok, tile_ok, so0, sl0, HEAD_DIM)
    if PARTS > 1:
        o, l = _load_part(O1, L1, bh, offs_r, offs_d, row_ok, tile_ok, so1, sl1, HEAD_DIM)
        out, lse = merge_rows(out, lse, o, l)
    if PARTS > 2:
        o, l = _load_part(O2, L2, bh, offs_r, offs_d, row_ok, tile_ok, so2, sl2, HEAD_DIM)
        out, lse = merge_rows(out, lse, o, l)
    if PARTS > 3:
        o, l = _load_part(O3, L3, bh, offs_r, offs_d, row_ok, tile_ok, so3, sl3, HEAD_DIM)
        out, lse = merge_rows(out, lse, o, l)
    tl.store(Out + bh * so + offs_r[:, None] * HEAD_DIM + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=tile_ok)
    tl.store(Lse + bh * sl + offs_r, lse, mask=row_ok)


def flat_head_strides(out: Tensor, lse: Tensor) -> Optional[tuple[int, int]]:
    """Strides of the folded (batch * head) index of out [B, H, rows, D] (rows and D contiguous
    per head) and lse [B, H, rows] (rows contiguous), or None where the layouts do not fold."""
    from graphopt.kernels.sum_partials import flat_heads_stride
    out_stride = flat_heads_stride(out)
    batch, heads = lse.shape[:2]
    if out_stride is None or lse.stride(-1) != 1:
        return None
    if batch > 1 and heads > 1 and lse.stride(0) != heads * lse.stride(1):
        return None
    return out_stride, lse.stride(1) if heads > 1 else lse.stride(0)


def merge_parts_fused(out: Tensor, lse: Tensor, parts: list[tuple[Tensor, Tensor]]) -> None:
    """(out [B, H, rows, D] in its dtype, lse float32 [B, H, rows]) = the merge of 1 to MAX_PARTS
    partial (out, lse) results over disjoint key blocks, in float32, rounded once. Every operand's
    layout must fold batch and head (``flat_head_strides``)."""
    if not 1 <= len(parts) <= MAX_PARTS:
        raise ValueError(f"merge_parts_fused takes 1 to {MAX_PARTS} parts, got {len(parts)}")
    operands = [(out, lse)] + list(parts)
    strides = [flat_head_strides(o, l) for o, l in operands]
    if any(s is None for s in strides) or any(o.shape != out.shape or l.shape != lse.shape
                                              for o, l in operands):
        raise ValueError("merge_parts_fused needs operands of one shape whose batch and head "
                         "fold into one index (rows and D contiguous per head)")
    batch, heads, rows, head_dim = out.shape
    if batch * heads * rows == 0:
        return
    padded = list(parts) + [parts[0]] * (MAX_PARTS - len(parts))
    padded_strides = strides[1:] + [strides[1]] * (MAX_PARTS - len(parts))
    block_r = 64
    grid = (triton.cdiv(rows, block_r), batch * heads)
    _merge_parts_kernel[grid](out, lse, *(x for part in padded for x in part), rows, *strides[0],
                              *(x for pair in padded_strides for x in pair), PARTS=len(parts),
                              HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
                              BLOCK_R=block_r)


__all__ = ["flat_head_strides", "merge_blocks_fused", "merge_parts_fused", "merge_rows", "MAX_PARTS"]
