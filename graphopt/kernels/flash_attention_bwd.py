"""Flash-attention backward over one key block, from the final (merged) output and log-sum-exp.

Bound (per batch*query-head, Sq queries over Sk keys, head dim D, b bytes per element):
  FLOPs  10 * Sq * Sk * D     fused (atomic_dq*): s, dp, dv, dk, dq = 2.5x the forward, as
                              FlashAttention's backward; two_pass: 14 * Sq * Sk * D = 3.5x (its
                              dq kernel recomputes s and dp); halved by causal block skipping
  bytes  fused: b * D * (2 * Sq * ceil(Sk / BLOCK_N) + 4 * Sk) + 4 * D * Sq * ceil(Sk / BLOCK_N)
         (q, dO read once per key block; dQ added in float32 once per key block) -- compute-bound
         at long lengths; the float32 dQ traffic is about 2x the q, dO reads in bf16.

With P = exp(S * scale - lse) recomputed block by block (never stored):
  dV = P^T dO        dP = dO V^T        dS = P * (dP - delta),  delta = rowsum(dO * O)
  dK = scale * dS^T Q                   dQ = scale * dS K
Variants (BACKWARD_VARIANTS):
  two_pass       (the kernels before issue 32) one program per key block accumulates dK, dV over
                 the query blocks (and over the GROUP query heads sharing that key/value head,
                 which sums grouped-query gradients in registers); one program per query block
                 accumulates dQ over the key blocks, recomputing P and dP. No atomics: dQ is
                 bitwise reproducible.
  atomic_dq      one kernel: the dK/dV program also computes each query block's share of dQ from
                 the dS it already has and adds it into a float32 buffer with atomics (dq_acc
                 itself when given: ring steps accumulate there directly), then dQ is rounded to
                 q's dtype. Summation order varies run to run (float32 rounding, not results);
                 under torch.use_deterministic_algorithms(True) the default is two_pass.
  atomic_dq_tma  atomic_dq with Q, dO tiles by TMA descriptors and dQ added by TMA reductions
                 (one bulk add per tile); Hopper or newer, element atomics under the interpreter.
The default is two_pass (DEFAULT_BACKWARD_VARIANT: measured on one H100, the fastest or within 2%).
Blocks wholly above the causal diagonal are skipped in all of them, as are blocks a sliding window
or the documents hide (see flash_attention_fwd): the program of a key block stops at the last query
that may see it, which for documents is ``col_stop`` (the end of the key's document,
non-decreasing along keys); query blocks every row of which sees the whole key block run unmasked.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from graphopt.kernels import unit_last_stride
from graphopt.kernels.flash_attention_fwd import (
    INTERPRET_BLOCK_M,
    INTERPRET_BLOCK_N,
    LOG2E,
    LOG2E_IN_KERNEL,
    UNSPECIALIZED,
    check_mask,
    check_supported,
    dot_precision,
    dtype_family,
    ensure_descriptor_scratch,
    head_dim_padded,
    interpreting,
    launch,
    load_rows,
    on_gpu,
    pick_variant,
    query_block_keys,
    row_start_arg,
    rows_source,
    run_variant,
    seq_bucket,
    tma_ready,
    tuned_by_dtype,
    visible,
)

DELTA_BLOCK_M = 64


@triton.jit
def _delta_kernel(Out, DOut, Delta,
                  stride_ob, stride_oh, stride_om, stride_db, stride_dh, stride_dm,
                  num_heads, seqlen_q,
                  HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = (pid_bh // num_heads).to(tl.int64)
    head = (pid_bh % num_heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(Out + batch * stride_ob + head * stride_oh + offs_m[:, None] * stride_om
                + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DOut + batch * stride_db + head * stride_dh + offs_m[:, None] * stride_dm
                 + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * seqlen_q + offs_m, delta, mask=offs_m < seqlen_q)


@triton.jit
def key_tile_grads(dk, dv, k, v, q, do, lse_head, delta_head, row_starts, rows, row_ok, k_pos,
                   q_offset, window, qk_scale_log2, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                   HAS_WINDOW: tl.constexpr, HAS_ROW_START: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """One query block's share of a key block's dK, dV (added into dk, dv), and dS^T in q's
    dtype (for dQ): P^T = exp2(K Q^T * scale - lse), dS^T = P^T * (V dO^T - delta)."""
    lse = tl.load(lse_head + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(delta_head + rows, mask=row_ok, other=0.0)
    # A row that sees no key at all has lse = -inf: shift it by +inf so its p is 0.
    lse_log2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E_IN_KERNEL)
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale_log2
    p_t = tl.exp2(s_t - lse_log2[None, :])
    if MASKED:
        row_start = rows
        if HAS_ROW_START:
            row_start = tl.load(row_starts + rows, mask=row_ok, other=0)
        seen = visible(q_offset + rows, row_start, k_pos, window, CAUSAL, HAS_WINDOW,
                       HAS_ROW_START)
        p_t = tl.where(tl.trans(seen), p_t, 0.0)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
    dk = tl.dot(ds_t, q, dk, input_precision=DOT_PRECISION)
    return dk, dv, ds_t


@triton.jit
def load_key_block(K, V, batch, kv_head, pid_n, stride_kb, stride_kh, stride_kn, stride_vb,
                   stride_vh, stride_vn, seqlen_k, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                   HEAD_DIM_PAD: tl.constexpr):
    """Key block pid_n of one (batch, key/value head): (k, v, key indices, valid elements); keys
    past seqlen_k load as 0."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    kv_mask = (offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + batch * stride_kb + kv_head * stride_kh + offs_n[:, None] * stride_kn
                + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + batch * stride_vb + kv_head * stride_vh + offs_n[:, None] * stride_vn
                + offs_d[None, :], mask=kv_mask, other=0.0)
    return k, v, offs_n, kv_mask


