"""Flash-attention forward over one key block: out, log-sum-exp, sequence offsets, grouped heads.

Bound (per batch*query-head, Sq queries over Sk keys, head dim D, b bytes per element):
  FLOPs  4 * Sq * Sk * D        (q k^T and p v); about halved when causal on a diagonal block
                                (key blocks above the diagonal are skipped, not masked)
  bytes  b * D * (2 * Sq + 2 * Sk * ceil(Sq / BLOCK_M)) + 4 * Sq   (q, out once; k, v once per
                                query block; lse) -- compute-bound for Sq, Sk >~ 1K on H100/H200.

Each program owns BLOCK_M query rows of one (batch, query head) and walks the key blocks its rows
may see, keeping the running row max m, the running sum l of exp(s - m) and the unnormalised output
in registers (online softmax, base 2). Key blocks wholly visible to every row of the program run
without masks; the blocks on the causal diagonal and the ragged last block run with masks.
Query head h reads key/value head h // group (grouped-query attention, no K/V copies).

Causal masks may also be narrowed per row (both in global positions, so ring steps keep them):
  WINDOW w > 0   a query at position p sees keys at positions (p - w, p]     (sliding window)
  ROW_START rs   a query row sees keys at positions >= rs[row]               (packed documents:
                 rs is where the row's document starts; rows of a batch element are non-decreasing)
Key blocks no row of the program may see are skipped, not masked: with documents of length L (or a
window of L), a program walks about L / BLOCK_N key blocks instead of position / BLOCK_N
(``graphopt.kernels.attention_tiles`` counts them).

ACCUMULATE merges the result into an existing float32 (out, lse) pair in place:
  lse = logaddexp(lse_acc, lse_blk);  out = out_acc * exp(lse_acc - lse) + out_blk * exp(lse_blk - lse)

Variants (FORWARD_VARIANTS; the same function):
  pointer         K/V tiles by pointer loads, software-pipelined over num_stages (the kernel before
                  issue 32; runs anywhere, and is what the others fall back to)
  (all others)    unmasked tiles fold the scale into the exponent's FMA (scale > 0)
  tma             K/V tiles by TMA descriptors built on the device per head (bounds are the head's
                  rows, so ragged tiles load zeros without masks); Hopper or newer
  tma_ws          tma with Triton's warp specialisation of the key loop (producer warps load)
  tma_persistent  tma with one program per SM walking the (query block, head) tiles
  (all but pointer) programs take tiles in groups of heads whose K/V fit in L2, and within a
                  group query blocks outer, heads inner: every head's longest (causal) tiles
                  start early, not only the first heads' (the tail of the last head's long
                  tiles costs up to ~10% at 8K)
The default (DEFAULT_FORWARD_VARIANT, "pointer": the fastest or within 1.3% of it on one H100)
runs; a TMA default would run where TMA can address the tensors, else step down FORWARD_FALLBACKS. A
default-chosen variant that this Triton cannot compile for a specialisation is logged once
(VARIANT_FAILURES) and its fallback runs. ``launch_counts`` records which variant ran.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from graphopt.kernels import launch_counts, unit_last_stride
from graphopt.kernels.merge_attention import merge_rows

LOG2E = 1.4426950408889634
# Constants read inside kernels must be constexpr globals.
LOG2E_IN_KERNEL = tl.constexpr(LOG2E)
LN2 = tl.constexpr(0.6931471805599453)

# On GPUs, pick block sizes by timing the configs below (once per tuning key); False launches
# config number UNTUNED_CONFIG (the first by default) untimed, which keeps tests that compile many
# shapes quick and lets a warm-up compile each config in its own process.
AUTOTUNE = True
UNTUNED_CONFIG = 0
# An untuned launch whose config does not compile here steps to the next one (``launch``); False
# runs exactly UNTUNED_CONFIG and raises, for bench/attention.py to record which configs compile.
UNTUNED_STEP = True

# Lengths, offsets and head counts vary from call to call (ring steps, GQA) and need no alignment:
# specialising on them (== 1, % 16 == 0) would only multiply compilations.
UNSPECIALIZED = ["group", "seqlen_q", "seqlen_k", "q_offset", "k_offset", "window", "SEQ_BUCKET",
                 "stride_rb"]

# Blocks used under the Triton interpreter and for CPU tensors (the smallest tl.dot accepts).
INTERPRET_BLOCK_M = 16
INTERPRET_BLOCK_N = 16


@triton.jit
def rows_source(base, seqlen, stride, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
                HEAD_DIM_PAD: tl.constexpr, USE_TMA: tl.constexpr):
    """Where ``load_rows`` reads one head's [seqlen, HEAD_DIM] rows: a TMA descriptor of BLOCK-row
    tiles (zero outside the head's rows and columns), or the head's base pointer."""
    if USE_TMA:
        return tl.make_tensor_descriptor(base, shape=[seqlen, HEAD_DIM], strides=[stride, 1],
                                         block_shape=[BLOCK, HEAD_DIM_PAD])
    else:
        return base


@triton.jit
def load_rows(source, first_row, offs_rows, seqlen, stride, offs_d, HEAD_DIM: tl.constexpr,
              HEAD_DIM_PAD: tl.constexpr, MASK_ROWS: tl.constexpr, USE_TMA: tl.constexpr):
    """Rows first_row + offs_rows of a ``rows_source``, [BLOCK, HEAD_DIM_PAD]: zeros past seqlen
    (TMA always; pointers where MASK_ROWS) and past HEAD_DIM."""
    if USE_TMA:
        return source.load([first_row, 0])
    else:
        rows = first_row + offs_rows
        ptrs = source + rows[:, None] * stride + offs_d[None, :]
        if MASK_ROWS:
            return tl.load(ptrs, mask=(rows[:, None] < seqlen) & (offs_d[None, :] < HEAD_DIM),
                           other=0.0)
        elif HEAD_DIM != HEAD_DIM_PAD:
            return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        else:
            return tl.load(ptrs)


@triton.jit
def _attend_key_blocks(acc, m_i, l_i, q, k_src, v_src, stride_kn, stride_vn,
                       q_pos, row_start, start_n, stop_n, seqlen_k, k_offset, window,
                       qk_scale_log2, offs_n, offs_d,
                       BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                       HEAD_DIM_PAD: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                       HAS_ROW_START: tl.constexpr, MASKED: tl.constexpr,
                       FMA_SOFTMAX: tl.constexpr, USE_TMA: tl.constexpr,
                       WARP_SPECIALIZE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    for block_start in tl.range(start_n, stop_n, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        k = load_rows(k_src, block_start, offs_n, seqlen_k, stride_kn, offs_d, HEAD_DIM,
                      HEAD_DIM_PAD, MASKED, USE_TMA)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if MASKED:
            cols = block_start + offs_n
            allowed = visible(q_pos, row_start, k_offset + cols, window, CAUSAL, HAS_WINDOW,
                              HAS_ROW_START) & (cols[None, :] < seqlen_k)
            s = tl.where(allowed, qk * qk_scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row with nothing visible yet keeps m = -inf; shift it by 0 so exp2 gives 0, not NaN.
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_new_safe[:, None])
        elif FMA_SOFTMAX:
            # max(qk) * scale = max(qk * scale) for scale > 0 (the host checks), and
            # qk * scale - m is one FMA: on Hopper the softmax's ALU work, not the tensor cores,
            # bounds the forward.
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale_log2)
            m_new_safe = m_new
            p = tl.exp2(qk * qk_scale_log2 - m_new[:, None])
        else:
            s = qk * qk_scale_log2
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_new_safe = m_new
            p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_rows(v_src, block_start, offs_n, seqlen_k, stride_vn, offs_d, HEAD_DIM,
                      HEAD_DIM_PAD, MASKED, USE_TMA)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def visible(q_pos, row_start, k_pos, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
            HAS_ROW_START: tl.constexpr):
    """[rows, keys]: which keys (global positions k_pos) each query (q_pos, row_start) sees."""
    allowed = (k_pos[None, :] * 0 + q_pos[:, None] * 0) == 0  # all true, of the block's shape
    if CAUSAL:
        allowed = allowed & (k_pos[None, :] <= q_pos[:, None])
    if HAS_WINDOW:
        allowed = allowed & (q_pos[:, None] - k_pos[None, :] < window)
    if HAS_ROW_START:
        allowed = allowed & (k_pos[None, :] >= row_start[:, None])
    return allowed


@triton.jit
def key_block_range(first_row_pos, last_row_pos, first_row_start, last_row_start, k_offset,
                    seqlen_k, window, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                    HAS_WINDOW: tl.constexpr, HAS_ROW_START: tl.constexpr):
    """Key blocks [start, stop) some row of a query block (rows at positions first_row_pos ..
    last_row_pos) may see, and [full_start, full_stop) inside it that every row sees whole;
    block-aligned (full_start >= full_stop: no block is wholly visible)."""
    start = 0
    full_start = 0
    stop = seqlen_k
    full_stop = seqlen_k
    if CAUSAL:
        stop = tl.minimum(tl.maximum(last_row_pos + 1 - k_offset, 0), seqlen_k)
        full_stop = tl.minimum(tl.maximum(first_row_pos + 1 - k_offset, 0), seqlen_k)
    if HAS_WINDOW:
        start = tl.maximum(start, first_row_pos - window + 1 - k_offset)
        full_start = tl.maximum(full_start, last_row_pos - window + 1 - k_offset)
    if HAS_ROW_START:
        start = tl.maximum(start, first_row_start - k_offset)
        full_start = tl.maximum(full_start, last_row_start - k_offset)
    # A block whose rows see no key at all (a window or document past the block's keys) walks none.
    start = tl.where(start < stop, (start // BLOCK_N) * BLOCK_N, stop)
    full_start = tl.minimum(((full_start + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, stop)
    full_stop = (full_stop // BLOCK_N) * BLOCK_N
    return start, full_start, full_stop, stop


@triton.jit
def query_block_keys(row_starts, pid_m, offs_m, row_ok, seqlen_q, seqlen_k, q_offset, k_offset,
                     window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                     HAS_WINDOW: tl.constexpr, HAS_ROW_START: tl.constexpr):
    """For query block ``pid_m``: its rows' document starts (``offs_m``, unused, without
    documents) and ``key_block_range``'s (start, full_start, full_stop, stop)."""
    last_row = tl.minimum(pid_m * BLOCK_M + BLOCK_M, seqlen_q) - 1
    row_start = offs_m
    first_row_start = 0
    last_row_start = 0
    if HAS_ROW_START:
        row_start = tl.load(row_starts + offs_m, mask=row_ok, other=0)
        first_row_start = tl.load(row_starts + pid_m * BLOCK_M)
        last_row_start = tl.load(row_starts + last_row)
    start, full_start, full_stop, stop = key_block_range(
        q_offset + pid_m * BLOCK_M, q_offset + last_row, first_row_start, last_row_start,
        k_offset, seqlen_k, window, BLOCK_N, CAUSAL, HAS_WINDOW, HAS_ROW_START)
    return row_start, start, full_start, full_stop, stop


