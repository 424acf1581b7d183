"""Tile-triggered GEMM + all-reduce / reduce-scatter on symmetric memory (T3 in software).

One persistent kernel, two kinds of CTAs:

    GEMM CTAs (pid < NUM_GEMM_CTAS), for every output tile in production order:
        acc = A[rows, :] @ B[:, cols]                       (fp32 accumulate)
        partial[rows, cols] = acc                           (this rank's symmetric buffer)
        barrier (all threads' stores issued)
        for p in ranks: flags_p[rank][tile] = epoch         (release, system scope: a push)
    communication CTAs (the rest), for every tile this rank owns, in the same order:
        for p in ranks: wait until flags[p][tile] == epoch  (acquire, on local memory)
        out[tile] = sum over p = 0 .. P-1 of partial_p[tile] (fp32, fixed rank order)

All-reduce: every rank owns every tile (one-shot all-reduce), so the result is bitwise identical on
all ranks (same operands, same order). Reduce-scatter: rank r owns the tile rows of block r; the
GEMM CTAs produce tile rows interleaved across blocks (block 0 row 0, block 1 row 0, ..., block 0
row 1, ...) so every rank's communication CTAs get work from the first tiles on. Tiles are walked
GROUP_M tile rows at a time, column by column (the usual L2 swizzle), and the consumers follow the
same order. Flags are pushed to the consumer's memory so that waiting is a local poll, not a round
trip over NVLink per tile and peer.

Bounds (per rank, M x N x K, P ranks, s bytes per element):
    GEMM: 2 M N K FLOP, (M K + K N) s bytes read (plus re-reads), M N s written to ``partial``;
    communication: (P - 1) * owned_rows * N * s bytes read over NVLink, owned_rows * N * s written.
The kernel takes max(GEMM on the GEMM CTAs, NVLink pulls) plus one tile row of tail.

Flags hold an epoch that the caller bumps on the device before each call, so they never need
resetting; the caller's symmetric-memory barrier before each call keeps a rank from overwriting
``partial`` while a peer still reads the previous call's tiles. No host synchronisation: the call can
be captured in a CUDA graph after the first call has built the workspace.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M = 128
BLOCK_N = 256
BLOCK_K = 64
NUM_WARPS = 8
NUM_STAGES = 3
GROUP_M = 8  # tile rows walked together, column by column, so concurrent tiles share B in L2

_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit
def _grouped(seq, rows, cols, GROUP: tl.constexpr):
    """(row, col) of position ``seq`` when GROUP rows are walked column by column (L2 reuse of B)."""
    width = GROUP * cols
    first = (seq // width) * GROUP
    size = tl.minimum(rows - first, GROUP)
    return first + (seq % width) % size, (seq % width) // size


@triton.jit
def _matmul_tile_signal_kernel(
    a_ptr, b_ptr, partial_ptr, out_ptr, partial_ptrs, flag_ptrs, flags_ptr, epoch_ptr,
    M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
    RANK: tl.constexpr, WORLD: tl.constexpr, SCATTER: tl.constexpr, DTYPE: tl.constexpr,
    NUM_GEMM_CTAS: tl.constexpr, NUM_COMM_CTAS: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    epoch = tl.load(epoch_ptr)
    tiles_m = M // BLOCK_M
    tiles_n = tl.cdiv(N, BLOCK_N)
    num_tiles = tiles_m * tiles_n
    rows_per_block = tiles_m // WORLD
    if pid < NUM_GEMM_CTAS:
        for seq in range(pid, num_tiles, NUM_GEMM_CTAS):
            row_seq, tile_col = _grouped(seq, tiles_m, tiles_n, GROUP_M)
            if SCATTER:  # interleave the rank blocks: every rank's tiles come out from the start
                tile_row = (row_seq % WORLD) * rows_per_block + row_seq // WORLD
            else:
                tile_row = row_seq
            offs_m = (tile_row * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            offs_n = (tile_col * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
            offs_k = tl.arange(0, BLOCK_K)
            a_tile = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
            b_tile = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in range(0, tl.cdiv(K, BLOCK_K)):
                k_left = K - k * BLOCK_K
                a = tl.load(a_tile, mask=offs_k[None, :] < k_left, other=0.0)
                b = tl.load(b_tile, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N), other=0.0)
                acc = tl.dot(a, b, acc)
                a_tile += BLOCK_K * stride_ak
                b_tile += BLOCK_K * stride_bk
            tile = offs_m[:, None] * N + offs_n[None, :]
            tl.store(partial_ptr + tile, acc.to(DTYPE), mask=offs_n[None, :] < N)
            tl.debug_barrier()  # every thread's stores are issued before the flag is released
            # Push "tile ready" into every rank's flag array (slot RANK): consumers poll locally.
            for peer in tl.static_range(WORLD):
                peer_flags = tl.load(flag_ptrs + peer).to(tl.pointer_type(tl.int32))
                tl.atomic_xchg(peer_flags + RANK * num_tiles + tile_row * tiles_n + tile_col, epoch,
                               sem="release", scope="sys")
    else:
        owned_rows = rows_per_block if SCATTER else tiles_m
        first_row = RANK * rows_per_block if SCATTER else 0
        for q in range(pid - NUM_GEMM_CTAS, owned_rows * tiles_n, NUM_COMM_CTAS):
            # The producers' order restricted to this rank's tiles.
            own_row, tile_col = _grouped(q, owned_rows, tiles_n, GROUP_M // WORLD if SCATTER else GROUP_M)
            tile_row = first_row + own_row
            for source in tl.static_range(WORLD):
                flag = flags_ptr + source * num_tiles + tile_row * tiles_n + tile_col
                seen = tl.atomic_add(flag, 0, sem="acquire", scope="sys")
                while seen < epoch:
                    seen = tl.atomic_add(flag, 0, sem="acquire", scope="sys")
            tl.debug_barrier()  # the acquires above order every thread's reads below
            offs_m = (tile_row * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            offs_n = (tile_col * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
            tile = offs_m[:, None] * N + offs_n[None, :]
            mask = offs_n[None, :] < N
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for peer in tl.static_range(WORLD):
                peer_partial = tl.load(partial_ptrs + peer).to(tl.pointer_type(DTYPE))
                total += tl.load(peer_partial + tile, mask=mask, other=0.0).to(tl.float32)
            out_tile = tile - first_row * BLOCK_M * N
            tl.store(out_ptr + out_tile, total.to(DTYPE), mask=mask)


def num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def check_operands(a: torch.Tensor, b: torch.Tensor) -> None:
    """Raise where the kernel cannot multiply ``a`` [M, K] by ``b`` [K, N]."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"tile kernel multiplies [M, K] x [K, N]; got {tuple(a.shape)} x {tuple(b.shape)}")
    if a.dtype != b.dtype or a.dtype not in _TL_DTYPES:
        raise ValueError(f"tile kernel needs one of {list(_TL_DTYPES)} for both operands, got "
                         f"{a.dtype} and {b.dtype}")


