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
window of L), a program walks about L / BLOCK_N key blocks instead of position / BLOCK_N.

ACCUMULATE merges the result into an existing float32 (out, lse) pair in place:
  lse = logaddexp(lse_acc, lse_blk);  out = out_acc * exp(lse_acc - lse) + out_blk * exp(lse_blk - lse)
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from graphopt.kernels import unit_last_stride
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

# Lengths, offsets and head counts vary from call to call (ring steps, GQA) and need no alignment:
# specialising on them (== 1, % 16 == 0) would only multiply compilations.
UNSPECIALIZED = ["group", "seqlen_q", "seqlen_k", "q_offset", "k_offset", "window", "SEQ_BUCKET",
                 "stride_rb"]

# Blocks used under the Triton interpreter and for CPU tensors (the smallest tl.dot accepts).
INTERPRET_BLOCK_M = 16
INTERPRET_BLOCK_N = 16


@triton.jit
def _attend_key_blocks(acc, m_i, l_i, q, k_head, v_head, stride_kn, stride_vn,
                       q_pos, row_start, start_n, stop_n, seqlen_k, k_offset, window,
                       qk_scale_log2, offs_n, offs_d,
                       BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                       HEAD_DIM_PAD: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                       HAS_ROW_START: tl.constexpr, MASKED: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    d_ok = offs_d[None, :] < HEAD_DIM
    for block_start in range(start_n, stop_n, BLOCK_N):
        cols = block_start + offs_n
        kv_ok = d_ok
        if MASKED:
            kv_ok = kv_ok & (cols[:, None] < seqlen_k)
        k_ptrs = k_head + cols[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = v_head + cols[:, None] * stride_vn + offs_d[None, :]
        if MASKED or HEAD_DIM != HEAD_DIM_PAD:
            k = tl.load(k_ptrs, mask=kv_ok, other=0.0)
        else:
            k = tl.load(k_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        if MASKED:
            allowed = visible(q_pos, row_start, k_offset + cols, window, CAUSAL, HAS_WINDOW,
                              HAS_ROW_START) & (cols[None, :] < seqlen_k)
            s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:
            # A row with nothing visible yet keeps m = -inf; shift it by 0 so exp2 gives 0, not NaN.
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new_safe = m_new
        alpha = tl.exp2(m_i - m_new_safe)
        p = tl.exp2(s - m_new_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED or HEAD_DIM != HEAD_DIM_PAD:
            v = tl.load(v_ptrs, mask=kv_ok, other=0.0)
        else:
            v = tl.load(v_ptrs)
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
    start = (tl.minimum(start, stop) // BLOCK_N) * BLOCK_N
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


@triton.jit(do_not_specialize=UNSPECIALIZED + ["num_heads"])
def _flash_fwd_kernel(Q, K, V, Out, Lse, RowStart,
                      stride_qb, stride_qh, stride_qm,
                      stride_kb, stride_kh, stride_kn,
                      stride_vb, stride_vh, stride_vn,
                      stride_ob, stride_oh, stride_om,
                      stride_lb, stride_lh, stride_rb,
                      num_heads, group, seqlen_q, seqlen_k, q_offset, k_offset, window,
                      qk_scale_log2, SEQ_BUCKET,
                      HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                      CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                      HAS_ROW_START: tl.constexpr, ACCUMULATE: tl.constexpr,
                      DOT_PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    if CAUSAL:
        # Diagonal-heavy query blocks first, so the longest programs do not start last.
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
    d_ok = offs_d[None, :] < HEAD_DIM
    q_pos = q_offset + offs_m

    q_ptrs = Q + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok, other=0.0)
    k_head = K + batch * stride_kb + kv_head * stride_kh
    v_head = V + batch * stride_vb + kv_head * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)

    row_start, start, full_start, full_stop, stop = query_block_keys(
        RowStart + batch * stride_rb, pid_m, offs_m, row_ok, seqlen_q, seqlen_k, q_offset,
        k_offset, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW, HAS_ROW_START)

    if full_start < full_stop:
        acc, m_i, l_i = _attend_key_blocks(
            acc, m_i, l_i, q, k_head, v_head, stride_kn, stride_vn, q_pos, row_start, start,
            full_start, seqlen_k, k_offset, window, qk_scale_log2, offs_n, offs_d, BLOCK_N,
            HEAD_DIM, HEAD_DIM_PAD, CAUSAL, HAS_WINDOW, HAS_ROW_START, True, DOT_PRECISION)
        acc, m_i, l_i = _attend_key_blocks(
            acc, m_i, l_i, q, k_head, v_head, stride_kn, stride_vn, q_pos, row_start, full_start,
            full_stop, seqlen_k, k_offset, window, qk_scale_log2, offs_n, offs_d, BLOCK_N,
            HEAD_DIM, HEAD_DIM_PAD, CAUSAL, HAS_WINDOW, HAS_ROW_START, False, DOT_PRECISION)
        acc, m_i, l_i = _attend_key_blocks(
            acc, m_i, l_i, q, k_head, v_head, stride_kn, stride_vn, q_pos, row_start, full_stop,
            stop, seqlen_k, k_offset, window, qk_scale_log2, offs_n, offs_d, BLOCK_N, HEAD_DIM,
            HEAD_DIM_PAD, CAUSAL, HAS_WINDOW, HAS_ROW_START, True, DOT_PRECISION)
    else:
        acc, m_i, l_i = _attend_key_blocks(
            acc, m_i, l_i, q, k_head, v_head, stride_kn, stride_vn, q_pos, row_start, start,
            stop, seqlen_k, k_offset, window, qk_scale_log2, offs_n, offs_d, BLOCK_N, HEAD_DIM,
            HEAD_DIM_PAD, CAUSAL, HAS_WINDOW, HAS_ROW_START, True, DOT_PRECISION)

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


# Hopper (H100/H200) configs for bf16/fp16. At D = 128 none spills registers (ptxas, sm_90a).
HALF_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
]
# Larger tiles that fit only small heads (at D = 128 they spill or overflow shared memory).
SMALL_HEAD_DIM = 64
HALF_CONFIGS_SMALL_HEAD = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
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
    key=["SEQ_BUCKET", "HEAD_DIM_PAD", "CAUSAL", "HAS_WINDOW", "HAS_ROW_START", "ACCUMULATE"],
    restore_value=["Out", "Lse"],
    small_head_configs=HALF_CONFIGS_SMALL_HEAD)


def launch(tuned, grid, args, meta) -> None:
    """Runs an autotuned kernel, or one fixed config of it when AUTOTUNE is off."""
    if AUTOTUNE:
        tuned[grid](*args, **meta)
        return
    configs = tuned.early_config_prune(tuned.configs, {}, **meta)
    config = configs[min(UNTUNED_CONFIG, len(configs) - 1)]
    tuned.fn[grid(config.kwargs)](*args, **meta, **config.kwargs, num_warps=config.num_warps,
                                  num_stages=config.num_stages)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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


def flash_attention_forward(q, k, v, *, scale: float, causal: bool, q_offset: int = 0,
                            k_offset: int = 0, out_acc=None, lse_acc=None, window: int = 0,
                            row_start=None):
    """Launches the forward kernel; see graphopt.ops.attention.attention_block_forward."""
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
            scale * LOG2E, seq_bucket(seqlen_q, seqlen_k))
    meta = dict(HEAD_DIM=head_dim,
                HEAD_DIM_PAD=head_dim_padded(head_dim), CAUSAL=bool(causal),
                HAS_WINDOW=window > 0, HAS_ROW_START=row_start is not None,
                ACCUMULATE=accumulate, DOT_PRECISION=dot_precision(q.dtype, on_gpu(q)))
    if on_gpu(q):
        query_blocks = lambda cfg: (triton.cdiv(seqlen_q, cfg["BLOCK_M"]), batch * heads_q)  # noqa
        launch(_flash_fwd_tuned[dtype_family(q.dtype)], query_blocks, args, meta)
    else:
        grid = (triton.cdiv(seqlen_q, INTERPRET_BLOCK_M), batch * heads_q)
        _flash_fwd_kernel[grid](*args, **meta, BLOCK_M=INTERPRET_BLOCK_M,
                                BLOCK_N=INTERPRET_BLOCK_N)
    return out, lse