@triton.jit
def _forward_tile(pid_m, pid_bh, Q, K, V, Out, Lse, RowStart,
                  stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                  stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                  stride_lb, stride_lh, stride_rb,
                  num_heads, group, seqlen_q, seqlen_k, q_offset, k_offset, window, qk_scale_log2,
                  HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, CAUSAL: tl.constexpr,
                  HAS_WINDOW: tl.constexpr, HAS_ROW_START: tl.constexpr,
                  ACCUMULATE: tl.constexpr, FMA_SOFTMAX: tl.constexpr, USE_TMA: tl.constexpr,
                  WARP_SPECIALIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query block pid_m of (batch, head) pid_bh: its out and lse, over the key blocks it sees."""
    batch = (pid_bh // num_heads).to(tl.int64)
    head = (pid_bh % num_heads).to(tl.int64)
    kv_head = head // group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    row_ok = offs_m < seqlen_q
    d_ok = offs_d[None, :] < HEAD_DIM
    q_pos = q_offset + offs_m

    q_ptrs = Q + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok, other=0.0)
    k_src = rows_source(K + batch * stride_kb + kv_head * stride_kh, seqlen_k, stride_kn, BLOCK_N,
                        HEAD_DIM, HEAD_DIM_PAD, USE_TMA)
    v_src = rows_source(V + batch * stride_vb + kv_head * stride_vh, seqlen_k, stride_vn, BLOCK_N,
                        HEAD_DIM, HEAD_DIM_PAD, USE_TMA)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)

    row_start, start, full_start, full_stop, stop = query_block_keys(
        RowStart + batch * stride_rb, pid_m, offs_m, row_ok, seqlen_q, seqlen_k, q_offset,
        k_offset, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW, HAS_ROW_START)

    if full_start < full_stop:
        acc, m_i, l_i = _attend_key_blocks(
            acc, m_i, l_i, q, k_src, v_src, stride_kn, stride_vn, q_pos, row_start, start,
            full_start, seqlen_k, k_offset, window, qk_scale_log2, offs_n, offs_d, BLOCK_N,
            HEAD_DIM, HEAD_DIM_PAD, CAUSAL, HAS_WINDOW, HAS_ROW_START, True, FMA_SOFTMAX,
            USE_TMA, WARP_SPECIALIZE, DOT_PRECISION)
        acc, m_i, l_i = _attend_key_blocks(
            acc, m_i, l_i, q, k_src, v_src, stride_kn, stride_vn, q_pos, row_start, full_start,
            full_stop, seqlen_k, k_offset, window, qk_scale_log2, offs_n, offs_d, BLOCK_N,
            HEAD_DIM, HEAD_DIM_PAD, CAUSAL, HAS_WINDOW, HAS_ROW_START, False, FMA_SOFTMAX,
            USE_TMA, WARP_SPECIALIZE, DOT_PRECISION)
        acc, m_i, l_i = _attend_key_blocks(
            acc, m_i, l_i, q, k_src, v_src, stride_kn, stride_vn, q_pos, row_start, full_stop,
            stop, seqlen_k, k_offset, window, qk_scale_log2, offs_n, offs_d, BLOCK_N, HEAD_DIM,
            HEAD_DIM_PAD, CAUSAL, HAS_WINDOW, HAS_ROW_START, True, FMA_SOFTMAX, USE_TMA,
            WARP_SPECIALIZE, DOT_PRECISION)
    else:
        acc, m_i, l_i = _attend_key_blocks(
            acc, m_i, l_i, q, k_src, v_src, stride_kn, stride_vn, q_pos, row_start, start,
            stop, seqlen_k, k_offset, window, qk_scale_log2, offs_n, offs_d, BLOCK_N, HEAD_DIM,
            HEAD_DIM_PAD, CAUSAL, HAS_WINDOW, HAS_ROW_START, True, FMA_SOFTMAX, USE_TMA,
            WARP_SPECIALIZE, DOT_PRECISION)

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * LN2, float("-inf"))
    out = acc / l_safe[:, None]

    o_ptrs = (Out + batch * stride_ob + head * stride_oh + offs_m[:, None] * stride_om
              + offs_d[None, :])
    lse_ptrs = Lse + batch * stride_lb + head * stride_lh + offs_m
    o_mask = row_ok[:, None] & d_ok
    if ACCUMULATE:
        out, lse = merge_rows(tl.load(o_ptrs, mask=o_mask, other=0.0),
                              tl.load(lse_ptrs, mask=row_ok, other=float("-inf")), out, lse)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=o_mask)
    tl.store(lse_ptrs, lse, mask=row_ok)


@triton.jit
def tile_coordinates(tile, query_blocks, batch_heads, head_group, CAUSAL: tl.constexpr):
    """(query block, batch * head) of the tile-th program of the grouped order: head_group heads
    at a time (their K/V stay in L2), within them query blocks outer and heads inner, so every
    head's diagonal-heavy blocks start early (causal) and the short ones fill the tail."""
    section = tile // (head_group * query_blocks)
    first_bh = section * head_group
    heads_here = tl.minimum(head_group, batch_heads - first_bh)
    index = tile - section * head_group * query_blocks
    pid_m = index // heads_here
    if CAUSAL:
        pid_m = query_blocks - 1 - pid_m
    return pid_m, first_bh + index % heads_here


@triton.jit(do_not_specialize=UNSPECIALIZED + ["num_heads", "batch_heads", "head_group"])
def _flash_fwd_kernel(Q, K, V, Out, Lse, RowStart,
                      stride_qb, stride_qh, stride_qm,
                      stride_kb, stride_kh, stride_kn,
                      stride_vb, stride_vh, stride_vn,
                      stride_ob, stride_oh, stride_om,
                      stride_lb, stride_lh, stride_rb,
                      num_heads, group, seqlen_q, seqlen_k, q_offset, k_offset, window,
                      qk_scale_log2, SEQ_BUCKET, batch_heads, head_group,
                      HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                      CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                      HAS_ROW_START: tl.constexpr, ACCUMULATE: tl.constexpr,
                      FMA_SOFTMAX: tl.constexpr, USE_TMA: tl.constexpr,
                      WARP_SPECIALIZE: tl.constexpr, GROUPED_TILES: tl.constexpr,
                      PERSISTENT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    query_blocks = tl.cdiv(seqlen_q, BLOCK_M)
    if PERSISTENT:
        # One program per SM walks the tiles in the grouped order.
        for tile in tl.range(tl.program_id(0), query_blocks * batch_heads, tl.num_programs(0)):
            pid_m, pid_bh = tile_coordinates(tile, query_blocks, batch_heads, head_group, CAUSAL)
            _forward_tile(pid_m, pid_bh, Q, K, V, Out, Lse, RowStart,
                          stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                          stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                          stride_lb, stride_lh, stride_rb, num_heads, group, seqlen_q, seqlen_k,
                          q_offset, k_offset, window, qk_scale_log2, HEAD_DIM, HEAD_DIM_PAD,
                          CAUSAL, HAS_WINDOW, HAS_ROW_START, ACCUMULATE, FMA_SOFTMAX, USE_TMA,
                          WARP_SPECIALIZE, DOT_PRECISION, BLOCK_M, BLOCK_N)
    else:
        if GROUPED_TILES:
            pid_m, pid_bh = tile_coordinates(tl.program_id(0), query_blocks, batch_heads,
                                             head_group, CAUSAL)
        else:
            # A 2-D grid, head by head; diagonal-heavy query blocks first within each head.
            pid_bh = tl.program_id(1)
            pid_m = tl.program_id(0)
            if CAUSAL:
                pid_m = query_blocks - 1 - pid_m
        _forward_tile(pid_m, pid_bh, Q, K, V, Out, Lse, RowStart,
                      stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                      stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                      stride_lb, stride_lh, stride_rb, num_heads, group, seqlen_q, seqlen_k,
                      q_offset, k_offset, window, qk_scale_log2, HEAD_DIM, HEAD_DIM_PAD,
                      CAUSAL, HAS_WINDOW, HAS_ROW_START, ACCUMULATE, FMA_SOFTMAX, USE_TMA,
                      WARP_SPECIALIZE, DOT_PRECISION, BLOCK_M, BLOCK_N)


# Hopper (H100/H200) configs for bf16/fp16. At D = 128 none spills registers (ptxas, sm_90a).
HALF_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
]
# Larger tiles that fit only small heads. At D = 128, 128 x 128 in 2 stages and 128 x 64 in 4 need
# 294,912 bytes of shared memory with pointer loads and 294,976-295,040 with TMA (every mask and
# variant, one H100, triton 3.6: bench/results/attention.json's compile_failures), where H100, H200
# and B200 give a block at most 232,448: each only cost an autotuning compile there.
SMALL_HEAD_DIM = 64
HALF_CONFIGS_SMALL_HEAD = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=4),
]
# float32 tiles take twice the registers and shared memory (and full-precision dots).
FP32_CONFIGS = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2)]