def flag_count(m: int, n: int, world: int) -> int:
    """Flags a workspace for an [M, N] output over ``world`` ranks holds: one per tile per rank."""
    return world * (m // BLOCK_M) * triton.cdiv(n, BLOCK_N)


def _launch(a: torch.Tensor, b: torch.Tensor, workspace, comm_sms: int, scatter: bool,
            group_m: int = GROUP_M) -> torch.Tensor:
    """``workspace``: the symmetric buffers of every rank (``graphopt.distributed.symm_mem.
    tile_workspace`` for this shape, ``flag_count`` flags), allocated by the caller."""
    check_operands(a, b)
    m, k = a.shape
    n = b.shape[1]
    world = workspace.world_size
    if m % (BLOCK_M * (world if scatter else 1)):
        raise ValueError(f"M={m} must be a multiple of {BLOCK_M}{' x world size' if scatter else ''} "
                         "for the tile kernel; the cost model picks the chunked runtime otherwise")
    out = a.new_empty(m // world if scatter else m, n)
    # One program per SM on CUDA; under the Triton interpreter (CPU tensors) four GEMM programs.
    sms = num_sms(a.device) if a.is_cuda else comm_sms + 4
    comm_sms = max(1, min(comm_sms, sms - 1))
    workspace.barrier()
    epoch = workspace.next_epoch()
    _matmul_tile_signal_kernel[(sms,)](
        a, b, workspace.partial, out, workspace.partial_ptrs, workspace.flag_ptrs, workspace.flags,
        epoch, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        RANK=workspace.rank, WORLD=world, SCATTER=scatter, DTYPE=_TL_DTYPES[a.dtype],
        NUM_GEMM_CTAS=sms - comm_sms, NUM_COMM_CTAS=comm_sms, GROUP_M=max(group_m, world),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return out


def matmul_all_reduce_tile(a: torch.Tensor, b: torch.Tensor, workspace,
                           comm_sms: int) -> torch.Tensor:
    """all_reduce_sum(a @ b) with tile-triggered one-shot reduction (see the module docstring)."""
    return _launch(a, b, workspace, comm_sms, scatter=False)


def matmul_reduce_scatter_tile(a: torch.Tensor, b: torch.Tensor, workspace,
                               comm_sms: int) -> torch.Tensor:
    """reduce_scatter_sum(a @ b) along rows, tile-triggered: rank r gets rows block r."""
    return _launch(a, b, workspace, comm_sms, scatter=True)

