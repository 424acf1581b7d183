"""Block-wise flash attention with log-sum-exp, sequence offsets and grouped-query heads.

Shapes: q [B, Hq, Sq, D]; k, v [B, Hkv, Sk, D] with Hq a multiple of Hkv (query head h reads
key/value head h // (Hq // Hkv); K/V are never repeated in memory). Query i sits at global position
``q_offset + i``, key j at ``k_offset + j``; causal attention lets a query see keys whose position is
not after its own. A query row that sees no key gets out = 0 and lse = -inf, so partial results over
key blocks merge exactly:

    lse = logaddexp(lse_a, lse_b)
    out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)

The backward of one key block needs the FINAL (merged) out and lse of the whole attention:
p = exp(q k^T * scale - lse), delta = rowsum(dout * out), ds = p * (dout v^T - delta).

A causal mask may be narrowed, in global positions: ``window`` w > 0 lets a query see only the
keys less than w positions back (sliding window); ``row_start`` [1 or B, Sq] (int, non-decreasing
along rows) lets query row i see only keys at positions >= row_start[:, i] (packed documents: where
the row's document starts), and the backward also takes ``col_stop`` [1 or B, Sk] (one past the
position of the last query each key's document holds). ``document_bounds`` derives both from
position ids that restart at every document. Key blocks no query may see are skipped.

CUDA tensors run the Triton kernels in ``graphopt/kernels`` (their default variants: K/V and Q/dO
tiles by TMA on Hopper, dQ added with atomics; the kernel modules list the variants and what each
falls back to); CPU tensors run a float32 torch reference of the same function.
``graphopt.kernels.launch_counts`` counts the kernels that ran ("cudnn_forward",
"triton_backward:atomic_dq_tma", ...), so a benchmark can say which one it timed. ``impl="triton"`` forces the kernels (CPU tensors then need
TRITON_INTERPRET=1 set before triton is imported); ``impl="reference"`` forces the torch path.

A third implementation, ``impl="cudnn"``, runs torch's cuDNN attention kernels
(``aten._scaled_dot_product_cudnn_attention`` and its backward), the kernels SDPA itself picks on
Hopper, faster there than graphopt's Triton kernels (bench/attention_backends.py). They take and
return the same (out, lse), but know no offsets, so they run only blocks without a partial mask --
every key visible, or the diagonal block of a causal attention (q_offset == k_offset, Sq == Sk) --
and their backward derives delta from out, so it cannot take a gradient on the LSE. Their per-block
results are rounded to q's dtype (fp16/bf16) before a float32 merge or sum. With ``impl=None`` on
CUDA they run wherever they apply unless ``kernel="triton"`` (the ops take it as an argument: the
passes emit ``graphopt.config.attention_kernel`` of the compile); a configuration cuDNN refuses is
logged once and falls back to Triton.

``graphopt::flash_attention(q, k, v, scale, causal, window, positions, kernel) -> (out, lse)`` is
the differentiable custom op (``positions``: position ids [1 or B, S] whose restarts delimit packed
documents); its backward uses the saved out and lse and never re-runs the forward. On CUDA with
``kernel="auto"``, positions that hold a single document per row run torch's cuDNN kernels as plain
causal attention. Which they hold is read on the host once per positions tensor (while it lives
unwritten; ``has_documents``), and ahead of the attention where the graph passes the positions
through ``graphopt::checked_positions`` first: that op (the mask pass puts it where the positions
enter the graph) copies the answer to pinned memory at once, so the attention waits for that small
copy only. A blocking read in the middle of the step would wait on the host for the compute stream
and, behind it, for the device-to-host copies in flight (an offloaded activation is hundreds of
MiB), and it ran twice per layer and step.
``graphopt::attention_block_forward`` / ``graphopt::attention_block_backward`` are the traceable
(functional, offset-taking) forms of the two block functions, for graphs that schedule blocks.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import weakref
from typing import Optional

import torch
from torch import Tensor

from graphopt import _compat
from graphopt.kernels import launch_counts, unit_last_stride

__all__ = [
    "attention_block_forward",
    "attention_block_backward",
    "attention_delta",
    "merge_attention_blocks",
    "merge_parts",
    "flash_attention",
    "reference_attention",
    "cudnn_eligible",
    "document_bounds",
    "has_documents",
    "uses_cudnn",
]

_IMPLS = (None, "triton", "reference", "cudnn")
KERNELS = ("auto", "triton")  # what impl=None may pick on CUDA: cuDNN where exact, or never
_CUDNN_DTYPES = (torch.float16, torch.bfloat16)


def _use_triton(q: Tensor, impl: Optional[str]) -> bool:
    if impl not in _IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {_IMPLS}; pass None to pick by device")
    if impl is None:
        return q.is_cuda
    return impl == "triton"


def _check_shapes(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention expects q [B, Hq, Sq, D] and k, v [B, Hkv, Sk, D]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch and head dim")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads; "
            "grouped-query attention needs Hq % Hkv == 0")


# --- float32 torch reference: the function the kernels compute ------------------------------------

def _grouped(x: Tensor, hkv: int) -> Tensor:
    """[B, Hq, S, ...] -> [B, Hkv, G, S, ...] (a view: query heads of one group are adjacent)."""
    return x.unflatten(1, (hkv, x.shape[1] // hkv))


def _allowed(sq: int, sk: int, causal: bool, q_offset: int, k_offset: int,
             device: torch.device, window: int = 0,
             row_start: Optional[Tensor] = None) -> Optional[Tensor]:
    """[Sq, Sk] (or [1 or B, Sq, Sk] with row_start): which keys each query sees; None: all."""
    if not causal:
        return None
    q_pos = torch.arange(sq, device=device) + q_offset
    k_pos = torch.arange(sk, device=device) + k_offset
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window:
        allowed = allowed & (q_pos[:, None] - k_pos[None, :] < window)
    if row_start is not None:
        allowed = allowed & (k_pos[None, None, :] >= row_start.to(device)[:, :, None])
    return allowed


def _scores(q: Tensor, k: Tensor, scale: float, causal: bool, q_offset: int, k_offset: int,
            dtype: torch.dtype, window: int = 0, row_start: Optional[Tensor] = None) -> Tensor:
    """Scaled, masked scores [B, Hkv, G, Sq, Sk] in ``dtype`` (masked entries are -inf)."""
    hkv = k.shape[1]
    s = torch.einsum("bhgqd,bhkd->bhgqk", _grouped(q.to(dtype), hkv), k.to(dtype)) * scale
    allowed = _allowed(q.shape[2], k.shape[2], causal, q_offset, k_offset, q.device, window,
                       row_start)
    if allowed is not None:
        if allowed.dim() == 3:
            allowed = allowed[:, None, None]
        s = s.masked_fill(~allowed, float("-inf"))
    return s


def _reference_forward(q, k, v, scale, causal, q_offset, k_offset, dtype=torch.float32,
                       window=0, row_start=None):
    """(out, lse) in ``dtype``; rows without an allowed key give out 0 and lse -inf."""
    s = _scores(q, k, scale, causal, q_offset, k_offset, dtype, window, row_start)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.masked_fill(torch.isneginf(lse), 0.0)[..., None])
    out = torch.einsum("bhgqk,bhkd->bhgqd", p, v.to(dtype))
    return out.flatten(1, 2), lse.flatten(1, 2)


def _reference_backward(q, k, v, out, lse, dout, scale, causal, q_offset, k_offset, delta,
                        dtype=torch.float32, window=0, row_start=None):
    """(dq, dk, dv) in ``dtype`` from the final out/lse; dk, dv summed over each query group."""
    hkv = k.shape[1]
    s = _scores(q, k, scale, causal, q_offset, k_offset, dtype, window, row_start)
    lse_g = _grouped(lse.to(dtype), hkv)
    p = torch.exp(s - lse_g.masked_fill(torch.isneginf(lse_g), float("inf"))[..., None])
    if delta is None:
        delta = attention_delta(out, dout)
    do_g = _grouped(dout.to(dtype), hkv)
    dv = torch.einsum("bhgqk,bhgqd->bhkd", p, do_g)
    dp = torch.einsum("bhgqd,bhkd->bhgqk", do_g, v.to(dtype))
    ds = p * (dp - _grouped(delta.to(dtype), hkv)[..., None]) * scale
    dq = torch.einsum("bhgqk,bhkd->bhgqd", ds, k.to(dtype)).flatten(1, 2)
    dk = torch.einsum("bhgqk,bhgqd->bhkd", ds, _grouped(q.to(dtype), hkv))
    return dq, dk, dv


def reference_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool,
                        q_offset: int = 0, k_offset: int = 0,
                        dtype: torch.dtype = torch.float64, window: int = 0,
                        row_start: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Plain (non-blocked) attention in ``dtype`` with the same conventions, for tests."""
    _check_shapes(q, k, v)
    return _reference_forward(q, k, v, scale, causal, q_offset, k_offset, dtype, window,
                              row_start)


