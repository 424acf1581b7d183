"""Consumers of a tracked GEMM's chunk counters: copy or reduce each chunk the moment it is final.

A tracked GEMM (``graphopt.distributed.tracked_gemm``) sets counter q to 0 when every element of
output chunk q is written. The kernels here run a few CTAs beside it (launched first, so they hold
their SMs; the GEMM is planned for the rest) and walk the chunks in the GEMM's order:

    copy_ready_chunks (a consumer: the stress test's snapshot, the bench's counter latency):
        for q in chunks: wait until counters[q] == 0 (acquire); stamps[q] = globaltimer
                         dst[chunk q] = src[chunk q]
    reduce_ready_chunks (the communication CTAs of the tracked all-reduce / reduce-scatter, P ranks
    on symmetric memory), for every chunk q this rank reduces:
        wait until counters[q] == 0                       (this rank's GEMM wrote chunk q)
        for p in ranks: flags_p[0][rank][q] = epoch       (release, system scope: a push)
        for p in ranks: wait until flags[0][p][q] == epoch (acquire: every rank's chunk q is final)
        dst[chunk q] = sum over p = 0 .. P-1 of partial_p[chunk q]   (fp32, fixed rank order)
    and, two-shot (``GATHER``: the owner reduced its chunks into its own ``partial`` in place),
    for every chunk q another rank p owns: wait until flags[1][p][q] == epoch, then
    out[chunk q] = partial_p[chunk q] (a bitwise copy), after publishing flags[1][rank][q] for its
    own chunks.

A chunk is a block of rows (``AXIS_ROWS``) or of columns of the [M, N] output. Every rank sums the
same operands in the same order, so an all-reduce is bitwise identical on every rank.

Bounds per chunk of R x C elements of s bytes, P ranks: (P - 1) R C s bytes pulled over NVLink and
R C s written (one-shot); the kernel is bound by the CTAs' pull bandwidth, not by arithmetic.
Flags hold an epoch the caller bumps on the device before each call (CUDA-graph safe, never reset).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_R = 32
BLOCK_C = 256
NUM_WARPS = 4


@triton.jit
def _now():
    """The GPU's global nanosecond timer (%globaltimer)."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64,
                                     is_pure=False, pack=1)


@triton.jit
def _wait_equal(ptr, value, SCOPE: tl.constexpr):
    seen = tl.atomic_add(ptr, 0, sem="acquire", scope=SCOPE)
    while seen != value:
        seen = tl.atomic_add(ptr, 0, sem="acquire", scope=SCOPE)


@triton.jit
def _chunk_origin(q, CHUNK_R: tl.constexpr, CHUNK_C: tl.constexpr, AXIS_ROWS: tl.constexpr):
    if AXIS_ROWS:
        return q * CHUNK_R, 0
    return 0, q * CHUNK_C


