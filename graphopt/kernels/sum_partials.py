"""Sum up to four gradient partials in one pass (Triton): out = a + b + c + d in float32, rounded
once to out's dtype.

Sequence-parallel attention's backward collects dQ/dK/dV partials per row range (its own blocks,
the blocks helpers compute, the partials peers return) in the dtype the block kernel produced. Summed
into float32 accumulators, every partial costs a read and a write of the float32 tensor plus its
own read, and the accumulators a zero fill and a final cast; here each partial is read once and the
result written once, in its final dtype.

Operands are [B, H, rows, D] tensors whose (rows, D) part is contiguous per head -- row views of
[B, H, S, D] tensors, as the runtime slices them -- with any batch/head strides that let batch and
head fold into one index (``flat_heads_stride``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_INPUTS = 4
_BLOCK = 2048


@triton.jit
def _sum_kernel(Out, A, B, C, D, stride_o, stride_a, stride_b, stride_c, stride_d, inner,
                INPUTS: tl.constexpr, BLOCK: tl.constexpr):
    bh = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < inner
    total = tl.load(A + bh * stride_a + offs, mask=ok, other=0.0).to(tl.float32)
    if INPUTS > 1:
        total += tl.load(B + bh * stride_b + offs, mask=ok, other=0.0).to(tl.float32)
    if INPUTS > 2:
        total += tl.load(C + bh * stride_c + offs, mask=ok, other=0.0).to(tl.float32)
    if INPUTS > 3:
        total += tl.load(D + bh * stride_d + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(Out + bh * stride_o + offs, total.to(Out.dtype.element_ty), mask=ok)


def flat_heads_stride(x: Tensor) -> Optional[int]:
    """The stride of the folded (batch * head) index of a [B, H, rows, D] tensor whose (rows, D)
    part is contiguous per head, or None where the layout does not fold."""
    batch, heads, rows, dim = x.shape
    if x.stride(-1) != 1 or (rows > 1 and x.stride(2) != dim):
        return None
    if batch > 1 and heads > 1 and x.stride(0) != heads * x.stride(1):
        return None
    return x.stride(1) if heads > 1 else x.stride(0)


def sum_partials_fused(out: Tensor, inputs: Sequence[Tensor]) -> None:
    """out = sum(inputs) (1 to MAX_INPUTS CUDA tensors of out's shape), in float32, rounded once."""
    if not 1 <= len(inputs) <= MAX_INPUTS:
        raise ValueError(f"sum_partials_fused takes 1 to {MAX_INPUTS} inputs, got {len(inputs)}")
    strides = [flat_heads_stride(x) for x in (out, *inputs)]
    if any(s is None for s in strides) or any(x.shape != out.shape for x in inputs):
        raise ValueError("sum_partials_fused needs [B, H, rows, D] operands of one shape with "
                         "contiguous (rows, D) per head")
    batch, heads, rows, dim = out.shape
    inner = rows * dim
    if inner == 0 or batch * heads == 0:
        return
    operands = list(inputs) + [inputs[0]] * (MAX_INPUTS - len(inputs))
    operand_strides = strides[1:] + [strides[1]] * (MAX_INPUTS - len(inputs))
    grid = (triton.cdiv(inner, _BLOCK), batch * heads)
    _sum_kernel[grid](out, *operands, strides[0], *operand_strides, inner,
                      INPUTS=len(inputs), BLOCK=_BLOCK)