def document_bounds(positions: Tensor) -> tuple[Tensor, Tensor]:
    """(row_start, col_stop), int32 [Bp, S], of position ids ``positions`` [Bp, S]: a document
    starts at index 0 and wherever a position is not the previous one plus one (transformers'
    packed-sequence rule); row_start[b, i] is the index where token i's document starts, col_stop
    [b, i] one past the index where it ends."""
    if positions.dim() != 2:
        raise ValueError(f"positions must be [batch, sequence]; got {tuple(positions.shape)}")
    length = positions.shape[1]
    index = torch.arange(length, device=positions.device).expand_as(positions)
    starts_here = torch.ones_like(positions, dtype=torch.bool)
    starts_here[:, 1:] = positions[:, 1:] - positions[:, :-1] != 1
    row_start = torch.cummax(torch.where(starts_here, index, 0), dim=1).values
    ends_after = torch.ones_like(starts_here)
    ends_after[:, :-1] = starts_here[:, 1:]
    col_stop = torch.where(ends_after, index + 1, length).flip(1).cummin(dim=1).values.flip(1)
    return row_start.to(torch.int32), col_stop.to(torch.int32)


# --- whether positions hold packed documents, read once per tensor ---------------------------------

@dataclasses.dataclass(eq=False)
class _DocumentsCheck:
    """What is known of one positions tensor while it lives and is not written: whether some row
    holds more than one document, or, until that is read, the pinned flag a device copy is writing
    and the event after the copy."""
    tensor: weakref.ref
    version: int
    documents: Optional[bool] = None
    flag: Optional[Tensor] = None
    copied: object = None