@triton.jit
def store_key_block_grads(dk, dv, DK, DV, batch, kv_head, offs_n, kv_mask, stride_dkb, stride_dkh,
                          stride_dkn, stride_dvb, stride_dvh, stride_dvn, scale,
                          HEAD_DIM_PAD: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    dk = dk * scale
    tl.store(DK + batch * stride_dkb + kv_head * stride_dkh + offs_n[:, None] * stride_dkn
             + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + batch * stride_dvb + kv_head * stride_dvh + offs_n[:, None] * stride_dvn
             + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dkdv_query_blocks(dk, dv, k, v, q_head, do_head, lse_head, delta_head, row_starts,
                       stride_qm, stride_dom, k_pos, start_m, stop_m, seqlen_q, q_offset, window,
                       qk_scale_log2, offs_m, offs_d,
                       BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                       HAS_WINDOW: tl.constexpr, HAS_ROW_START: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    # Every query block is loaded with row masks and causally masked: one loop keeps the register
    # budget under the limit (three specialised loops spilled), and the masks cost little next to
    # the four products.
    d_ok = offs_d[None, :] < HEAD_DIM
    for block_start in range(start_m, stop_m, BLOCK_M):
        rows = block_start + offs_m
        row_ok = rows < seqlen_q
        q = tl.load(q_head + rows[:, None] * stride_qm + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok, other=0.0)
        do = tl.load(do_head + rows[:, None] * stride_dom + offs_d[None, :],
                     mask=row_ok[:, None] & d_ok, other=0.0)
        dk, dv, _ = key_tile_grads(dk, dv, k, v, q, do, lse_head, delta_head, row_starts, rows,
                                   row_ok, k_pos, q_offset, window, qk_scale_log2, CAUSAL,
                                   CAUSAL, HAS_WINDOW, HAS_ROW_START, DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=UNSPECIALIZED + ["num_kv_heads"])
def _flash_bwd_dkdv_kernel(Q, K, V, DOut, Lse, Delta, DK, DV, RowStart, ColStop,
                           stride_qb, stride_qh, stride_qm,
                           stride_kb, stride_kh, stride_kn,
                           stride_vb, stride_vh, stride_vn,
                           stride_dob, stride_doh, stride_dom,
                           stride_dkb, stride_dkh, stride_dkn,
                           stride_dvb, stride_dvh, stride_dvn,
                           stride_lb, stride_lh, stride_rb, stride_cb,
                           num_kv_heads, group, seqlen_q, seqlen_k, q_offset, k_offset, window,
                           qk_scale_log2, scale, SEQ_BUCKET,
                           HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                           CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                           HAS_ROW_START: tl.constexpr, DOT_PRECISION: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = (pid_bh // num_kv_heads).to(tl.int64)
    kv_head = (pid_bh % num_kv_heads).to(tl.int64)

    k, v, offs_n, kv_mask = load_key_block(K, V, batch, kv_head, pid_n, stride_kb, stride_kh,
                                           stride_kn, stride_vb, stride_vh, stride_vn, seqlen_k,
                                           BLOCK_N, HEAD_DIM, HEAD_DIM_PAD)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    k_pos = k_offset + offs_n

    # Query rows before ``lo`` see none of this key block, nor rows from ``hi`` on.
    lo = 0
    hi = seqlen_q
    if CAUSAL:
        first_row = tl.minimum(tl.maximum(k_offset + pid_n * BLOCK_N - q_offset, 0), seqlen_q)
        lo = (first_row // BLOCK_M) * BLOCK_M
        last_key_pos = k_offset + tl.minimum(pid_n * BLOCK_N + BLOCK_N, seqlen_k) - 1
        if HAS_WINDOW:
            hi = tl.minimum(hi, tl.maximum(last_key_pos + window - q_offset, 0))
        if HAS_ROW_START:
            col_stop = tl.load(ColStop + batch * stride_cb
                               + tl.minimum(pid_n * BLOCK_N + BLOCK_N, seqlen_k) - 1)
            hi = tl.minimum(hi, tl.maximum(col_stop - q_offset, 0))

    dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], tl.float32)
    for g in range(0, group):
        head = kv_head * group + g
        dk, dv = _dkdv_query_blocks(
            dk, dv, k, v, Q + batch * stride_qb + head * stride_qh,
            DOut + batch * stride_dob + head * stride_doh, Lse + batch * stride_lb + head * stride_lh,
            Delta + (batch * num_kv_heads * group + head) * seqlen_q, RowStart + batch * stride_rb,
            stride_qm, stride_dom, k_pos, lo, hi, seqlen_q, q_offset, window, qk_scale_log2,
            offs_m, offs_d, BLOCK_M, HEAD_DIM, CAUSAL, HAS_WINDOW, HAS_ROW_START, DOT_PRECISION)
    store_key_block_grads(dk, dv, DK, DV, batch, kv_head, offs_n, kv_mask, stride_dkb, stride_dkh,
                          stride_dkn, stride_dvb, stride_dvh, stride_dvn, scale, HEAD_DIM_PAD)


@triton.jit
def _dq_key_blocks(dq, q, do, lse_log2, delta, k_head, v_head, stride_kn, stride_vn,
                   q_pos, row_start, start_n, stop_n, seqlen_k, k_offset, window, qk_scale_log2,
                   offs_n, offs_d,
                   BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ROW_START: tl.constexpr,
                   MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    d_ok = offs_d[None, :] < HEAD_DIM
    for block_start in range(start_n, stop_n, BLOCK_N):
        cols = block_start + offs_n
        k_ptrs = k_head + cols[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = v_head + cols[:, None] * stride_vn + offs_d[None, :]
        if MASKED or HEAD_DIM != HEAD_DIM_PAD:
            kv_ok = d_ok
            if MASKED:
                kv_ok = kv_ok & (cols[:, None] < seqlen_k)
            k = tl.load(k_ptrs, mask=kv_ok, other=0.0)
            v = tl.load(v_ptrs, mask=kv_ok, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        p = tl.exp2(s - lse_log2[:, None])
        if MASKED:
            allowed = visible(q_pos, row_start, k_offset + cols, window, CAUSAL, HAS_WINDOW,
                              HAS_ROW_START) & (cols[None, :] < seqlen_k)
            p = tl.where(allowed, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=UNSPECIALIZED + ["num_heads"])
def _flash_bwd_dq_kernel(Q, K, V, DOut, Lse, Delta, DQ, RowStart,
                         stride_qb, stride_qh, stride_qm,
                         stride_kb, stride_kh, stride_kn,
                         stride_vb, stride_vh, stride_vn,
                         stride_dob, stride_doh, stride_dom,
                         stride_dqb, stride_dqh, stride_dqm,
                         stride_lb, stride_lh, stride_rb,
                         num_heads, group, seqlen_q, seqlen_k, q_offset, k_offset, window,
                         qk_scale_log2, scale, SEQ_BUCKET,
                         HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                         CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                         HAS_ROW_START: tl.constexpr, ACCUMULATE: tl.constexpr,
                         DOT_PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = (pid_bh // num_heads).to(tl.int64)
    head = (pid_bh % num_heads).to(tl.int64)
    kv_head = head // group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    row_ok = offs_m < seqlen_q
    mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qm
                + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DOut + batch * stride_dob + head * stride_doh + offs_m[:, None] * stride_dom
                 + offs_d[None, :], mask=mask, other=0.0)
    lse = tl.load(Lse + batch * stride_lb + head * stride_lh + offs_m, mask=row_ok,
                  other=float("inf"))
    lse_log2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E_IN_KERNEL)
    delta = tl.load(Delta + pid_bh.to(tl.int64) * seqlen_q + offs_m, mask=row_ok, other=0.0)
    k_head = K + batch * stride_kb + kv_head * stride_kh
    v_head = V + batch * stride_vb + kv_head * stride_vh
    q_pos = q_offset + offs_m

    row_start, start, full_start, full_stop, stop = query_block_keys(
        RowStart + batch * stride_rb, pid_m, offs_m, row_ok, seqlen_q, seqlen_k, q_offset,
        k_offset, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW, HAS_ROW_START)

    dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    if full_start < full_stop:
        dq = _dq_key_blocks(dq, q, do, lse_log2, delta, k_head, v_head, stride_kn, stride_vn,
                            q_pos, row_start, start, full_start, seqlen_k, k_offset, window,
                            qk_scale_log2, offs_n, offs_d, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, CAUSAL,
                            HAS_WINDOW, HAS_ROW_START, True, DOT_PRECISION)
        dq = _dq_key_blocks(dq, q, do, lse_log2, delta, k_head, v_head, stride_kn, stride_vn,
                            q_pos, row_start, full_start, full_stop, seqlen_k, k_offset, window,
                            qk_scale_log2, offs_n, offs_d, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, CAUSAL,
                            HAS_WINDOW, HAS_ROW_START, False, DOT_PRECISION)
        dq = _dq_key_blocks(dq, q, do, lse_log2, delta, k_head, v_head, stride_kn, stride_vn,
                            q_pos, row_start, full_stop, stop, seqlen_k, k_offset, window,
                            qk_scale_log2, offs_n, offs_d, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, CAUSAL,
                            HAS_WINDOW, HAS_ROW_START, True, DOT_PRECISION)
    else:
        dq = _dq_key_blocks(dq, q, do, lse_log2, delta, k_head, v_head, stride_kn, stride_vn,
                            q_pos, row_start, start, stop, seqlen_k, k_offset, window,
                            qk_scale_log2, offs_n, offs_d, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, CAUSAL,
                            HAS_WINDOW, HAS_ROW_START, True, DOT_PRECISION)
    dq = dq * scale

    dq_ptrs = (DQ + batch * stride_dqb + head * stride_dqh + offs_m[:, None] * stride_dqm
               + offs_d[None, :])
    if ACCUMULATE:
        dq += tl.load(dq_ptrs, mask=mask, other=0.0)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=mask)


@triton.jit
def query_block_range(key_start, key_stop, first_col_stop, last_col_stop, q_offset, seqlen_q,
                      window, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr,
                      HAS_WINDOW: tl.constexpr, HAS_ROW_START: tl.constexpr):
    """Query rows [lo, hi) some key of a key block (global positions key_start .. key_stop - 1)
    is visible to, and [full_lo, full_hi) inside it whose rows see every key of the block;
    lo, full_lo are block-aligned, full_lo >= full_hi when no row sees the block whole.
    ``first/last_col_stop``: where the documents of the block's first and last keys end."""
    lo = 0
    full_lo = 0
    hi = seqlen_q
    full_hi = seqlen_q
    if CAUSAL:
        lo = (tl.minimum(tl.maximum(key_start - q_offset, 0), seqlen_q) // BLOCK_M) * BLOCK_M
        full_lo = tl.maximum(
            ((tl.maximum(key_stop - 1 - q_offset, 0) + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, lo)
        if HAS_WINDOW:
            hi = tl.minimum(hi, tl.maximum(key_stop - 1 + window - q_offset, 0))
            full_hi = tl.minimum(full_hi, (tl.maximum(key_start + window - q_offset, 0)
                                           // BLOCK_M) * BLOCK_M)
        if HAS_ROW_START:
            hi = tl.minimum(hi, tl.maximum(last_col_stop - q_offset, 0))
            full_hi = tl.minimum(full_hi, (tl.maximum(first_col_stop - q_offset, 0)
                                           // BLOCK_M) * BLOCK_M)
    return lo, full_lo, full_hi, hi


@triton.jit
def _fused_query_blocks(dk, dv, k, v, q_src, do_src, dq_dst, lse_head, delta_head, row_starts,
                        stride_qm, stride_dom, stride_dqm, k_pos, start_m, stop_m, seqlen_q,
                        q_offset, window, qk_scale_log2, scale, offs_m, offs_d,
                        BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                        HEAD_DIM_PAD: tl.constexpr, CAUSAL: tl.constexpr,
                        HAS_WINDOW: tl.constexpr, HAS_ROW_START: tl.constexpr,
                        MASKED: tl.constexpr, USE_TMA: tl.constexpr, TMA_REDUCE: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    # Rows past seqlen_q load q = dO = 0 and lse = +inf, so their p is 0 without a mask; keys past
    # seqlen_k were loaded as 0, so they add nothing to dQ (their dK, dV rows are not stored).
    d_ok = offs_d[None, :] < HEAD_DIM
    for block_start in tl.range(start_m, stop_m, BLOCK_M):
        rows = block_start + offs_m
        row_ok = rows < seqlen_q
        q = load_rows(q_src, block_start, offs_m, seqlen_q, stride_qm, offs_d, HEAD_DIM,
                      HEAD_DIM_PAD, True, USE_TMA)
        do = load_rows(do_src, block_start, offs_m, seqlen_q, stride_dom, offs_d, HEAD_DIM,
                       HEAD_DIM_PAD, True, USE_TMA)
        dk, dv, ds_t = key_tile_grads(dk, dv, k, v, q, do, lse_head, delta_head, row_starts,
                                      rows, row_ok, k_pos, q_offset, window, qk_scale_log2,
                                      MASKED, CAUSAL, HAS_WINDOW, HAS_ROW_START, DOT_PRECISION)
        # This key block's share of dQ, added where other key blocks add theirs (float32).
        dq = tl.dot(tl.trans(ds_t), k, input_precision=DOT_PRECISION) * scale
        if TMA_REDUCE:
            dq_dst.atomic_add([block_start, 0], dq)
        else:
            tl.atomic_add(dq_dst + rows[:, None] * stride_dqm + offs_d[None, :], dq,
                          mask=row_ok[:, None] & d_ok, sem="relaxed")
    return dk, dv


@triton.jit(do_not_specialize=UNSPECIALIZED + ["num_kv_heads"])
def _flash_bwd_fused_kernel(Q, K, V, DOut, Lse, Delta, DQ, DK, DV, RowStart, ColStop,
                            stride_qb, stride_qh, stride_qm,
                            stride_kb, stride_kh, stride_kn,
                            stride_vb, stride_vh, stride_vn,
                            stride_dob, stride_doh, stride_dom,
                            stride_dqb, stride_dqh, stride_dqm,
                            stride_dkb, stride_dkh, stride_dkn,
                            stride_dvb, stride_dvh, stride_dvn,
                            stride_lb, stride_lh, stride_rb, stride_cb,
                            num_kv_heads, group, seqlen_q, seqlen_k, q_offset, k_offset, window,
                            qk_scale_log2, scale, SEQ_BUCKET,
                            HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                            CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                            HAS_ROW_START: tl.constexpr, USE_TMA: tl.constexpr,
                            TMA_REDUCE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Key blocks outer, heads inner: under a causal mask the first key blocks of every head see
    # the most queries, so the longest programs start first and the short ones fill the tail.
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    batch = (pid_bh // num_kv_heads).to(tl.int64)
    kv_head = (pid_bh % num_kv_heads).to(tl.int64)

    k, v, offs_n, kv_mask = load_key_block(K, V, batch, kv_head, pid_n, stride_kb, stride_kh,
                                           stride_kn, stride_vb, stride_vh, stride_vn, seqlen_k,
                                           BLOCK_N, HEAD_DIM, HEAD_DIM_PAD)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    k_pos = k_offset + offs_n

    last_key = tl.minimum(pid_n * BLOCK_N + BLOCK_N, seqlen_k) - 1
    first_col_stop = 0
    last_col_stop = 0
    if HAS_ROW_START:
        first_col_stop = tl.load(ColStop + batch * stride_cb + pid_n * BLOCK_N)
        last_col_stop = tl.load(ColStop + batch * stride_cb + last_key)
    lo, full_lo, full_hi, hi = query_block_range(
        k_offset + pid_n * BLOCK_N, k_offset + last_key + 1, first_col_stop, last_col_stop,
        q_offset, seqlen_q, window, BLOCK_M, CAUSAL, HAS_WINDOW, HAS_ROW_START)

    dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], tl.float32)
    for g in range(0, group):
        head = kv_head * group + g
        q_src = rows_source(Q + batch * stride_qb + head * stride_qh, seqlen_q, stride_qm,
                            BLOCK_M, HEAD_DIM, HEAD_DIM_PAD, USE_TMA)
        do_src = rows_source(DOut + batch * stride_dob + head * stride_doh, seqlen_q, stride_dom,
                             BLOCK_M, HEAD_DIM, HEAD_DIM_PAD, USE_TMA)
        dq_dst = rows_source(DQ + batch * stride_dqb + head * stride_dqh, seqlen_q, stride_dqm,
                             BLOCK_M, HEAD_DIM, HEAD_DIM_PAD, TMA_REDUCE)
        lse_head = Lse + batch * stride_lb + head * stride_lh
        delta_head = Delta + (batch * num_kv_heads * group + head) * seqlen_q
        row_starts = RowStart + batch * stride_rb
        if full_lo < full_hi:
            dk, dv = _fused_query_blocks(
                dk, dv, k, v, q_src, do_src, dq_dst, lse_head, delta_head, row_starts,
                stride_qm, stride_dom, stride_dqm, k_pos, lo, full_lo, seqlen_q, q_offset, window,
                qk_scale_log2, scale, offs_m, offs_d, BLOCK_M, HEAD_DIM, HEAD_DIM_PAD, CAUSAL,
                HAS_WINDOW, HAS_ROW_START, True, USE_TMA, TMA_REDUCE, DOT_PRECISION)
            dk, dv = _fused_query_blocks(
                dk, dv, k, v, q_src, do_src, dq_dst, lse_head, delta_head, row_starts,
                stride_qm, stride_dom, stride_dqm, k_pos, full_lo, full_hi, seqlen_q, q_offset,
                window, qk_scale_log2, scale, offs_m, offs_d, BLOCK_M, HEAD_DIM, HEAD_DIM_PAD,
                CAUSAL, HAS_WINDOW, HAS_ROW_START, False, USE_TMA, TMA_REDUCE, DOT_PRECISION)
            dk, dv = _fused_query_blocks(
                dk, dv, k, v, q_src, do_src, dq_dst, lse_head, delta_head, row_starts,
                stride_qm, stride_dom, stride_dqm, k_pos, full_hi, hi, seqlen_q, q_offset, window,
                qk_scale_log2, scale, offs_m, offs_d, BLOCK_M, HEAD_DIM, HEAD_DIM_PAD, CAUSAL,
                HAS_WINDOW, HAS_ROW_START, True, USE_TMA, TMA_REDUCE, DOT_PRECISION)
        else:
            dk, dv = _fused_query_blocks(
                dk, dv, k, v, q_src, do_src, dq_dst, lse_head, delta_head, row_starts,
                stride_qm, stride_dom, stride_dqm, k_pos, lo, hi, seqlen_q, q_offset, window,
                qk_scale_log2, scale, offs_m, offs_d, BLOCK_M, HEAD_DIM, HEAD_DIM_PAD, CAUSAL,
                HAS_WINDOW, HAS_ROW_START, True, USE_TMA, TMA_REDUCE, DOT_PRECISION)
    store_key_block_grads(dk, dv, DK, DV, batch, kv_head, offs_n, kv_mask, stride_dkb, stride_dkh,
                          stride_dkn, stride_dvb, stride_dvh, stride_dvn, scale, HEAD_DIM_PAD)


_TUNE_KEY = ["SEQ_BUCKET", "HEAD_DIM_PAD", "CAUSAL", "HAS_WINDOW", "HAS_ROW_START"]

# Hopper configs for bf16/fp16 first, then float32. At D = 128 these compile for sm_90a with no or
# little (<= 96 bytes) register spilling.
_dkdv_tuned = tuned_by_dtype(
    _flash_bwd_dkdv_kernel,
    [triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=8, num_stages=3),
     triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=2),
     triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8, num_stages=2)],
    [triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=2)],
    key=_TUNE_KEY,
    small_head_configs=[triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8, num_stages=3)])

# The dq kernel may add into DQ in place, so tuning runs restore it between trials.
_dq_tuned = tuned_by_dtype(
    _flash_bwd_dq_kernel,
    [triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
     triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=3),
     triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3)],
    [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2)],
    key=_TUNE_KEY + ["ACCUMULATE"], restore_value=["DQ"],
    small_head_configs=[triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2)])


# The fused kernel adds into DQ in place, so tuning runs restore it between trials. Its configs
# keep K, V (shared memory), the dK, dV accumulators and one query block's dQ share in budget at
# D = 128: 128-key blocks with 64 (or 32) query rows on two warp groups, or 64 x 64 on one.
_fused_tuned = tuned_by_dtype(
    _flash_bwd_fused_kernel,
    [triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8, num_stages=2),
     triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=8, num_stages=2),
     triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2)],
    [triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=2)],
    key=_TUNE_KEY + ["USE_TMA", "TMA_REDUCE"], restore_value=["DQ"],
    small_head_configs=[triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8, num_stages=3)])


