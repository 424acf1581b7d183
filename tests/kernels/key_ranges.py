"""Test kernels that store what ``key_block_range`` gives every query block and the forward's tile
order (imported only by the interpreted tests, under TRITON_INTERPRET=1)."""

import triton
import triton.language as tl

from graphopt.kernels.flash_attention_fwd import key_block_range, tile_coordinates


@triton.jit
def key_ranges_kernel(Out, RowStart, q_offset, k_offset, seqlen_q, seqlen_k, window,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr,
                      HAS_ROW_START: tl.constexpr):
    pid = tl.program_id(0)
    last_row = tl.minimum(pid * BLOCK_M + BLOCK_M, seqlen_q) - 1
    first_start = tl.load(RowStart + pid * BLOCK_M)
    last_start = tl.load(RowStart + last_row)
    start, full_start, full_stop, stop = key_block_range(
        q_offset + pid * BLOCK_M, q_offset + last_row, first_start, last_start, k_offset,
        seqlen_k, window, BLOCK_N, True, HAS_WINDOW, HAS_ROW_START)
    tl.store(Out + pid * 4 + 0, start)
    tl.store(Out + pid * 4 + 1, full_start)
    tl.store(Out + pid * 4 + 2, full_stop)
    tl.store(Out + pid * 4 + 3, stop)


@triton.jit
def tile_order_kernel(Out, query_blocks, batch_heads, head_group, CAUSAL: tl.constexpr):
    """Stores (query block, batch * head) of every tile of the forward's grouped order."""
    tile = tl.program_id(0)
    pid_m, pid_bh = tile_coordinates(tile, query_blocks, batch_heads, head_group, CAUSAL)
    tl.store(Out + tile * 2, pid_m)
    tl.store(Out + tile * 2 + 1, pid_bh)