_DOCUMENT_CHECKS: dict[int, _DocumentsCheck] = {}  # id of the positions tensor -> its check


def _packed(positions: Tensor) -> Tensor:
    """[1] bool on positions' device: some row holds more than one document (a position that is not
    the previous one plus one, ``document_bounds``' rule)."""
    rows = positions.reshape(-1, positions.shape[-1])
    return (rows[:, 1:] - rows[:, :-1] != 1).any().reshape(1)


def _remember(positions: Tensor, **known) -> _DocumentsCheck:
    key = id(positions)

    def forget(ref, key=key) -> None:
        entry = _DOCUMENT_CHECKS.get(key)
        if entry is not None and entry.tensor is ref:
            del _DOCUMENT_CHECKS[key]

    entry = _DOCUMENT_CHECKS[key] = _DocumentsCheck(weakref.ref(positions, forget),
                                                    _compat.version_counter(positions), **known)
    return entry


def has_documents(positions: Tensor) -> bool:
    """Whether some row of ``positions`` holds more than one document. Read on the host once per
    tensor (and again after it is written): from the pinned flag ``graphopt::checked_positions``
    started copying (waiting for that copy only), else with one blocking read, remembered (not for
    an inference tensor, whose writes are not counted). The copy the op returns is nobody else's,
    so its check stands while it lives."""
    entry = _DOCUMENT_CHECKS.get(id(positions))
    version = _compat.version_counter(positions)
    if entry is None or entry.tensor() is not positions or entry.version != version:
        launch_counts["positions_read_blocking"] += 1
        documents = bool(_packed(positions).item())
        if version is not None:  # an inference tensor keeps no count of its writes: read it each time
            _remember(positions, documents=documents)
        return documents
    if entry.documents is None:
        entry.copied.synchronize()
        entry.documents = bool(entry.flag.item())
        entry.flag = entry.copied = None
        launch_counts["positions_read_ahead"] += 1
    return entry.documents


@torch.library.custom_op("graphopt::checked_positions", mutates_args=())
def _checked_positions_op(positions: Tensor) -> Tensor:
    """A copy of ``positions`` whose documents check has started: on CUDA the answer is copied to
    pinned host memory now, behind nothing but the work queued so far, and ``has_documents`` of the
    copy waits for that copy only."""
    checked = positions.clone()
    if checked.is_cuda:
        flag = torch.empty(1, dtype=torch.bool, pin_memory=True)
        flag.copy_(_packed(checked), non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(checked.device))
        _remember(checked, flag=flag, copied=copied)
    else:
        _remember(checked, documents=bool(_packed(checked).item()))
    return checked


@_checked_positions_op.register_fake
def _(positions):
    return torch.empty_like(positions)


# --- torch's cuDNN attention kernels on one block ------------------------------------------------

_LOG = logging.getLogger("graphopt.ops.attention")
_CUDNN_REFUSED: dict[tuple, str] = {}  # (dtype, D, Hq, Hkv, is_causal) -> why cuDNN refused it


def _cudnn_supports(q: Tensor, k: Tensor) -> bool:
    """Device, dtype and head dim for which graphopt prefers torch's cuDNN attention kernels:
    fp16/bf16, D % 8 == 0, D <= 128, Hopper or newer (where they measured fastest)."""
    if not (q.is_cuda and q.dtype in _CUDNN_DTYPES and k.dtype == q.dtype):
        return False
    head_dim = q.shape[-1]
    return (head_dim % 8 == 0 and head_dim <= 128 and torch.backends.cudnn.is_available()
            and torch.cuda.get_device_capability(q.device) >= (9, 0))


def flash_block_mask(seqlen_q: int, seqlen_k: int, causal: bool, q_offset: int,
                     k_offset: int) -> Optional[bool]:
    """The block's mask in terms of a kernel that knows no offsets: False when no key is masked,
    True when it is the diagonal block of a causal attention (masked exactly like
    ``is_causal=True`` on a square block), None for any other (partial) mask."""
    if not causal or k_offset + seqlen_k - 1 <= q_offset:
        return False
    if q_offset == k_offset and seqlen_q == seqlen_k:
        return True
    return None


def check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is not one of {KERNELS} (graphopt.config."
                         "attention_kernel)")


