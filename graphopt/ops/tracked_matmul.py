"""``graphopt::tracked_mm``: a @ b through cuBLASLt with chunk counters (the tracked GEMM).

    graphopt::tracked_mm(a [M, K], b [K, N], chunks) = a @ b

On CUDA the product comes from ``graphopt.distributed.tracked_gemm``: one cuBLASLt matmul on the
caller's stream that sets a counter per block of M / chunks rows when the block is final (the
device's counter buffer, refilled with 1 before every call); the GEMM runtimes of
``graphopt.ops.tracked_collectives`` consume such counters. Where cuBLASLt refuses the counters
(cuBLAS 13 removed them), ``torch.mm`` computes it, logged once per shape with the reason; on CPU
``torch.mm`` always. Same function, same dtype; results equal ``torch.mm`` within bf16 / fp16
rounding (cuBLASLt's heuristic may pick another kernel than torch's cuBLAS call).

No autograd formula: like the other GEMM + collective ops it is emitted after autograd.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

log = logging.getLogger("graphopt.ops.tracked_matmul")

_COUNTERS: dict[torch.device, Tensor] = {}
_REFUSED: set[tuple] = set()


def counters_for(device: torch.device, chunks: int) -> Tensor:
    """The device's counter buffer of the standalone op (at least ``chunks`` int32)."""
    found = _COUNTERS.get(device)
    if found is None or found.numel() < chunks:
        found = _COUNTERS[device] = torch.ones(max(chunks, 64), dtype=torch.int32, device=device)
    return found[:chunks]


@torch.library.custom_op("graphopt::tracked_mm", mutates_args=())
def tracked_mm(a: Tensor, b: Tensor, chunks: int) -> Tensor:
    """a @ b, the GEMM reporting each finished block of M / ``chunks`` rows (module docstring)."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"graphopt::tracked_mm multiplies [M, K] x [K, N]; got {tuple(a.shape)} x "
                         f"{tuple(b.shape)}")
    if chunks < 1:
        raise ValueError(f"chunks={chunks} must be at least 1")
    if not a.is_cuda:
        return torch.mm(a, b)
    from graphopt.distributed import tracked_gemm

    out = a.new_empty(a.shape[0], b.shape[1])
    found = tracked_gemm.plan(a, b, out, chunks, "rows", "out")
    if isinstance(found, str):
        key = (tuple(a.shape), tuple(b.shape), a.dtype, chunks)
        if key not in _REFUSED:
            _REFUSED.add(key)
            log.warning("graphopt::tracked_mm %s x %s (%s, %d chunks) runs torch.mm: %s",
                        tuple(a.shape), tuple(b.shape), a.dtype, chunks, found)
        return torch.mm(a, b, out=out)
    counters = counters_for(a.device, chunks)
    counters.fill_(tracked_gemm.COUNTER_PENDING)
    tracked_gemm.matmul(a, b, out, counters, chunks, "rows", "out")
    return out


@tracked_mm.register_fake
def _(a, b, chunks):
    return a.new_empty(a.shape[0], b.shape[1])