@dataclass(frozen=True)
class BackwardVariant:
    fused: bool  # one kernel, dQ added with atomics (5 products a tile) vs. a dQ kernel (7)
    tma: bool = False  # Q, dO tiles through TMA descriptors and dQ added by TMA reductions


BACKWARD_VARIANTS = {
    "two_pass": BackwardVariant(fused=False),  # the kernels before issue 32; deterministic dQ
    "atomic_dq": BackwardVariant(fused=True),
    "atomic_dq_tma": BackwardVariant(fused=True, tma=True),
}
# Measured on one H100 (bench/results/attention.md, S = 16K, Hkv 8, bf16, D = 128): two_pass was
# the fastest on windows (8.96 vs 10.6-11.2 ms), within 2% of the fastest on causal (atomic_dq)
# and documents (atomic_dq_tma); its dQ is also reproducible.
DEFAULT_BACKWARD_VARIANT = "two_pass"
BACKWARD_FALLBACKS = {"atomic_dq_tma": "atomic_dq", "atomic_dq": "two_pass"}
# A name here forces that variant for every launch (the benchmark times each); None: the default.
BACKWARD_VARIANT: Optional[str] = None


def flash_attention_delta(out: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    """rowsum(dout * out) in float32, [B, H, Sq] (contiguous)."""
    out, dout = unit_last_stride(out), unit_last_stride(dout)
    batch, heads, seqlen_q, head_dim = out.shape
    delta = torch.empty((batch, heads, seqlen_q), dtype=torch.float32, device=out.device)
    if delta.numel() == 0:
        return delta
    grid = (triton.cdiv(seqlen_q, DELTA_BLOCK_M), batch * heads)
    _delta_kernel[grid](out, dout, delta, out.stride(0), out.stride(1), out.stride(2),
                        dout.stride(0), dout.stride(1), dout.stride(2), heads, seqlen_q,
                        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_padded(head_dim),
                        BLOCK_M=DELTA_BLOCK_M)
    return delta


def flash_attention_backward(q, k, v, out, lse, dout, *, scale: float, causal: bool,
                             q_offset: int = 0, k_offset: int = 0, delta=None, dq_acc=None,
                             window: int = 0, row_start=None, col_stop=None,
                             variant: Optional[str] = None):
    """Launches the backward kernels; see graphopt.ops.attention.attention_block_backward.
    ``variant`` (a BACKWARD_VARIANTS name) forces one; None: BACKWARD_VARIANT, else the default."""
    check_supported(q, k, v, dout)
    check_mask(q, causal, window, row_start)
    if (row_start is None) != (col_stop is None):
        raise ValueError("document masks need both row_start (queries) and col_stop (keys)")
    q, k, v, dout = (unit_last_stride(x) for x in (q, k, v, dout))
    lse = lse.float()
    lse = unit_last_stride(lse)
    batch, heads_q, seqlen_q, head_dim = q.shape
    seqlen_k = k.shape[2]
    if delta is None:
        delta = flash_attention_delta(out, dout)
    else:
        delta = delta.float().contiguous()
    accumulate = dq_acc is not None
    if accumulate and dq_acc.stride(-1) != 1:
        raise ValueError("dq_acc needs a unit stride in its last dimension")
    grad_dtype = torch.float32 if accumulate else k.dtype
    dk = torch.empty(k.shape, dtype=grad_dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=grad_dtype, device=v.device)
    if batch * heads_q == 0 or seqlen_q == 0 or seqlen_k == 0:
        dq = dq_acc if accumulate else torch.zeros_like(q)
        return dq, dk.zero_(), dv.zero_()

    starts, stride_rb = row_start_arg(row_start, q.device)
    stops, stride_cb = row_start_arg(col_stop, q.device)
    common = dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_padded(head_dim), CAUSAL=bool(causal),
                  HAS_WINDOW=window > 0, HAS_ROW_START=row_start is not None,
                  DOT_PRECISION=dot_precision(q.dtype, on_gpu(q)))
    scalars = (seqlen_q, seqlen_k, q_offset, k_offset, window, scale * LOG2E, scale,
               seq_bucket(seqlen_q, seqlen_k))
    kernel_args = dict(q=q, k=k, v=v, dout=dout, lse=lse, delta=delta, dk=dk, dv=dv,
                       starts=starts, stops=stops, stride_rb=stride_rb, stride_cb=stride_cb,
                       scalars=scalars, common=common)
    # Atomics add dQ in a run-dependent order; torch's deterministic mode gets the two-pass
    # kernels, whose dQ is bitwise reproducible.
    default = ("two_pass" if torch.are_deterministic_algorithms_enabled()
               else DEFAULT_BACKWARD_VARIANT)
    name, strict = pick_variant(BACKWARD_VARIANTS, variant or BACKWARD_VARIANT, default,
                                BACKWARD_FALLBACKS, tma_ready(q, dout), "backward")
    result = {}

    def run(name: str) -> None:
        chosen = BACKWARD_VARIANTS[name]
        if chosen.fused:
            result["dq"] = _run_fused(dq_acc, chosen.tma, **kernel_args)
        else:
            result["dq"] = _run_two_pass(dq_acc, **kernel_args)

    spec = (dtype_family(q.dtype), common["HEAD_DIM_PAD"], common["CAUSAL"],
            common["HAS_WINDOW"], common["HAS_ROW_START"], accumulate)
    run_variant("backward", name, strict, spec, BACKWARD_FALLBACKS, run)
    return result["dq"], dk, dv