def cudnn_eligible(q: Tensor, k: Tensor, kernel: str = "auto", masked: bool = False) -> bool:
    """Whether ``impl=None`` may run q and k's blocks on cuDNN: kernel choice, device, dtype and
    head dim, and no window or document mask (``masked``) -- independent of the block's offsets
    and of refusals seen so far (ranks decide alike)."""
    check_kernel(kernel)
    return kernel == "auto" and not masked and _cudnn_supports(q, k)


def cudnn_block_causal(q: Tensor, k: Tensor, causal: bool, q_offset: int,
                       k_offset: int) -> Optional[bool]:
    """``is_causal`` for torch's cuDNN attention on this block, or None where it cannot run it."""
    if not _cudnn_supports(q, k):
        return None
    is_causal = flash_block_mask(q.shape[2], k.shape[2], causal, q_offset, k_offset)
    if is_causal is None or _cudnn_key(q, k, is_causal) in _CUDNN_REFUSED:
        return None
    return is_causal


def uses_cudnn(q: Tensor, k: Tensor, causal: bool, q_offset: int, k_offset: int,
               impl: Optional[str] = None, kernel: str = "auto", masked: bool = False) -> bool:
    """Whether the block functions run torch's cuDNN kernels on this block (the backward also
    needs out and no LSE gradient); ``masked``: a window or document mask narrows it."""
    if impl not in _IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {_IMPLS}; pass None to pick by device")
    check_kernel(kernel)
    if impl is None:
        if kernel != "auto":
            return False
    elif impl != "cudnn":
        return False
    applies = not masked and cudnn_block_causal(q, k, causal, q_offset, k_offset) is not None
    if impl == "cudnn" and not applies:
        raise ValueError(
            f"impl='cudnn' needs CUDA fp16/bf16 tensors with D % 8 == 0, D <= 128 on sm90+ and a "
            f"block without a partial causal mask; got {q.dtype} on {q.device}, D={q.shape[-1]}, "
            f"Sq={q.shape[2]}, Sk={k.shape[2]}, q_offset={q_offset}, k_offset={k_offset}, "
            f"causal={causal}, window or documents={masked}. Use impl=None to fall back to "
            "graphopt's kernel")
    return applies


def _cudnn_key(q: Tensor, k: Tensor, is_causal: bool) -> tuple:
    return (q.dtype, q.shape[-1], q.shape[1], k.shape[1], is_causal)


def _expand_heads(x: Tensor, hq: int) -> Tensor:
    """[B, Hkv, S, D] -> [B, Hq, S, D], query head h reading key/value head h // (Hq // Hkv)."""
    return x if x.shape[1] == hq else x.repeat_interleave(hq // x.shape[1], dim=1)


def _record_refusal(refused: dict[tuple, str], q: Tensor, k: Tensor, is_causal: bool,
                    err: RuntimeError, what: str, instead: str) -> None:
    """Remember (and log once) that cuDNN refused this configuration, and why."""
    key = _cudnn_key(q, k, is_causal)
    refused[key] = str(err).splitlines()[0] if str(err) else type(err).__name__
    _LOG.warning("torch's cuDNN attention refused %s%s (%s); %s", what, key, refused[key], instead)


def _cudnn_refused(q: Tensor, k: Tensor, is_causal: bool, err: RuntimeError) -> None:
    _record_refusal(_CUDNN_REFUSED, q, k, is_causal, err, "",
                    "graphopt's Triton kernels run these blocks instead")


# Grouped heads: cuDNN reads key/value head h // (Hq // Hkv) itself and sums dK/dV over each query
# group inside the kernel (float32), returning them in k's dtype -- no repeated K/V in memory, no
# float32 group sums. A configuration for which it refuses grouped heads is logged once and runs
# with K/V repeated to Hq heads instead (dK/dV then summed here in float32).
_CUDNN_GQA_REFUSED: dict[tuple, str] = {}


def _grouped_natively(q: Tensor, k: Tensor, is_causal: bool) -> bool:
    return q.shape[1] != k.shape[1] and _cudnn_key(q, k, is_causal) not in _CUDNN_GQA_REFUSED


def _cudnn_gqa_refused(q: Tensor, k: Tensor, is_causal: bool, err: RuntimeError) -> None:
    _record_refusal(_CUDNN_GQA_REFUSED, q, k, is_causal, err, "grouped key/value heads ",
                    "these blocks run with K/V repeated to the query heads")


def _aten_cudnn_forward(q: Tensor, k: Tensor, v: Tensor, *, scale: float,
                        is_causal: bool) -> tuple[Tensor, Tensor]:
    """torch's cuDNN attention forward: (out, lse [B, Hq, Sq, 1] or [B, Hq, Sq])."""
    result = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, is_causal, False, scale=scale)
    return result[0], result[1]


def _aten_cudnn_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor,
                         *, scale: float, is_causal: bool) -> tuple[Tensor, Tensor, Tensor]:
    """torch's cuDNN attention backward: (dq, dk, dv) shaped like q, k, v."""
    seed = torch.empty((), dtype=torch.long, device=q.device)  # no dropout: never read
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, k, v, out, lse.unsqueeze(-1), seed, seed, None, None, None, q.shape[2],
        k.shape[2], 0.0, is_causal, scale=scale)