@triton.jit
def _copy_ready_chunks_kernel(counters_ptr, src_ptr, dst_ptr, stamps_ptr, stride_src, stride_dst,
                              NUM_CHUNKS: tl.constexpr, CHUNK_R: tl.constexpr, CHUNK_C: tl.constexpr,
                              AXIS_ROWS: tl.constexpr, STAMP: tl.constexpr, BLOCK_R: tl.constexpr,
                              BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    ctas = tl.num_programs(0)
    tiles_r = tl.cdiv(CHUNK_R, BLOCK_R)
    tiles_c = tl.cdiv(CHUNK_C, BLOCK_C)
    for q in range(NUM_CHUNKS):
        _wait_equal(counters_ptr + q, 0, "gpu")
        if STAMP:
            if pid == 0:
                tl.store(stamps_ptr + q, _now())
        tl.debug_barrier()   # the acquire above orders every thread's reads below
        row0, col0 = _chunk_origin(q, CHUNK_R, CHUNK_C, AXIS_ROWS)
        for tile in range(pid, tiles_r * tiles_c, ctas):
            rows = row0 + (tile // tiles_c) * BLOCK_R + tl.arange(0, BLOCK_R)
            cols = col0 + (tile % tiles_c) * BLOCK_C + tl.arange(0, BLOCK_C)
            mask = (rows[:, None] < row0 + CHUNK_R) & (cols[None, :] < col0 + CHUNK_C)
            rows64 = rows.to(tl.int64)
            values = tl.load(src_ptr + rows64[:, None] * stride_src + cols[None, :], mask=mask,
                             volatile=True)
            tl.store(dst_ptr + rows64[:, None] * stride_dst + cols[None, :], values, mask=mask)


def copy_ready_chunks(counters: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, chunks: int,
                      axis: str = "rows", ctas: int = 4, stamps: torch.Tensor | None = None) -> None:
    """Enqueue on the current stream: for each chunk q of ``src`` [M, N] in order, wait until
    ``counters[q]`` is 0, then copy the chunk into ``dst`` (same shape; ``stamps[q]``, int64, gets
    the GPU time in ns at which the chunk was seen final). Launch it before the producer, on another
    stream, with fewer CTAs than the producer leaves SMs free."""
    m, n = src.shape
    if src.stride(1) != 1 or dst.stride(1) != 1 or tuple(dst.shape) != (m, n):
        raise ValueError("copy_ready_chunks takes two [M, N] tensors with unit stride along rows")
    extent = m if axis == "rows" else n
    if extent % chunks:
        raise ValueError(f"{extent} {axis} do not split into {chunks} equal chunks")
    chunk_r, chunk_c = (m // chunks, n) if axis == "rows" else (m, n // chunks)
    _copy_ready_chunks_kernel[(ctas,)](
        counters, src, dst, stamps if stamps is not None else counters, src.stride(0), dst.stride(0),
        NUM_CHUNKS=chunks, CHUNK_R=chunk_r, CHUNK_C=chunk_c, AXIS_ROWS=axis == "rows",
        STAMP=stamps is not None, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS)


@triton.jit
def _stamp_kernel(stamps_ptr, index):
    tl.store(stamps_ptr + index, _now())


def stamp(stamps: torch.Tensor, index: int) -> None:
    """Enqueue on the current stream: ``stamps[index]`` (int64) = the GPU's time in ns when the
    stream reaches this point (after the work before it, e.g. the end of a GEMM)."""
    _stamp_kernel[(1,)](stamps, index, num_warps=1)


@triton.jit
def _reduce_ready_chunks_kernel(counters_ptr, partial_ptrs, flag_ptrs, flags_ptr, epoch_ptr, out_ptr,
                                stride_out, out_row0, N,
                                RANK: tl.constexpr, WORLD: tl.constexpr, NUM_CHUNKS: tl.constexpr,
                                OWN_FIRST: tl.constexpr, OWN_COUNT: tl.constexpr,
                                CHUNK_R: tl.constexpr, CHUNK_C: tl.constexpr,
                                AXIS_ROWS: tl.constexpr, GATHER: tl.constexpr, DTYPE: tl.constexpr,
                                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    ctas = tl.num_programs(0)
    epoch = tl.load(epoch_ptr)
    tiles_r = tl.cdiv(CHUNK_R, BLOCK_R)
    tiles_c = tl.cdiv(CHUNK_C, BLOCK_C)
    own_partial = tl.load(partial_ptrs + RANK).to(tl.pointer_type(DTYPE))
    # Stage 1: reduce this rank's chunks (all of them for a one-shot all-reduce).
    for i in range(OWN_COUNT):
        q = OWN_FIRST + i
        _wait_equal(counters_ptr + q, 0, "gpu")
        if pid == 0:   # one CTA tells every rank that this rank's chunk q is final
            for peer in tl.static_range(WORLD):
                peer_flags = tl.load(flag_ptrs + peer).to(tl.pointer_type(tl.int32))
                tl.atomic_xchg(peer_flags + RANK * NUM_CHUNKS + q, epoch, sem="release", scope="sys")
        for source in tl.static_range(WORLD):
            _wait_equal(flags_ptr + source * NUM_CHUNKS + q, epoch, "sys")
        tl.debug_barrier()
        row0, col0 = _chunk_origin(q, CHUNK_R, CHUNK_C, AXIS_ROWS)
        for tile in range(pid, tiles_r * tiles_c, ctas):
            rows = (row0 + (tile // tiles_c) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
            cols = col0 + (tile % tiles_c) * BLOCK_C + tl.arange(0, BLOCK_C)
            mask = (rows[:, None] < row0 + CHUNK_R) & (cols[None, :] < col0 + CHUNK_C)
            offsets = rows[:, None] * N + cols[None, :]
            total = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
            for peer in tl.static_range(WORLD):
                peer_partial = tl.load(partial_ptrs + peer).to(tl.pointer_type(DTYPE))
                total += tl.load(peer_partial + offsets, mask=mask, other=0.0,
                                 volatile=True).to(tl.float32)
            if GATHER:   # two-shot: the reduced chunk replaces this rank's own rows, for the peers
                tl.store(own_partial + offsets, total.to(DTYPE), mask=mask)
            out_rows = rows - out_row0
            tl.store(out_ptr + out_rows[:, None] * stride_out + cols[None, :], total.to(DTYPE),
                     mask=mask)
        if GATHER:
            tl.debug_barrier()
            # Every CTA's stores of chunk q are issued: count this CTA in, the last one publishes.
            done = tl.atomic_add(flags_ptr + 2 * WORLD * NUM_CHUNKS + q, 1, sem="acq_rel", scope="gpu")
            if done == ctas - 1:
                tl.store(flags_ptr + 2 * WORLD * NUM_CHUNKS + q, 0)
                for peer in tl.static_range(WORLD):
                    peer_flags = tl.load(flag_ptrs + peer).to(tl.pointer_type(tl.int32))
                    tl.atomic_xchg(peer_flags + (WORLD + RANK) * NUM_CHUNKS + q, epoch,
                                   sem="release", scope="sys")
    # Stage 2 (two-shot): copy the chunks the other ranks reduced.
    if GATHER:
        for q in range(NUM_CHUNKS):
            owner = q // OWN_COUNT
            if owner != RANK:
                _wait_equal(flags_ptr + (WORLD + owner) * NUM_CHUNKS + q, epoch, "sys")
                tl.debug_barrier()
                owner_partial = tl.load(partial_ptrs + owner).to(tl.pointer_type(DTYPE))
                row0, col0 = _chunk_origin(q, CHUNK_R, CHUNK_C, AXIS_ROWS)
                for tile in range(pid, tiles_r * tiles_c, ctas):
                    rows = (row0 + (tile // tiles_c) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
                    cols = col0 + (tile % tiles_c) * BLOCK_C + tl.arange(0, BLOCK_C)
                    mask = (rows[:, None] < row0 + CHUNK_R) & (cols[None, :] < col0 + CHUNK_C)
                    values = tl.load(owner_partial + rows[:, None] * N + cols[None, :], mask=mask,
                                     volatile=True)
                    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], values, mask=mask)


_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def flag_count(world: int, chunks: int) -> int:
    """int32 flags a workspace holds for ``chunks`` chunks over ``world`` ranks: two stages of one
    flag per rank and chunk, and a CTA arrival count per chunk."""
    return (2 * world + 1) * chunks


def reduce_ready_chunks(workspace, counters: torch.Tensor, out: torch.Tensor, chunks: int,
                        axis: str, mode: str, ctas: int) -> None:
    """Enqueue the communication CTAs of a tracked collective on the current stream (module
    docstring). ``workspace`` holds every rank's ``partial`` [M, N] (this rank's GEMM output),
    ``partial_ptrs`` / ``flag_ptrs`` (device arrays of peer base addresses), ``flags`` (this rank's,
    ``flag_count`` int32) and ``epoch`` (bumped by the caller). ``mode``: "one_shot" (all-reduce,
    every rank reduces every chunk), "two_shot" (all-reduce, chunk owners reduce, the others copy)
    or "reduce_scatter" (``out`` is this rank's row block). Rows chunks must not straddle rank
    blocks where owners matter (chunks a multiple of the world size)."""
    m, n = workspace.partial.shape
    world, rank = workspace.world_size, workspace.rank
    if mode not in ("one_shot", "two_shot", "reduce_scatter"):
        raise ValueError(f"mode={mode!r} is not 'one_shot', 'two_shot' or 'reduce_scatter'")
    owned = mode != "one_shot"
    if owned and (axis != "rows" or chunks % world):
        raise ValueError(f"{mode} assigns row chunks to their rank blocks: axis='rows' and chunks "
                         f"a multiple of the world size {world} (got {axis!r}, {chunks})")
    extent = m if axis == "rows" else n
    if extent % chunks:
        raise ValueError(f"{extent} {axis} do not split into {chunks} equal chunks")
    chunk_r, chunk_c = (m // chunks, n) if axis == "rows" else (m, n // chunks)
    own_count = chunks // world if owned else chunks
    own_first = rank * own_count if owned else 0
    out_row0 = rank * (m // world) if mode == "reduce_scatter" else 0
    _reduce_ready_chunks_kernel[(ctas,)](
        counters, workspace.partial_ptrs, workspace.flag_ptrs, workspace.flags, workspace.epoch, out,
        out.stride(0), out_row0, n, RANK=rank, WORLD=world, NUM_CHUNKS=chunks, OWN_FIRST=own_first,
        OWN_COUNT=own_count, CHUNK_R=chunk_r, CHUNK_C=chunk_c, AXIS_ROWS=axis == "rows",
        GATHER=mode == "two_shot", DTYPE=_TL_DTYPES[out.dtype], BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
        num_warps=NUM_WARPS)
