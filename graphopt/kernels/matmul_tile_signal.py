"""Tile-triggered GEMM + all-reduce / reduce-scatter on symmetric memory (T3 in software).

One persistent kernel, two kinds of CTAs:

    GEMM CTAs (pid < NUM_GEMM_CTAS), for every output tile in production order:
        acc = A[rows, :] @ B[:, cols]                       (fp32 accumulate)
        partial[rows, cols] = acc                           (this rank's symmetric buffer)
        barrier (all threads' stores issued); flags[tile] = epoch   (release, system scope)
    communication CTAs (the rest), for every tile this rank owns, in the same order:
        for p in ranks: wait until flags_p[tile] == epoch   (acquire, system scope)
        out[tile] = sum over p = 0 .. P-1 of partial_p[tile] (fp32, fixed rank order)

All-reduce: every rank owns every tile (one-shot all-reduce), so the result is bitwise identical on
all ranks (same operands, same order). Reduce-scatter: rank r owns the tile rows of block r; the
GEMM CTAs produce tile rows interleaved across blocks (block 0 row 0, block 1 row 0, ..., block 0
row 1, ...) so every rank's communication CTAs get work from the first tiles on.

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

_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit
def _tile_row_of(row_seq, tiles_m, WORLD: tl.constexpr, SCATTER: tl.constexpr):
    """The tile row produced at position ``row_seq`` (interleaved across rank blocks for RS)."""
    if SCATTER:
        rows_per_block = tiles_m // WORLD
        return (row_seq % WORLD) * rows_per_block + row_seq // WORLD
    else:
        return row_seq


@triton.jit
def _matmul_tile_signal_kernel(
    a_ptr, b_ptr, partial_ptr, out_ptr, partial_ptrs, flag_ptrs, flags_ptr, epoch_ptr,
    M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
    RANK: tl.constexpr, WORLD: tl.constexpr, SCATTER: tl.constexpr, DTYPE: tl.constexpr,
    NUM_GEMM_CTAS: tl.constexpr, NUM_COMM_CTAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    epoch = tl.load(epoch_ptr)
    tiles_m = M // BLOCK_M
    tiles_n = tl.cdiv(N, BLOCK_N)
    if pid < NUM_GEMM_CTAS:
        for seq in range(pid, tiles_m * tiles_n, NUM_GEMM_CTAS):
            tile_row = _tile_row_of(seq // tiles_n, tiles_m, WORLD, SCATTER)
            tile_col = seq % tiles_n
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
            tl.atomic_xchg(flags_ptr + tile_row * tiles_n + tile_col, epoch, sem="release",
                           scope="sys")
    else:
        owned_rows = tiles_m // WORLD if SCATTER else tiles_m
        first_row = RANK * owned_rows if SCATTER else 0
        for q in range(pid - NUM_GEMM_CTAS, owned_rows * tiles_n, NUM_COMM_CTAS):
            tile_row = first_row + q // tiles_n
            tile_col = q % tiles_n
            flag_index = tile_row * tiles_n + tile_col
            for peer in tl.static_range(WORLD):
                peer_flags = tl.load(flag_ptrs + peer).to(tl.pointer_type(tl.int32))
                seen = tl.atomic_add(peer_flags + flag_index, 0, sem="acquire", scope="sys")
                while seen < epoch:
                    seen = tl.atomic_add(peer_flags + flag_index, 0, sem="acquire", scope="sys")
            tl.debug_barrier()  # the acquire above orders every thread's reads below
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


def _launch(a: torch.Tensor, b: torch.Tensor, group_name: str, comm_sms: int, scatter: bool,
            workspace=None) -> torch.Tensor:
    from graphopt.distributed import symm_mem

    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"tile kernel multiplies [M, K] x [K, N]; got {tuple(a.shape)} x {tuple(b.shape)}")
    if a.dtype != b.dtype or a.dtype not in _TL_DTYPES:
        raise ValueError(f"tile kernel needs one of {list(_TL_DTYPES)} for both operands, got "
                         f"{a.dtype} and {b.dtype}")
    m, k = a.shape
    n = b.shape[1]
    tiles_m, tiles_n = m // BLOCK_M, triton.cdiv(n, BLOCK_N)
    if workspace is None:
        workspace = symm_mem.tile_workspace(group_name, m, n, a.dtype, a.device, tiles_m * tiles_n)
    world = workspace.world_size
    if m % (BLOCK_M * (world if scatter else 1)):
        raise ValueError(f"M={m} must be a multiple of {BLOCK_M}{' x world size' if scatter else ''} "
                         "for the tile kernel; the cost model picks the chunked runtime otherwise")
    out = a.new_empty(m // world if scatter else m, n)
    sms = num_sms(a.device) if a.is_cuda else comm_sms + 4
    comm_sms = max(1, min(comm_sms, sms - 1))
    workspace.barrier()
    epoch = workspace.next_epoch()
    _matmul_tile_signal_kernel[(sms,)](
        a, b, workspace.partial, out, workspace.partial_ptrs, workspace.flag_ptrs, workspace.flags,
        epoch, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        RANK=workspace.rank, WORLD=world, SCATTER=scatter, DTYPE=_TL_DTYPES[a.dtype],
        NUM_GEMM_CTAS=sms - comm_sms, NUM_COMM_CTAS=comm_sms,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return out


def matmul_all_reduce_tile(a: torch.Tensor, b: torch.Tensor, group_name: str,
                           comm_sms: int) -> torch.Tensor:
    """all_reduce_sum(a @ b) with tile-triggered one-shot reduction (see the module docstring)."""
    return _launch(a, b, group_name, comm_sms, scatter=False)


def matmul_reduce_scatter_tile(a: torch.Tensor, b: torch.Tensor, group_name: str,
                               comm_sms: int) -> torch.Tensor:
    """reduce_scatter_sum(a @ b) along rows, tile-triggered: rank r gets rows block r."""
    return _launch(a, b, group_name, comm_sms, scatter=True)