def _cudnn_block_forward(q: Tensor, k: Tensor, v: Tensor, *, scale: float,
                         is_causal: bool) -> Optional[tuple[Tensor, Tensor]]:
    """(out [q's dtype], lse float32 [B, Hq, Sq]) of one block, or None if cuDNN refused it."""
    hq = q.shape[1]
    native = _grouped_natively(q, k, is_causal)
    k_in, v_in = (k, v) if native else (_expand_heads(k, hq), _expand_heads(v, hq))
    try:
        out, lse = _aten_cudnn_forward(unit_last_stride(q), unit_last_stride(k_in),
                                       unit_last_stride(v_in), scale=scale, is_causal=is_causal)
    except RuntimeError as err:
        if native:
            _cudnn_gqa_refused(q, k, is_causal, err)
            return _cudnn_block_forward(q, k, v, scale=scale, is_causal=is_causal)
        _cudnn_refused(q, k, is_causal, err)
        return None
    launch_counts["cudnn_forward"] += 1
    return out, lse.reshape(q.shape[:3]).float()


def _cudnn_block_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                          dout: Tensor, *, scale: float, is_causal: bool
                          ) -> Optional[tuple[Tensor, Tensor, Tensor]]:
    """(dq [q's dtype], dk, dv) of one block, or None if cuDNN refused it; dk, dv in k's dtype
    (summed over each query group by cuDNN), or float32 sums over a query group where cuDNN
    refused grouped heads and K/V ran repeated. Delta is derived from out."""
    hq, hkv = q.shape[1], k.shape[1]
    native = _grouped_natively(q, k, is_causal)
    k_in, v_in = (k, v) if native else (_expand_heads(k, hq), _expand_heads(v, hq))
    try:
        dq, dk, dv = _aten_cudnn_backward(
            *(unit_last_stride(x) for x in (q, k_in, v_in, out)), lse.contiguous(),
            unit_last_stride(dout), scale=scale, is_causal=is_causal)
    except RuntimeError as err:
        if native:
            _cudnn_gqa_refused(q, k, is_causal, err)
            return _cudnn_block_backward(q, k, v, out, lse, dout, scale=scale,
                                         is_causal=is_causal)
        _cudnn_refused(q, k, is_causal, err)
        return None
    launch_counts["cudnn_backward"] += 1
    if hq != hkv and not native:
        dk = dk.unflatten(1, (hkv, hq // hkv)).float().sum(2)
        dv = dv.unflatten(1, (hkv, hq // hkv)).float().sum(2)
    return dq, dk, dv


# --- the block API ---------------------------------------------------------------------------------

def merge_attention_blocks(out_acc: Tensor, lse_acc: Tensor, out: Tensor, lse: Tensor) -> None:
    """Merges (out, lse) of another key block into the float32 (out_acc, lse_acc), in place."""
    lse_new = torch.logaddexp(lse_acc, lse.float())
    finite = ~torch.isneginf(lse_new)
    safe = torch.where(finite, lse_new, torch.zeros_like(lse_new))
    w_acc = torch.where(finite, torch.exp(lse_acc - safe), torch.zeros_like(safe))
    w_new = torch.where(finite, torch.exp(lse.float() - safe), torch.zeros_like(safe))
    out_acc.mul_(w_acc[..., None]).add_(out.float() * w_new[..., None])
    lse_acc.copy_(lse_new)


def _merge_on_device(out_acc: Tensor, lse_acc: Tensor, out: Tensor, lse: Tensor) -> None:
    """merge_attention_blocks, in one Triton pass on CUDA where the accumulators' layout allows."""
    rows_contiguous = (out_acc.stride(-1) == 1 and out_acc.stride(2) == out_acc.shape[-1]
                       and lse_acc.stride(-1) == 1)
    if out_acc.is_cuda and rows_contiguous:
        from graphopt.kernels.merge_attention import merge_blocks_fused
        merge_blocks_fused(out_acc, lse_acc, out, lse)
    else:
        merge_attention_blocks(out_acc, lse_acc, out, lse)


def merge_parts(out: Tensor, lse: Tensor, parts: list[tuple[Tensor, Tensor]]) -> None:
    """out, lse = the merge of the partial results ``parts``, in float32, rounded once: fused on
    CUDA where the layouts allow (``graphopt.kernels.merge_attention``), in torch elsewhere; more
    than the kernel's MAX_PARTS parts are merged in float32 groups. No part: out 0, lse -inf (rows
    that saw no key)."""
    if not parts:
        out.zero_()
        lse.fill_(float("-inf"))
        return
    if out.is_cuda:
        from graphopt.kernels.merge_attention import MAX_PARTS, flat_head_strides, merge_parts_fused
        if all(flat_head_strides(*x) is not None for x in [(out, lse)] + parts):
            while len(parts) > MAX_PARTS:
                head = (torch.empty(out.shape, dtype=torch.float32, device=out.device),
                        torch.empty(lse.shape, dtype=torch.float32, device=lse.device))
                merge_parts_fused(*head, parts[:MAX_PARTS])
                parts = [head] + parts[MAX_PARTS:]
            merge_parts_fused(out, lse, parts)
            return
    out_acc = parts[0][0].float().clone()
    lse_acc = parts[0][1].float().clone()
    for part in parts[1:]:
        merge_attention_blocks(out_acc, lse_acc, *part)
    out.copy_(out_acc)
    lse.copy_(lse_acc)


def _check_acc(q: Tensor, out_acc: Optional[Tensor], lse_acc: Optional[Tensor]) -> None:
    if (out_acc is None) != (lse_acc is None):
        raise ValueError("accumulate mode needs both out_acc and lse_acc (or neither)")
    if out_acc is None:
        return
    if out_acc.dtype != torch.float32 or lse_acc.dtype != torch.float32:
        raise ValueError(
            f"out_acc/lse_acc must be float32 (got {out_acc.dtype}/{lse_acc.dtype}); allocate them "
            "with torch.zeros(..., dtype=torch.float32) and torch.full(..., -inf)")
    if out_acc.shape != q.shape or lse_acc.shape != q.shape[:3]:
        raise ValueError(
            f"out_acc {tuple(out_acc.shape)} / lse_acc {tuple(lse_acc.shape)} must be "
            f"{tuple(q.shape)} / {tuple(q.shape[:3])}")


def attention_block_forward(q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool,
                            q_offset: int = 0, k_offset: int = 0,
                            out_acc: Optional[Tensor] = None, lse_acc: Optional[Tensor] = None,
                            impl: Optional[str] = None, kernel: str = "auto", window: int = 0,
                            row_start: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Attention of q over one key block: (out in q.dtype, lse float32 [B, Hq, Sq]).

    With ``out_acc`` (float32 [B, Hq, Sq, D]) and ``lse_acc`` (float32 [B, Hq, Sq]), the block is
    merged into them in float32 (in place) and they are returned. Start a merge with out_acc = 0 and
    lse_acc = -inf. ``window`` and ``row_start`` (this block's query rows) narrow a causal mask.
    """
    _check_shapes(q, k, v)
    _check_acc(q, out_acc, lse_acc)
    masked = bool(window) or row_start is not None
    if uses_cudnn(q, k, causal, q_offset, k_offset, impl, kernel, masked):
        result = _cudnn_block_forward(q, k, v, scale=scale,
                                      is_causal=flash_block_mask(q.shape[2], k.shape[2], causal,
                                                                 q_offset, k_offset))
        if result is not None:
            if out_acc is None:
                return result
            _merge_on_device(out_acc, lse_acc, *result)
            return out_acc, lse_acc
        impl = "triton"  # cuDNN refused this configuration (logged once)
    if _use_triton(q, impl):
        from graphopt.kernels.flash_attention_fwd import flash_attention_forward
        return flash_attention_forward(q, k, v, scale=scale, causal=causal, q_offset=q_offset,
                                       k_offset=k_offset, out_acc=out_acc, lse_acc=lse_acc,
                                       window=window, row_start=row_start)
    out, lse = _reference_forward(q, k, v, scale, causal, q_offset, k_offset, window=window,
                                  row_start=row_start)
    if out_acc is None:
        return out.to(q.dtype), lse
    merge_attention_blocks(out_acc, lse_acc, out, lse)
    return out_acc, lse_acc


def attention_delta(out: Tensor, dout: Tensor, *, impl: Optional[str] = None) -> Tensor:
    """rowsum(dout * out) in float32, [B, Hq, Sq]: the softmax-backward correction term."""
    if _use_triton(out, impl):
        from graphopt.kernels.flash_attention_bwd import flash_attention_delta
        return flash_attention_delta(out, dout)
    return (dout.float() * out.float()).sum(-1)


def attention_block_backward(q: Tensor, k: Tensor, v: Tensor, out: Optional[Tensor], lse: Tensor,
                             dout: Tensor, *, scale: float, causal: bool, q_offset: int = 0,
                             k_offset: int = 0, delta: Optional[Tensor] = None,
                             dq_acc: Optional[Tensor] = None, dk_acc: Optional[Tensor] = None,
                             dv_acc: Optional[Tensor] = None,
                             kv_grad_dtype: Optional[torch.dtype] = None, impl: Optional[str] = None,
                             lse_grad_in_delta: bool = False, kernel: str = "auto",
                             window: int = 0, row_start: Optional[Tensor] = None,
                             col_stop: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one key block: (dq, dk, dv); dk, dv [B, Hkv, Sk, D] summed over query groups.

    ``out`` and ``lse`` are the final (merged over all key blocks) output and log-sum-exp; ``delta``
    (from ``attention_delta``) can be computed once and passed to every block, and then ``out`` may
    be None (it enters only through delta). A gradient on the LSE is folded into delta
    (delta - dlse); say so with ``lse_grad_in_delta=True``, since torch's cuDNN backward, which
    derives delta from out, then cannot be used. With ``dq_acc``
    (float32, q's shape) dq is added into it and returned, and dk, dv come back in float32;
    otherwise dq, dk, dv have q's / k's dtype. With ``dk_acc`` and ``dv_acc`` (float32, k's shape)
    dk and dv are added into them, straight from the kernel's output, and they are returned;
    ``kv_grad_dtype`` otherwise sets the dtype of the returned dk, dv. ``window``, ``row_start``
    (this block's query rows) and ``col_stop`` (its keys) narrow a causal mask.
    """
    _check_shapes(q, k, v)
    if out is None and delta is None:
        raise ValueError("attention_block_backward needs out (or delta = attention_delta(out, dout))")
    if dq_acc is not None and (dq_acc.dtype != torch.float32 or dq_acc.shape != q.shape):
        raise ValueError(
            f"dq_acc must be float32 with q's shape {tuple(q.shape)}; got {dq_acc.dtype} "
            f"{tuple(dq_acc.shape)}")
    if (dk_acc is None) != (dv_acc is None):
        raise ValueError("pass both dk_acc and dv_acc, or neither")
    if dk_acc is not None and (dk_acc.dtype != torch.float32 or dk_acc.shape != k.shape
                               or dv_acc.dtype != torch.float32 or dv_acc.shape != v.shape):
        raise ValueError(
            f"dk_acc / dv_acc must be float32 with k's shape {tuple(k.shape)}; got {dk_acc.dtype} "
            f"{tuple(dk_acc.shape)} / {dv_acc.dtype} {tuple(dv_acc.shape)}")
    grads = _block_grads(q, k, v, out, lse, dout, scale=scale, causal=causal, q_offset=q_offset,
                         k_offset=k_offset, delta=delta, dq_acc=dq_acc, impl=impl,
                         lse_grad_in_delta=lse_grad_in_delta, kernel=kernel, window=window,
                         row_start=row_start, col_stop=col_stop)
    dq, dk, dv = grads
    if dq_acc is None:
        dq = dq.to(q.dtype)
    elif dq is not dq_acc:
        dq = dq_acc.add_(dq)
    if dk_acc is not None:
        return dq, dk_acc.add_(dk), dv_acc.add_(dv)
    dtype = kv_grad_dtype or (torch.float32 if dq_acc is not None else k.dtype)
    return dq, dk.to(dtype), dv.to(dtype)


def _block_grads(q, k, v, out, lse, dout, *, scale, causal, q_offset, k_offset, delta, dq_acc,
                 impl, lse_grad_in_delta, kernel, window, row_start,
                 col_stop) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) as the chosen kernel produces them; dq already in dq_acc where the kernel
    accumulates (Triton), else separate."""
    if impl == "cudnn" and (out is None or lse_grad_in_delta):
        raise ValueError("impl='cudnn' derives delta from out: pass out, and no LSE gradient "
                         "(use impl=None to fall back to graphopt's kernel)")
    masked = bool(window) or row_start is not None
    if (out is not None and not lse_grad_in_delta
            and uses_cudnn(q, k, causal, q_offset, k_offset, impl, kernel, masked)):
        result = _cudnn_block_backward(
            q, k, v, out, lse, dout, scale=scale,
            is_causal=flash_block_mask(q.shape[2], k.shape[2], causal, q_offset, k_offset))
        if result is not None:
            return result
        impl = "triton"  # cuDNN refused this configuration (logged once)
    if _use_triton(q, impl):
        from graphopt.kernels.flash_attention_bwd import flash_attention_backward
        return flash_attention_backward(q, k, v, out, lse, dout, scale=scale, causal=causal,
                                        q_offset=q_offset, k_offset=k_offset, delta=delta,
                                        dq_acc=dq_acc, window=window, row_start=row_start,
                                        col_stop=col_stop)
    return _reference_backward(q, k, v, out, lse, dout, scale, causal, q_offset, k_offset, delta,
                               window=window, row_start=row_start)


# --- custom ops ------------------------------------------------------------------------------------

@torch.library.custom_op("graphopt::attention_block_forward", mutates_args=())
def _attention_block_forward_op(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool,
                                q_offset: int, k_offset: int) -> tuple[Tensor, Tensor]:
    return attention_block_forward(q, k, v, scale=scale, causal=causal, q_offset=q_offset,
                                   k_offset=k_offset)


@_attention_block_forward_op.register_fake
def _(q, k, v, scale, causal, q_offset, k_offset):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("graphopt::attention_block_backward", mutates_args=())
def _attention_block_backward_op(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                 dout: Tensor, delta: Optional[Tensor], scale: float,
                                 causal: bool, q_offset: int,
                                 k_offset: int) -> tuple[Tensor, Tensor, Tensor]:
    # A delta given to the op may carry an LSE gradient (the flash_attention backward passes one
    # only then), so only a missing delta lets torch's cuDNN backward run.
    return attention_block_backward(q, k, v, out, lse, dout, scale=scale, causal=causal,
                                    q_offset=q_offset, k_offset=k_offset, delta=delta,
                                    lse_grad_in_delta=delta is not None)


@_attention_block_backward_op.register_fake
def _(q, k, v, out, lse, dout, delta, scale, causal, q_offset, k_offset):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@torch.library.custom_op("graphopt::flash_attention", mutates_args=())
def _flash_attention_op(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool,
                        window: int = 0, positions: Optional[Tensor] = None,
                        kernel_choice: str = "auto") -> tuple[Tensor, Tensor]:
    # Not "kernel": Inductor's fallback lowering takes the op's trailing default arguments as
    # keywords, and FallbackKernel.create has a parameter of that name (a TypeError under Inductor).
    row_start = _row_bounds(q, positions, kernel_choice)[0]
    out, lse = attention_block_forward(q, k, v, scale=scale, causal=causal, kernel=kernel_choice,
                                       window=window, row_start=row_start)
    # Contiguous whatever q's strides (q is often a transposed view) and whichever kernel ran, as
    # the fake implementation says.
    return out.contiguous(), lse


def _row_bounds(q: Tensor, positions: Optional[Tensor],
                kernel: str) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(row_start, col_stop) of ``positions``' documents; (None, None) without positions, and on
    CUDA where cuDNN may run and every row holds one document (then plain causal is the same
    function, and cuDNN runs it)."""
    if positions is None:
        return None, None
    _check_positions(q, positions)
    if cudnn_eligible(q, q, kernel) and not has_documents(positions):
        return None, None
    return document_bounds(positions)


def _check_positions(q: Tensor, positions: Tensor) -> None:
    if positions.dim() != 2 or positions.shape[1] != q.shape[2] or \
            positions.shape[0] not in (1, q.shape[0]) or positions.is_floating_point():
        raise ValueError(f"positions must be integer position ids [1 or B, S] = [1 or "
                         f"{q.shape[0]}, {q.shape[2]}]; got {positions.dtype} "
                         f"{tuple(positions.shape)}")


@_flash_attention_op.register_fake
def _(q, k, v, scale, causal, window=0, positions=None, kernel_choice="auto"):
    _check_shapes(q, k, v)
    check_kernel(kernel_choice)
    if positions is not None:
        _check_positions(q, positions)
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


def _flash_attention_setup_context(ctx, inputs, output):
    q, k, v, scale, causal, window, positions, kernel = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, positions)
    ctx.options = (scale, causal, window, kernel)
    ctx.set_materialize_grads(False)  # an unused LSE gets None, so torch's cuDNN backward can run


def _flash_attention_backward(ctx, dout, dlse):
    # d lse / d s = p, so a gradient on the LSE folds into delta: ds = p * (dp - (delta - dlse)).
    q, k, v, out, lse, positions = ctx.saved_tensors
    scale, causal, window, kernel = ctx.options
    dout = torch.zeros_like(out) if dout is None else dout.contiguous()
    delta = None
    if dlse is not None:
        delta = attention_delta(out, dout) - dlse
    dq, dk, dv = torch.ops.graphopt.flash_attention_backward(
        q, k, v, out, lse, dout, delta, scale, causal, window, positions, kernel)
    return dq, dk, dv, None, None, None, None, None


@torch.library.custom_op("graphopt::flash_attention_backward", mutates_args=())
def _flash_attention_backward_op(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                 dout: Tensor, delta: Optional[Tensor], scale: float,
                                 causal: bool, window: int, positions: Optional[Tensor],
                                 kernel_choice: str) -> tuple[Tensor, Tensor, Tensor]:
    # A delta given to the op carries an LSE gradient (the forward's backward passes one only
    # then), so only a missing delta lets torch's cuDNN backward run.
    row_start, col_stop = _row_bounds(q, positions, kernel_choice)
    grads = attention_block_backward(
        q, k, v, out, lse, dout, scale=scale, causal=causal, delta=delta, kernel=kernel_choice,
        lse_grad_in_delta=delta is not None, window=window, row_start=row_start,
        col_stop=col_stop)
    return tuple(grad.contiguous() for grad in grads)


@_flash_attention_backward_op.register_fake
def _(q, k, v, out, lse, dout, delta, scale, causal, window, positions, kernel_choice):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


_flash_attention_op.register_autograd(_flash_attention_backward,
                                      setup_context=_flash_attention_setup_context)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None,
                    causal: bool = False, window: int = 0, positions: Optional[Tensor] = None,
                    kernel: str = "auto") -> tuple[Tensor, Tensor]:
    """Differentiable attention returning (out, lse); scale defaults to 1/sqrt(D). ``window`` and
    the documents of ``positions`` [1 or B, S] narrow a causal mask."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return torch.ops.graphopt.flash_attention(q, k, v, float(scale), bool(causal), int(window),
                                              positions, kernel)
