"""GEMM fused with the collective that consumes (or feeds) it, as functional custom ops.

Three ops, each the function of the unfused pair it replaces (sum reduction only):

    graphopt::matmul_all_reduce(a, b, bias?, group, mode, chunks, comm_sms)
        = all_reduce_sum(a @ b + bias)                          a [M, K] or [B, M, K]
    graphopt::matmul_reduce_scatter(a, b, group, world, scatter_dim, mode, chunks, comm_sms)
        = reduce_scatter_sum(a @ b, scatter_dim)                a [..., K], out dim scatter_dim / P
    graphopt::all_gather_matmul(a_shard, b, group, world, gather_dim, chunks)
        = (g, g @ b) with g = all_gather(a_shard, gather_dim)

``mode`` picks the runtime: "chunked" (this module, any device and backend) or "tile" (the
tile-triggered Triton kernel on symmetric memory, ``graphopt.kernels.matmul_tile_signal``; CUDA
only; ``comm_sms`` communication CTAs). Both compute the same function; the graph pass chooses with ``graphopt.analysis.overlap_cost``.

Chunked runtime: the GEMM is cut into ``chunks`` row blocks; after each block is written, its
collective is issued asynchronously (``async_op=True``). On NCCL the collective runs on NCCL's
stream, which waits only for the chunk just written, so it overlaps the next chunks' GEMMs; on gloo
it runs on gloo's worker thread. All handles are waited before the op returns, so the result is an
ordinary tensor.

Chunk layouts:
- all-reduce: rows of ``a`` (dim -2); every chunk of the output is a contiguous row block.
- reduce-scatter: the output layout must stay "rank r holds block r of scatter_dim". Chunk j takes
  sub-block j of EVERY rank's block (rows r * M/P + [j*s, (j+1)*s) for all r), stacks them rank-major,
  and reduce-scatters that stack, which hands rank r its own sub-block j; it is written to rows
  [j*s, (j+1)*s) of the result. So the chunk count must divide M / P.
- all-gather: the shard is cut into ``chunks`` row blocks along gather_dim; gathering block j of every
  rank yields rows r * M/P + [j*s, (j+1)*s) of the gathered input, whose GEMM runs while block j+1
  is still in flight.

The ops run after autograd (in the joint graph) and so have no autograd formula; they never mutate
their inputs.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from graphopt import _compat

log = logging.getLogger("graphopt.ops.matmul_collectives")

MODES = ("chunked", "tile")
# torch 2.13 renamed these (same arguments); 2.11 has only the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _group(group_name: str):
    return _compat.resolve_process_group(group_name)


def _chunk_bounds(length: int, chunks: int) -> list[tuple[int, int]]:
    """``chunks`` contiguous [start, end) ranges covering ``length`` (near-equal, none empty)."""
    chunks = max(1, min(chunks, length)) if length > 0 else 1
    base, extra = divmod(length, chunks)
    bounds, start = [], 0
    for index in range(chunks):
        end = start + base + (1 if index < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def _check_mode(mode: str, a: Tensor) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    if mode == "tile" and not a.is_cuda:
        raise ValueError("mode='tile' runs the Triton tile kernel on symmetric memory and needs CUDA "
                         "tensors; use mode='chunked' on CPU")


# --- matmul + all-reduce ---------------------------------------------------------------------------

def _matmul_all_reduce_chunked(a: Tensor, b: Tensor, bias: Optional[Tensor], group_name: str,
                               chunks: int) -> Tensor:
    group = _group(group_name)
    out = torch.empty(*a.shape[:-1], b.shape[-1], dtype=a.dtype, device=a.device)
    works = []
    rows = a.shape[-2]
    for start, end in _chunk_bounds(rows, chunks):
        a_rows = a.narrow(-2, start, end - start)
        if a.dim() == 2:
            target = out.narrow(0, start, end - start)  # a contiguous row block: no copy
            if bias is None:
                torch.mm(a_rows, b, out=target)
            else:
                bias_rows = bias if bias.dim() < 2 else bias.narrow(0, start, end - start)
                torch.addmm(bias_rows, a_rows, b, out=target)
        else:
            # bmm: rows of every batch form a strided block; reduce a contiguous copy of it.
            target = torch.bmm(a_rows, b)
            if bias is not None:
                target = target + (bias if bias.dim() < 2 else bias.narrow(-2, start, end - start))
        works.append((dist.all_reduce(target, group=group, async_op=True), target, start, end))
    for work, target, start, end in works:
        work.wait()
        if a.dim() != 2:
            out.narrow(-2, start, end - start).copy_(target)
    return out


@torch.library.custom_op("graphopt::matmul_all_reduce", mutates_args=())
def matmul_all_reduce(a: Tensor, b: Tensor, bias: Optional[Tensor], group_name: str, mode: str,
                      chunks: int, comm_sms: int) -> Tensor:
    """all_reduce_sum(a @ b + bias) over ``group_name``, overlapped (see the module docstring)."""
    _check_mode(mode, a)
    if mode == "tile":
        from graphopt.kernels.matmul_tile_signal import matmul_all_reduce_tile
        if bias is not None or a.dim() != 2:
            raise ValueError("mode='tile' supports plain 2-D mm (no bias, no batch); the pass "
                             "chooses 'chunked' for addmm and bmm")
        return matmul_all_reduce_tile(a, b, group_name, comm_sms)
    return _matmul_all_reduce_chunked(a, b, bias, group_name, chunks)


@matmul_all_reduce.register_fake
def _(a, b, bias, group_name, mode, chunks, comm_sms):
    return a.new_empty(*a.shape[:-1], b.shape[-1])


# --- matmul + reduce-scatter -----------------------------------------------------------------------

def _scatter_front(a: Tensor, scatter_dim: int) -> Tensor:
    """``a`` [..., K] with the scatter dim moved to the front (a view)."""
    return a.movedim(scatter_dim, 0)


def _matmul_reduce_scatter_chunked(a: Tensor, b: Tensor, group_name: str, world_size: int,
                                   scatter_dim: int, chunks: int) -> Tensor:
    group = _group(group_name)
    front = _scatter_front(a, scatter_dim)            # [S, rest..., K]
    block = front.shape[0] // world_size
    stacked = front.unflatten(0, (world_size, block))  # [P, S/P, rest..., K]
    out_front = torch.empty(block, *front.shape[1:-1], b.shape[-1], dtype=a.dtype, device=a.device)
    works = []
    for start, end in _chunk_bounds(block, chunks):
        partial = torch.matmul(stacked.narrow(1, start, end - start), b).contiguous()
        piece = torch.empty_like(partial[0])
        works.append((_reduce_scatter_single(piece, partial.flatten(0, 1), group=group,
                                                async_op=True),
                      piece, start, end))
    for work, piece, start, end in works:
        work.wait()
        out_front.narrow(0, start, end - start).copy_(piece)
    return out_front.movedim(0, scatter_dim).contiguous()


@torch.library.custom_op("graphopt::matmul_reduce_scatter", mutates_args=())
def matmul_reduce_scatter(a: Tensor, b: Tensor, group_name: str, world_size: int, scatter_dim: int,
                          mode: str, chunks: int, comm_sms: int) -> Tensor:
    """reduce_scatter_sum(a @ b) along ``scatter_dim`` of the output, overlapped."""
    _check_mode(mode, a)
    if a.shape[scatter_dim] % world_size:
        raise ValueError(f"dim {scatter_dim} of size {a.shape[scatter_dim]} is not divisible by "
                         f"world size {world_size}; reduce-scatter needs equal blocks")
    if mode == "tile":
        from graphopt.kernels.matmul_tile_signal import matmul_reduce_scatter_tile
        if a.dim() != 2 or scatter_dim != 0:
            raise ValueError("mode='tile' supports a 2-D mm scattered along rows; the pass chooses "
                             "'chunked' otherwise")
        return matmul_reduce_scatter_tile(a, b, group_name, comm_sms)
    return _matmul_reduce_scatter_chunked(a, b, group_name, world_size, scatter_dim, chunks)


@matmul_reduce_scatter.register_fake
def _(a, b, group_name, world_size, scatter_dim, mode, chunks, comm_sms):
    shape = [*a.shape[:-1], b.shape[-1]]
    shape[scatter_dim] //= world_size
    return a.new_empty(shape)


# --- all-gather + matmul ---------------------------------------------------------------------------

def _all_gather_matmul_chunked(a_shard: Tensor, b: Tensor, group_name: str, world_size: int,
                               gather_dim: int, chunks: int) -> tuple[Tensor, Tensor]:
    group = _group(group_name)
    block = a_shard.shape[gather_dim]
    gathered_shape = list(a_shard.shape)
    gathered_shape[gather_dim] *= world_size
    gathered = a_shard.new_empty(gathered_shape)
    out = a_shard.new_empty(*gathered_shape[:-1], b.shape[-1])
    # Rank-major views: [..., P, S/P, ...] along the gather dim.
    gathered_ranks = gathered.unflatten(gather_dim, (world_size, block))
    out_ranks = out.unflatten(gather_dim, (world_size, block))
    pending = []
    for start, end in _chunk_bounds(block, chunks):
        piece = a_shard.narrow(gather_dim, start, end - start).contiguous()
        received = piece.new_empty(world_size, *piece.shape)
        work = _all_gather_single(received.flatten(0, 1), piece, group=group, async_op=True)
        pending.append((work, received, start, end))
    for work, received, start, end in pending:
        work.wait()
        product = torch.matmul(received, b)  # [P, piece..., N]
        gathered_ranks.narrow(gather_dim + 1, start, end - start).copy_(received.movedim(0, gather_dim))
        out_ranks.narrow(gather_dim + 1, start, end - start).copy_(product.movedim(0, gather_dim))
    return gathered, out


@torch.library.custom_op("graphopt::all_gather_matmul", mutates_args=())
def all_gather_matmul(a_shard: Tensor, b: Tensor, group_name: str, world_size: int, gather_dim: int,
                      chunks: int) -> tuple[Tensor, Tensor]:
    """(g, g @ b) with g = all_gather(a_shard) along ``gather_dim``, overlapped chunk by chunk."""
    return _all_gather_matmul_chunked(a_shard, b, group_name, world_size, gather_dim, chunks)


@all_gather_matmul.register_fake
def _(a_shard, b, group_name, world_size, gather_dim, chunks):
    shape = list(a_shard.shape)
    shape[gather_dim] *= world_size
    return a_shard.new_empty(shape), a_shard.new_empty(*shape[:-1], b.shape[-1])