def _run_two_pass(dq_acc, *, q, k, v, dout, lse, delta, dk, dv, starts, stops, stride_rb,
                  stride_cb, scalars, common):
    """The dK/dV kernel, then the dQ kernel (which recomputes P and dP); returns dQ."""
    batch, heads_q, seqlen_q = q.shape[:3]
    heads_kv, seqlen_k = k.shape[1], k.shape[2]
    accumulate = dq_acc is not None
    dq = dq_acc if accumulate else torch.empty_like(q)
    dkdv_args = (q, k, v, dout, lse, delta, dk, dv, starts, stops,
                 q.stride(0), q.stride(1), q.stride(2),
                 k.stride(0), k.stride(1), k.stride(2),
                 v.stride(0), v.stride(1), v.stride(2),
                 dout.stride(0), dout.stride(1), dout.stride(2),
                 dk.stride(0), dk.stride(1), dk.stride(2),
                 dv.stride(0), dv.stride(1), dv.stride(2),
                 lse.stride(0), lse.stride(1), stride_rb, stride_cb,
                 heads_kv, heads_q // heads_kv) + scalars
    dq_args = (q, k, v, dout, lse, delta, dq, starts,
               q.stride(0), q.stride(1), q.stride(2),
               k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2),
               dout.stride(0), dout.stride(1), dout.stride(2),
               dq.stride(0), dq.stride(1), dq.stride(2),
               lse.stride(0), lse.stride(1), stride_rb,
               heads_q, heads_q // heads_kv) + scalars
    if on_gpu(q):
        family = dtype_family(q.dtype)
        key_blocks = lambda cfg: (triton.cdiv(seqlen_k, cfg["BLOCK_N"]), batch * heads_kv)  # noqa
        query_blocks = lambda cfg: (triton.cdiv(seqlen_q, cfg["BLOCK_M"]), batch * heads_q)  # noqa
        launch(_dkdv_tuned[family], key_blocks, dkdv_args, common)
        launch(_dq_tuned[family], query_blocks, dq_args, dict(common, ACCUMULATE=accumulate))
    else:
        blocks = dict(BLOCK_M=INTERPRET_BLOCK_M, BLOCK_N=INTERPRET_BLOCK_N)
        _flash_bwd_dkdv_kernel[(triton.cdiv(seqlen_k, INTERPRET_BLOCK_N), batch * heads_kv)](
            *dkdv_args, **common, **blocks)
        _flash_bwd_dq_kernel[(triton.cdiv(seqlen_q, INTERPRET_BLOCK_M), batch * heads_q)](
            *dq_args, **common, ACCUMULATE=accumulate, **blocks)
    return dq


def _run_fused(dq_acc, tma: bool, *, q, k, v, dout, lse, delta, dk, dv, starts, stops, stride_rb,
               stride_cb, scalars, common):
    """One kernel per key block: dK, dV in registers, dQ added into a float32 buffer (dq_acc
    itself when given, else a zeroed one rounded to q's dtype after); returns dQ."""
    batch, heads_q, seqlen_q = q.shape[:3]
    heads_kv, seqlen_k = k.shape[1], k.shape[2]
    dq32 = dq_acc if dq_acc is not None else torch.zeros(q.shape, dtype=torch.float32,
                                                         device=q.device)
    # TMA reductions add a shared-memory tile to global memory in one bulk operation (Hopper);
    # the interpreter has no such operation, so it adds with element atomics there.
    tma_reduce = tma and not interpreting() and tma_ready(dq32)
    if tma and not interpreting():
        ensure_descriptor_scratch()
    args = (q, k, v, dout, lse, delta, dq32, dk, dv, starts, stops,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2),
            dq32.stride(0), dq32.stride(1), dq32.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2),
            lse.stride(0), lse.stride(1), stride_rb, stride_cb,
            heads_kv, heads_q // heads_kv) + scalars
    meta = dict(common, USE_TMA=tma, TMA_REDUCE=tma_reduce)
    if on_gpu(q):
        key_blocks = lambda cfg: (batch * heads_kv, triton.cdiv(seqlen_k, cfg["BLOCK_N"]))  # noqa
        launch(_fused_tuned[dtype_family(q.dtype)], key_blocks, args, meta)
    else:
        _flash_bwd_fused_kernel[(batch * heads_kv, triton.cdiv(seqlen_k, INTERPRET_BLOCK_N))](
            *args, **meta, BLOCK_M=INTERPRET_BLOCK_M, BLOCK_N=INTERPRET_BLOCK_N)
    return dq32 if dq_acc is not None else dq32.to(q.dtype)