def tuned_by_dtype(kernel, half_configs, fp32_configs, key, restore_value=(),
                   small_head_configs=()):
    """One autotuner per tile-size family: {"half": ..., "fp32": ...}; ``small_head_configs``
    join the half family for head dims up to SMALL_HEAD_DIM."""
    small_head_configs = list(small_head_configs)

    def drop_large_tiles_for_large_heads(configs, named_args, **kwargs):
        if kwargs.get("HEAD_DIM_PAD", SMALL_HEAD_DIM) <= SMALL_HEAD_DIM:
            return configs
        return [c for c in configs if all(c is not small for small in small_head_configs)]

    return {family: triton.autotune(
                configs=configs, key=key, restore_value=list(restore_value),
                prune_configs_by={"early_config_prune": drop_large_tiles_for_large_heads})(kernel)
            for family, configs in (("half", half_configs + small_head_configs),
                                    ("fp32", fp32_configs))}


def dtype_family(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "half"


# Accumulate mode rewrites Out/Lse in place, so tuning runs restore them between trials.
_flash_fwd_tuned = tuned_by_dtype(
    _flash_fwd_kernel, HALF_CONFIGS, FP32_CONFIGS,
    key=["SEQ_BUCKET", "HEAD_DIM_PAD", "CAUSAL", "HAS_WINDOW", "HAS_ROW_START", "ACCUMULATE",
         "FMA_SOFTMAX", "USE_TMA", "WARP_SPECIALIZE", "GROUPED_TILES", "PERSISTENT"],
    restore_value=["Out", "Lse"],
    small_head_configs=HALF_CONFIGS_SMALL_HEAD)


# (autotuner, the launch's constexprs) -> the config an untuned launch runs: UNTUNED_CONFIG, or the
# first after it that this device can compile.
_UNTUNED_CHOICE: dict = {}


def launch(tuned, grid, args, meta) -> None:
    """Runs an autotuned kernel, or one fixed config of it when AUTOTUNE is off: UNTUNED_CONFIG,
    stepping to the next config where that one does not compile here (out of shared memory, say),
    as the autotuner skips such configs. On one H100 the fused backward's first config needs
    263 KB of shared memory with TMA reductions (232 KB there), which failed every untuned launch
    of atomic_dq_tma."""
    if AUTOTUNE:
        tuned[grid](*args, **meta)
        return
    configs = tuned.early_config_prune(tuned.configs, {}, **meta)
    key = (id(tuned), tuple(sorted(meta.items())))
    first = _UNTUNED_CHOICE.get(key, min(UNTUNED_CONFIG, len(configs) - 1))
    for index in range(first, len(configs)):
        config = configs[index]
        try:
            tuned.fn[grid(config.kwargs)](*args, **meta, **config.kwargs,
                                          num_warps=config.num_warps,
                                          num_stages=config.num_stages)
        except Exception as err:  # noqa: BLE001 - only compile failures go on to the next config
            if UNTUNED_STEP and index + 1 < len(configs) and compile_failure(err):
                continue
            raise
        _UNTUNED_CHOICE[key] = index
        return


# --- kernel variants -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ForwardVariant:
    tma: bool  # K/V tiles through TMA descriptors (Hopper's bulk copies) instead of pointer loads
    warp_specialize: bool = False  # producer warps issue the loads, consumer warps compute
    persistent: bool = False  # one program per SM walks the query tiles
    fma_softmax: bool = True  # unmasked tiles scale inside the exponent's FMA
    grouped_tiles: bool = True  # tiles in L2-sized head groups, longest first (tile_coordinates)


FORWARD_VARIANTS = {
    # The kernel before issue 32, arithmetic included; the fallback everywhere.
    "pointer": ForwardVariant(tma=False, fma_softmax=False, grouped_tiles=False),
    "tma": ForwardVariant(tma=True),
    "tma_ws": ForwardVariant(tma=True, warp_specialize=True),
    "tma_persistent": ForwardVariant(tma=True, persistent=True),
}
# Measured on one H100 (bench/results/attention.md, S = 16K, Hkv 8, bf16, D = 128): pointer was
# the fastest on windows (2.61 vs 2.79-2.85 ms) and documents (1.04 vs 1.14-1.20 ms) and within
# 1.3% of the fastest (tma_persistent) on causal, so it is the default.
DEFAULT_FORWARD_VARIANT = "pointer"
# What a default-chosen variant falls back to where it cannot run or fails to compile.
FORWARD_FALLBACKS = {"tma_ws": "tma", "tma_persistent": "tma", "tma": "pointer"}
# A name here forces that variant for every launch (the benchmark times each); None: the default
# where it applies (TMA needs sm90+ and aligned strides), "pointer" elsewhere.
FORWARD_VARIANT: Optional[str] = None
# Variants that, on this device and Triton, failed to compile: (kernel, variant, specialisation)
# -> the compiler's message. Launches that chose the variant by default then run its fallback.
VARIANT_FAILURES: dict[tuple, str] = {}
_LOG = logging.getLogger("graphopt.kernels.flash_attention")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def tma_ready(*tensors: torch.Tensor) -> bool:
    """Whether TMA descriptors can address these [B, H, S, D] tensors: Hopper or newer (or the
    interpreter), rows of a power-of-two head dim (a tile then spans exactly the row; the
    kernels pad other head dims with masked pointer loads), no empty sequence, a 16-byte aligned
    base and 16-byte multiples for every stride but the unit last one."""
    if not interpreting() and not all(
            x.is_cuda and torch.cuda.get_device_capability(x.device) >= (9, 0) for x in tensors):
        return False
    return all(x.shape[-1] == head_dim_padded(x.shape[-1]) and x.shape[-2] > 0
               and x.data_ptr() % 16 == 0
               and all(s * x.element_size() % 16 == 0 for s in x.stride()[:-1]) for x in tensors)


def pick_variant(variants: dict, forced: Optional[str], default: str, fallbacks: dict,
                 tma_ok: bool, kernel: str) -> tuple[str, bool]:
    """(variant name, strict). A forced name is checked and kept (strict: a compile failure
    raises); the default steps down its fallbacks to one that needs no TMA where TMA cannot
    address the tensors."""
    if forced is not None:
        if forced not in variants:
            raise ValueError(f"{kernel} variant {forced!r} is not one of {sorted(variants)}")
        if variants[forced].tma and not tma_ok:
            raise ValueError(
                f"the {kernel} variant {forced!r} reads through TMA descriptors, which need an "
                "sm90+ GPU and 16-byte aligned tensors with 16-byte multiple strides; pass a "
                "contiguous copy, or pick a variant without TMA")
        return forced, True
    name = default
    while variants[name].tma and not tma_ok:
        name = fallbacks[name]
    return name, False


def compile_failure(err: Exception) -> bool:
    """A Triton compile failure (a construct this device / Triton version cannot lower), as
    opposed to a launch or runtime error."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources
    if isinstance(err, (CompilationError, OutOfResources)):
        return True
    return type(err).__name__ == "PTXASError" or (
        isinstance(err, RuntimeError) and "PassManager" in str(err))


def run_variant(kernel: str, variant: str, strict: bool, spec: tuple, fallbacks: dict,
                run: Callable[[str], None]) -> str:
    """run(variant); where a default-chosen variant fails to compile, logs it once, remembers it
    for this specialisation and runs its fallback instead. Returns the variant that ran."""
    while True:
        key = (kernel, variant, spec)
        if not strict and key in VARIANT_FAILURES:
            variant = fallbacks[variant]
            continue
        try:
            run(variant)
        except Exception as err:  # noqa: BLE001 - only compile failures are caught, below
            if strict or variant not in fallbacks or not compile_failure(err):
                raise
            VARIANT_FAILURES[key] = str(err).strip().splitlines()[-1][:300] if str(err) else \
                type(err).__name__
            _LOG.warning("Triton could not compile the %s kernel's %s variant for %s (%s); running "
                         "its %s variant instead", kernel, variant, spec, VARIANT_FAILURES[key],
                         fallbacks[variant])
            variant = fallbacks[variant]
            continue
        launch_counts[f"triton_{kernel}:{variant}"] += 1
        return variant


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_descriptor_scratch() -> None:
    """Kernels that build TMA descriptors on the device need Triton's scratch allocator; set it to
    torch's caching allocator unless the user set one. Per launch: the setting is per thread
    (context variable) and autograd runs the backward on its own thread."""
    from triton.runtime import _allocation
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def on_gpu(x: torch.Tensor) -> bool:
    """Compiled kernels (autotuned, Hopper tiles); otherwise the interpreter's small tiles."""
    return x.is_cuda and not interpreting()


def head_dim_padded(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def dot_precision(dtype: torch.dtype, on_gpu: bool) -> str:
    """Half types use the tensor cores as they are; float32 gets float32-accurate products: three
    tf32 passes on the GPU (plain float32 FMAs spill and compile for minutes), exact under the
    interpreter."""
    if dtype != torch.float32:
        return "tf32"
    return "tf32x3" if on_gpu else "ieee"


def seq_bucket(seqlen_q: int, seqlen_k: int) -> int:
    """Autotuning key for lengths: one tuning per power of two up to 8K, one beyond."""
    return min(triton.next_power_of_2(max(seqlen_q, seqlen_k)), 8192)


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128


def check_supported(*tensors: torch.Tensor) -> None:
    """Raises for inputs the kernels do not handle, naming the way out."""
    dtypes = {x.dtype for x in tensors}
    if len(dtypes) != 1 or not dtypes <= set(SUPPORTED_DTYPES):
        raise ValueError(
            f"the Triton flash-attention kernels take q, k, v of one dtype among float16, bfloat16, "
            f"float32; got {sorted(str(d) for d in dtypes)}; cast them, or pass impl='reference'")
    if tensors[0].shape[-1] > MAX_HEAD_DIM:
        raise ValueError(
            f"head dim {tensors[0].shape[-1]} is above the {MAX_HEAD_DIM} the Triton kernels' tiles "
            "are sized for; pass impl='reference' (or split the heads)")


def check_mask(q, causal: bool, window: int, row_start) -> None:
    """Raises for a window or document mask the kernels cannot take, naming the fix."""
    if (window or row_start is not None) and not causal:
        raise ValueError("a sliding window or document mask narrows a causal mask; pass "
                         "causal=True with it")
    if window < 0:
        raise ValueError(f"window={window} must be >= 0 (0: no window)")
    if row_start is not None and (row_start.dim() != 2 or row_start.shape[-1] != q.shape[2]
                                  or row_start.shape[0] not in (1, q.shape[0])):
        raise ValueError(f"row_start {tuple(row_start.shape)} must be [1 or B, Sq] for q "
                         f"{tuple(q.shape)}")


def row_start_arg(row_start, device):
    """(tensor, batch stride) the kernels take for ``row_start`` (int32), or a placeholder."""
    if row_start is None:
        return torch.empty(1, dtype=torch.int32, device=device), 0
    row_start = row_start.to(device=device, dtype=torch.int32)
    if row_start.stride(-1) != 1:
        row_start = row_start.contiguous()
    return row_start, row_start.stride(0) if row_start.shape[0] > 1 else 0


# Programs of the persistent variant under the interpreter (several, so the tile loop is tested).
INTERPRET_PROGRAMS = 3


def flash_attention_forward(q, k, v, *, scale: float, causal: bool, q_offset: int = 0,
                            k_offset: int = 0, out_acc=None, lse_acc=None, window: int = 0,
                            row_start=None, variant: Optional[str] = None):
    """Launches the forward kernel; see graphopt.ops.attention.attention_block_forward.
    ``variant`` (a FORWARD_VARIANTS name) forces one; None: FORWARD_VARIANT, else the default."""
    check_supported(q, k, v)
    check_mask(q, causal, window, row_start)
    q, k, v = unit_last_stride(q), unit_last_stride(k), unit_last_stride(v)
    batch, heads_q, seqlen_q, head_dim = q.shape
    heads_kv, seqlen_k = k.shape[1], k.shape[2]
    accumulate = out_acc is not None
    if accumulate:
        out, lse = out_acc, lse_acc
        if out.stride(-1) != 1 or lse.stride(-1) != 1:
            raise ValueError("out_acc and lse_acc need a unit stride in their last dimension")
    else:
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    if seqlen_q == 0 or batch * heads_q == 0:
        return out, lse
    starts, stride_rb = row_start_arg(row_start, q.device)
    args = (q, k, v, out, lse, starts,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            lse.stride(0), lse.stride(1), stride_rb,
            heads_q, heads_q // heads_kv, seqlen_q, seqlen_k, q_offset, k_offset, window,
            scale * LOG2E, seq_bucket(seqlen_q, seqlen_k), batch * heads_q,
            l2_head_group(seqlen_k, head_dim, k.element_size(), heads_q // heads_kv,
                          batch * heads_q))
    meta = dict(HEAD_DIM=head_dim,
                HEAD_DIM_PAD=head_dim_padded(head_dim), CAUSAL=bool(causal),
                HAS_WINDOW=window > 0, HAS_ROW_START=row_start is not None,
                ACCUMULATE=accumulate,
                DOT_PRECISION=dot_precision(q.dtype, on_gpu(q)))
    name, strict = pick_variant(FORWARD_VARIANTS, variant or FORWARD_VARIANT,
                                DEFAULT_FORWARD_VARIANT, FORWARD_FALLBACKS, tma_ready(k, v),
                                "forward")

    def run(name: str) -> None:
        chosen = FORWARD_VARIANTS[name]
        flags = dict(meta, USE_TMA=chosen.tma, WARP_SPECIALIZE=chosen.warp_specialize,
                     PERSISTENT=chosen.persistent, FMA_SOFTMAX=chosen.fma_softmax and scale > 0,
                     GROUPED_TILES=chosen.grouped_tiles or chosen.persistent)
        if chosen.tma and not interpreting():
            ensure_descriptor_scratch()
        if on_gpu(q):
            launch(_flash_fwd_tuned[dtype_family(q.dtype)],
                   query_grid(seqlen_q, batch * heads_q, chosen, q.device), args, flags)
        else:
            blocks = dict(BLOCK_M=INTERPRET_BLOCK_M, BLOCK_N=INTERPRET_BLOCK_N)
            grid = query_grid(seqlen_q, batch * heads_q, chosen, q.device)(blocks)
            _flash_fwd_kernel[grid](*args, **flags, **blocks)

    spec = (dtype_family(q.dtype), meta["HEAD_DIM_PAD"], meta["CAUSAL"], meta["HAS_WINDOW"],
            meta["HAS_ROW_START"], accumulate)
    run_variant("forward", name, strict, spec, FORWARD_FALLBACKS, run)
    return out, lse


def query_grid(seqlen_q: int, batch_heads: int, variant: ForwardVariant, device: torch.device):
    """Grid of the forward kernel for a config: a program per (query block, batch * head) -- in
    the grouped order on one axis, or on two -- or for the persistent variant one per SM
    (INTERPRET_PROGRAMS under the interpreter)."""
    def grid(cfg):
        tiles = triton.cdiv(seqlen_q, cfg["BLOCK_M"])
        if variant.persistent:
            programs = (INTERPRET_PROGRAMS if interpreting()
                        else torch.cuda.get_device_properties(device).multi_processor_count)
            return min(tiles * batch_heads, programs), 1
        if variant.grouped_tiles:
            return tiles * batch_heads, 1
        return tiles, batch_heads
    return grid


# K/V bytes the heads of one tile group may keep in L2 at once (about half an H100's 50 MB).
L2_BUDGET_BYTES = 24 << 20


def l2_head_group(seqlen_k: int, head_dim: int, element_size: int, group: int,
                  batch_heads: int) -> int:
    """Query heads per tile group: as many as share L2_BUDGET_BYTES of K/V (query heads of one
    grouped-query group read the same K/V), at least 1, at most all."""
    kv_bytes_per_query_head = 2 * seqlen_k * head_dim * element_size / group
    return int(max(1, min(batch_heads, L2_BUDGET_BYTES // max(kv_bytes_per_query_head, 1))))
