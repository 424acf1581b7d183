"""Attention kernels on one GPU, every column naming the kernel it runs.

    python3 bench/attention.py --out $OUT/attention --jobs 10 --gpu-tests 110 --budget-s 235

Causal, sliding-window (4K) and packed-document (long-tailed lengths) attention, B = 1, Hq = 32,
D = 128, bf16, S = 8K..64K, Hkv = 32 and 8, forward and forward + backward. Columns:

  triton        graphopt's Triton kernels, forced (``flash_attention(kernel="triton")``), default
                variants; the variants that ran are recorded (``graphopt.kernels.launch_counts``)
  triton_v1     the same op with the kernels before issue 32 (forward "pointer", backward
                "two_pass", whose dQ kernel recomputes P)
  auto          graphopt's default path (``kernel="auto"``): the backend that ran is recorded
                (cuDNN for whole causal attention on Hopper, Triton for windows and documents)
  sdpa_default  torch SDPA with no backend forced (what a user gets; the backend SDPA picks is
                recorded; cuDNN on Hopper), causal only
  sdpa_cudnn    SDPA forced to cuDNN (timed separately only where the default is another backend)
  sdpa_flash    SDPA forced to its flash backend (FlashAttention-2), causal only
  flex          torch.compile'd FlexAttention with the same mask as a block mask (built once per
                case, outside the timing; 128 x 128 blocks, fully masked ones skipped)

Windows and documents have no SDPA column: SDPA takes them only as a dense S x S mask, which it
cannot skip. Times are medians of CUDA-event timed calls; the forward is the training forward
(inputs require grad); forward + backward is one forward and ``torch.autograd.grad``. TFLOP/s
count the FLOPs the mask needs (4 * D per visible (query, key) pair and head, forward; x 3.5 for
forward + backward, the FlashAttention convention), so ratios between columns are time ratios;
``tiles_computed`` is the fraction of the dense score tiles graphopt's forward computes
(``graphopt.kernels.attention_tiles``).

Phases, results written after each step (a time-out keeps what finished):
  compile      every Triton config the run tunes and FlexAttention for every case, in --jobs
               processes (Triton's and Inductor's disk caches then serve this process); with
               --gpu-tests S, the attention GPU tests run beside it (log: gpu_tests.log) and
               are waited for (at most S seconds from the start) before anything is timed
  correctness  at S = 8K, fresh random inputs: each kernel and each Triton variant, output and
               dQ/dK/dV of one key/value head group, against float32 attention
  variants     old and new Triton kernels side by side (each forward and backward variant, kernel
               calls) at S = 16K
  matrix       mask x S x Hkv, every applicable column, forward and forward + backward
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import pathlib
import platform
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Sizes (``configure_smoke`` shrinks them for a CPU run of the control flow).
DEVICE, DTYPE = "cuda", torch.bfloat16
HEADS, HEAD_DIM, BATCH = 32, 128, 1
WINDOW = 4096
MASKS = ("causal", "window", "docs")
SEQLENS = (8192, 16384, 32768, 65536)
HEADS_KV = (32, 8)
CORRECTNESS_SEQLEN = 8192
FLEX_BLOCK = 128
VARIANTS_SEQLEN = 16384
# Long-tailed document lengths: Pareto with this minimum and tail index, cut at the sequence end.
DOC_MIN_LEN, DOC_TAIL = 256, 1.1
TARGETS = {"triton_fwd_bwd_vs_cudnn_causal_min": 0.9, "docs_fwd_bwd_vs_flex_min": 1.2,
           "window_fwd_bwd_vs_flex_min": 1.2}
ERROR_LIMITS = {"out": 2e-2, "dq": 5e-2, "dk": 5e-2, "dv": 5e-2}  # max |x - ref| / max |ref|
TIMING = {"budget_ms": 250.0, "least": 3, "most": 25}
# --gpu-tests: run beside the compile phase, finished (or stopped) before anything is timed.
# Most telling first: a test stopped at the deadline leaves the ones before it in the log.
GPU_TESTS = ("tests/gpu/test_flash_attention_gpu.py::test_kernel_variants_match_float64",
             "tests/gpu/test_attention_masks_gpu.py",
             "tests/gpu/test_flash_attention_gpu.py::test_ring_steps_merge_and_accumulate",
             "tests/gpu/test_flash_attention_gpu.py::test_flash_attention_op_matches_sdpa",
             "tests/gpu/test_flash_attention_gpu.py::test_forward_backward_match_float64")
FORWARD_VARIANTS = ("pointer", "tma", "tma_ws", "tma_persistent")
BACKWARD_VARIANTS = ("two_pass", "atomic_dq", "atomic_dq_tma")


# --- masks ---------------------------------------------------------------------------------------

def document_lengths(seqlen: int, seed: int = 0) -> list[int]:
    """Long-tailed document lengths that fill ``seqlen`` (the last one cut): many short documents,
    a few long ones, as in packed pre-training batches."""
    gen = torch.Generator().manual_seed(seed + seqlen)
    lengths, total = [], 0
    while total < seqlen:
        u = float(torch.rand((), generator=gen))
        length = min(int(DOC_MIN_LEN * (1.0 - u) ** (-1.0 / DOC_TAIL)), seqlen)
        length = min(length, seqlen - total)
        lengths.append(length)
        total += length
    return lengths


def document_positions(lengths: list[int], device) -> torch.Tensor:
    """Position ids [1, S] restarting at every document (transformers' packed-sequence form)."""
    return torch.cat([torch.arange(n, device=device) for n in lengths])[None]


class Mask:
    """One mask in every form the kernels take it: graphopt's arguments, a FlexAttention block
    mask (built once) and a dense [S, S] boolean for the float32 reference."""

    def __init__(self, kind: str, seqlen: int, device):
        self.kind, self.seqlen = kind, seqlen
        self.window = WINDOW if kind == "window" else 0
        self.lengths = document_lengths(seqlen) if kind == "docs" else None
        self.positions = (document_positions(self.lengths, device) if kind == "docs" else None)
        self.doc_ids = (torch.repeat_interleave(torch.arange(len(self.lengths), device=device),
                                                torch.tensor(self.lengths, device=device))
                        if kind == "docs" else None)
        self._block_mask = None

    def graphopt_kwargs(self) -> dict:
        return dict(causal=True, window=self.window, positions=self.positions)

    def row_start(self) -> Optional[torch.Tensor]:
        if self.positions is None:
            return None
        from graphopt.ops.attention import document_bounds
        return document_bounds(self.positions)[0]

    def mask_mod(self):
        window, doc_ids = self.window, self.doc_ids

        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        def sliding(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

        def documents(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (doc_ids[q_idx] == doc_ids[kv_idx])

        return {"causal": causal, "window": sliding, "docs": documents}[self.kind]

    def block_mask(self):
        """FlexAttention's BlockMask of this mask, 128 x 128 blocks: partly visible blocks (the
        mask_mod runs there), wholly visible ones (no mask_mod) and, implicitly, skipped ones.
        Derived per block from the mask's structure -- create_block_mask would evaluate the
        mask_mod on all S^2 pairs, more memory than the GPU has at 64K."""
        if self._block_mask is None:
            from torch.nn.attention.flex_attention import BlockMask
            block = FLEX_BLOCK
            starts = torch.arange(0, self.seqlen, block, device=DEVICE)
            ends = (starts + block).clamp_max(self.seqlen) - 1
            q_first, q_last = starts[:, None], ends[:, None]
            k_first, k_last = starts[None, :], ends[None, :]
            visible = k_first <= q_last
            complete = ends - starts + 1 == block  # flex masks a ragged block's padding
            whole = (k_last <= q_first) & complete[:, None] & complete[None, :]
            if self.window:
                visible &= q_first - k_last < self.window
                whole &= q_last - k_first < self.window
            if self.doc_ids is not None:
                docs = self.doc_ids
                visible &= (docs[k_last] >= docs[q_first]) & (docs[k_first] <= docs[q_last])
                whole &= ((docs[q_first] == docs[q_last]) & (docs[k_first] == docs[k_last])
                          & (docs[q_first] == docs[k_first]))
            partial = visible & ~whole

            def listed(blocks):
                order = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True)
                return (blocks.sum(-1).to(torch.int32)[None, None],
                        order.to(torch.int32)[None, None].contiguous())

            self._block_mask = BlockMask.from_kv_blocks(
                *listed(partial), *listed(whole), BLOCK_SIZE=block, mask_mod=self.mask_mod(),
                seq_lengths=(self.seqlen, self.seqlen))
        return self._block_mask

    def dense(self, device) -> torch.Tensor:
        pos = torch.arange(self.seqlen, device=device)
        allowed = pos[None, :] <= pos[:, None]
        if self.window:
            allowed &= pos[:, None] - pos[None, :] < self.window
        if self.doc_ids is not None:
            allowed &= self.doc_ids[:, None] == self.doc_ids[None, :]
        return allowed

    def describe(self) -> dict:
        info = {"mask": self.kind}
        if self.window:
            info["window"] = self.window
        if self.lengths:
            ordered = sorted(self.lengths)
            info["documents"] = {"count": len(ordered), "max": ordered[-1],
                                 "median": ordered[len(ordered) // 2],
                                 "mean": round(sum(ordered) / len(ordered), 1)}
        return info


# --- the kernels ---------------------------------------------------------------------------------

_FLEX = {}


def flex_function():
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


@contextlib.contextmanager
def forced_variants(forward: Optional[str], backward: Optional[str]):
    """graphopt's Triton launches run these variants inside the block (None: the default)."""
    from graphopt.kernels import flash_attention_bwd, flash_attention_fwd
    saved = flash_attention_fwd.FORWARD_VARIANT, flash_attention_bwd.BACKWARD_VARIANT
    flash_attention_fwd.FORWARD_VARIANT, flash_attention_bwd.BACKWARD_VARIANT = forward, backward
    try:
        yield
    finally:
        flash_attention_fwd.FORWARD_VARIANT, flash_attention_bwd.BACKWARD_VARIANT = saved


def sdpa_backend_names():
    from torch.nn.attention import SDPBackend
    return {"sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_flash": SDPBackend.FLASH_ATTENTION}


def column_function(column: str, mask: Mask, heads_kv: int) -> Callable:
    """f(q, k, v) -> out for one column (autograd flows through every one of them)."""
    from graphopt.ops.attention import flash_attention
    sdpa = torch.nn.functional.scaled_dot_product_attention
    gqa = heads_kv != HEADS
    if column in ("triton", "triton_v1", "auto"):
        kernel = "auto" if column == "auto" else "triton"
        variants = ("pointer", "two_pass") if column == "triton_v1" else (None, None)

        def graphopt_attention(q, k, v):
            with forced_variants(*variants):
                return flash_attention(q, k, v, kernel=kernel, **mask.graphopt_kwargs())[0]
        return graphopt_attention
    if column == "flex":
        block_mask, flex = mask.block_mask(), flex_function()
        return lambda q, k, v: flex(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    if mask.kind != "causal":
        raise ValueError(f"{column} cannot skip a {mask.kind} mask")
    if column == "sdpa_default":
        return lambda q, k, v: sdpa(q, k, v, is_causal=True, enable_gqa=gqa)
    from torch.nn.attention import sdpa_kernel
    backend = sdpa_backend_names()[column]
    native = not gqa or takes_grouped_heads(backend, heads_kv)

    def forced_sdpa(q, k, v):
        if not native:  # this backend refuses grouped heads: K/V repeated (timed with it)
            k, v = (x.repeat_interleave(HEADS // heads_kv, 1) for x in (k, v))
        with sdpa_kernel(backend):
            return sdpa(q, k, v, is_causal=True, enable_gqa=gqa and native)
    forced_sdpa.grouped_heads = "enable_gqa" if native else "repeat_interleave"
    return forced_sdpa


def takes_grouped_heads(backend, heads_kv: int) -> bool:
    """Whether an SDPA backend runs enable_gqa=True itself (forward and backward)."""
    from torch.nn.attention import sdpa_kernel
    q = torch.randn(1, HEADS, 256, HEAD_DIM, device=DEVICE, dtype=DTYPE, requires_grad=True)
    k = torch.randn(1, heads_kv, 256, HEAD_DIM, device=DEVICE, dtype=DTYPE, requires_grad=True)
    try:
        with sdpa_kernel(backend):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, k, is_causal=True,
                                                                   enable_gqa=True)
        out.sum().backward()
        return True
    except RuntimeError:
        return False


def make_inputs(seqlen: int, heads_kv: int, seed: int):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)

    def randn(heads):
        return torch.randn(BATCH, heads, seqlen, HEAD_DIM, device=DEVICE, generator=gen).to(DTYPE)
    q, k, v = randn(HEADS).requires_grad_(), randn(heads_kv).requires_grad_(), \
        randn(heads_kv).requires_grad_()
    return q, k, v, randn(HEADS)


def launched_by(fn: Callable) -> str:
    """Which attention kernels one call of fn ran (graphopt.kernels.launch_counts)."""
    from graphopt.kernels import launch_counts
    before = dict(launch_counts)
    fn()
    synchronize()
    ran = sorted(name for name, count in launch_counts.items() if count > before.get(name, 0))
    return " + ".join(ran) if ran else "no graphopt kernel"


# --- timing --------------------------------------------------------------------------------------

def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def release_memory() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def time_ms(fn: Callable) -> float:
    """Median of timed calls (CUDA events on the GPU) after one warm call; as many calls as fit
    TIMING's budget, within its least and most."""
    def timed() -> float:
        if DEVICE != "cuda":
            began = time.perf_counter()
            fn()
            return (time.perf_counter() - began) * 1e3
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        return start.elapsed_time(stop)

    fits = int(TIMING["budget_ms"] / max(timed(), 1e-3))
    reps = max(TIMING["least"], min(TIMING["most"], fits))
    return statistics.median(timed() for _ in range(reps))


def forward_and_backward(f: Callable, q, k, v, dout):
    def forward():
        f(q, k, v)

    def forward_backward():
        torch.autograd.grad(f(q, k, v), (q, k, v), dout)
    return forward, forward_backward


# --- phase: compile in parallel ------------------------------------------------------------------

def _compile_triton(item):
    """Compiles one (mask, variant, config) at a small shape of the same specialisation."""
    mask_kind, kind, variant, index = item
    from graphopt.kernels import flash_attention_fwd
    from graphopt.kernels.flash_attention_bwd import flash_attention_backward
    from graphopt.kernels.flash_attention_fwd import flash_attention_forward
    flash_attention_fwd.AUTOTUNE = False
    flash_attention_fwd.UNTUNED_STEP = False   # exactly this config: a failure is the result
    mask = Mask(mask_kind, 512, DEVICE)
    q, k, v, dout = make_inputs(512, 8, seed=index)
    q, k, v = q.detach()[:, :4], k.detach()[:, :1], v.detach()[:, :1]
    q, dout = q.contiguous(), dout[:, :4].contiguous()
    masks, fwd_masks = kernel_masks(mask)
    try:
        # A backward item runs the default forward on its first config (which compiles for every
        # variant), so that a failure is the backward config's own.
        flash_attention_fwd.UNTUNED_CONFIG = index if kind == "forward" else 0
        out, lse = flash_attention_forward(q, k, v, scale=0.088, causal=True,
                                           variant=variant if kind == "forward" else None,
                                           **fwd_masks)
        if kind == "backward":
            flash_attention_fwd.UNTUNED_CONFIG = index
            flash_attention_backward(q, k, v, out, lse, dout, scale=0.088, causal=True,
                                     variant=variant, **masks)
        synchronize()
        return item, None
    except Exception as err:  # noqa: BLE001 - recorded: a variant this Triton cannot compile
        return item, f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:200] if str(err) else ''}"


def _compile_flex(item):
    """Compiles FlexAttention forward + backward for one case at its full shape."""
    mask_kind, seqlen, heads_kv = item
    import torch._dynamo
    torch._dynamo.config.cache_size_limit = 64
    try:
        mask = Mask(mask_kind, seqlen, DEVICE)
        q, k, v, dout = make_inputs(seqlen, heads_kv, seed=1)
        torch.autograd.grad(column_function("flex", mask, heads_kv)(q, k, v), (q, k, v), dout)
        synchronize()
        return item, None
    except Exception as err:  # noqa: BLE001 - recorded: the flex column then fails in the run
        return item, f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:200] if str(err) else ''}"


def _compile_item(item):
    return _compile_flex(item[1]) if item[0] == "flex" else _compile_triton(item[1])


def triton_compile_items(masks) -> list:
    """(mask, forward/backward, variant, config index) for every config the autotuners try at
    this head dim."""
    from graphopt.kernels import flash_attention_bwd, flash_attention_fwd

    def configs(tuner) -> int:
        return len(tuner.early_config_prune(tuner.configs, {}, HEAD_DIM_PAD=HEAD_DIM))
    count = {"forward": configs(flash_attention_fwd._flash_fwd_tuned["half"]),
             "two_pass": max(configs(flash_attention_bwd._dkdv_tuned["half"]),
                             configs(flash_attention_bwd._dq_tuned["half"])),
             "fused": configs(flash_attention_bwd._fused_tuned["half"])}
    items = [(m, "forward", variant, i) for m in masks for variant in FORWARD_VARIANTS
             for i in range(count["forward"])]
    items += [(m, "backward", variant, i) for m in masks for variant in BACKWARD_VARIANTS
              for i in range(count["two_pass" if variant == "two_pass" else "fused"])]
    return items


def precompile(masks, seqlens, heads_kv, jobs: int, with_flex: bool) -> dict:
    """Compiles in ``jobs`` processes; returns {what: error} for what failed."""
    started = time.time()
    items = [("triton", item) for item in triton_compile_items(masks)]
    if with_flex:
        # Longest sequences first, so the slowest compiles do not start last.
        items = [("flex", (m, s, h)) for s in sorted(seqlens, reverse=True) for m in masks
                 for h in heads_kv] + items
    failures = {}
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        for item, error in pool.imap_unordered(_compile_item, items):
            if error:
                failures[str(item)] = error
    print(f"compiled {len(items)} items in {jobs} processes in {time.time() - started:.0f} s; "
          f"{len(failures)} failed", flush=True)
    return failures


# --- phase: correctness against float32 ----------------------------------------------------------

def reference_group(q, k, v, dout, mask: Mask, group: int):
    """float32 attention of key/value head 0 and its query heads: (out, dq, dk, dv)."""
    qg = q.detach()[:, :group].float().requires_grad_()
    k0 = k.detach()[:, :1].float().requires_grad_()
    v0 = v.detach()[:, :1].float().requires_grad_()
    scores = (qg @ k0.transpose(-1, -2)) / math.sqrt(HEAD_DIM)
    scores = scores.masked_fill(~mask.dense(q.device), float("-inf"))
    out = torch.softmax(scores, -1) @ v0
    grads = torch.autograd.grad(out, (qg, k0, v0), dout[:, :group].float())
    return (out.detach(),) + grads


GRADIENT_SLICES = {"out": "query", "dq": "query", "dk": "kv", "dv": "kv"}


def relative_errors(result: dict, reference: dict, group: int) -> dict:
    """max |x - ref| / max |ref| of each tensor of ``result`` on key/value head 0's group."""
    errors = {}
    for name, value in result.items():
        value = value[:, :group] if GRADIENT_SLICES[name] == "query" else value[:, :1]
        ref = reference[name]
        errors[name] = ((value.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
    return errors


def check_case(mask_kind: str, heads_kv: int, columns, on_row: Callable[[dict], None]) -> None:
    """Checks every column and Triton variant; ``on_row`` gets each result as it is known (a
    kernel that brings the process down leaves the ones before it on disk)."""
    mask = Mask(mask_kind, CORRECTNESS_SEQLEN, DEVICE)
    q, k, v, dout = make_inputs(CORRECTNESS_SEQLEN, heads_kv, seed=1000 + heads_kv)
    group = HEADS // heads_kv
    reference = dict(zip(("out", "dq", "dk", "dv"), reference_group(q, k, v, dout, mask, group)))

    def record(name, produce):
        row = dict(mask=mask_kind, heads_kv=heads_kv, seqlen=CORRECTNESS_SEQLEN, kernel=name)
        try:
            errors = relative_errors(produce(), reference, group)
            row.update(errors)
            row["ok"] = all(errors[key] <= ERROR_LIMITS[key] for key in errors)
        except Exception as err:  # noqa: BLE001 - a kernel that fails is a result of the run
            row.update(ok=False, error=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
        on_row(row)

    for column in columns:
        if column.startswith("sdpa") and mask_kind != "causal":
            continue
        f = column_function(column, mask, heads_kv)

        def through_autograd(f=f):
            out = f(q, k, v)
            return dict(zip(("out", "dq", "dk", "dv"),
                            (out,) + torch.autograd.grad(out, (q, k, v), dout)))
        record(column, through_autograd)
    # Every Triton variant, called as kernels: forward variants' outputs, and backward variants'
    # gradients from the default forward's out and lse.
    from graphopt.kernels.flash_attention_bwd import flash_attention_backward
    from graphopt.kernels.flash_attention_fwd import flash_attention_forward
    masks, fwd_masks = kernel_masks(mask)
    scale = 1 / math.sqrt(HEAD_DIM)
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    for variant in FORWARD_VARIANTS:
        record(f"forward:{variant}", lambda variant=variant: {"out": flash_attention_forward(
            qd, kd, vd, scale=scale, causal=True, variant=variant, **fwd_masks)[0]})
    def backward(variant):
        # From the out and lse of the kernel before issue 32 (so every variant gets the same).
        out, lse = flash_attention_forward(qd, kd, vd, scale=scale, causal=True,
                                           variant="pointer", **fwd_masks)
        return dict(zip(("dq", "dk", "dv"), flash_attention_backward(
            qd, kd, vd, out, lse, dout, scale=scale, causal=True, variant=variant, **masks)))
    for variant in BACKWARD_VARIANTS:
        record(f"backward:{variant}", lambda variant=variant: backward(variant))


def kernel_masks(mask: Mask) -> tuple[dict, dict]:
    """The mask as the backward kernels take it (window, row_start, col_stop), and as the
    forward kernels take it (no col_stop)."""
    masks = dict(window=mask.window)
    if mask.positions is not None:
        from graphopt.ops.attention import document_bounds
        row_start, col_stop = document_bounds(mask.positions)
        masks.update(row_start=row_start, col_stop=col_stop)
    return masks, {key: value for key, value in masks.items() if key != "col_stop"}


# --- phase: variants side by side ---------------------------------------------------------------

def variant_case(mask_kind: str, heads_kv: int, seqlen: int) -> dict:
    from graphopt.kernels.attention_tiles import visible_pairs
    from graphopt.kernels.flash_attention_bwd import flash_attention_backward, flash_attention_delta
    from graphopt.kernels.flash_attention_fwd import flash_attention_forward
    mask = Mask(mask_kind, seqlen, DEVICE)
    q, k, v, dout = (x.detach() for x in make_inputs(seqlen, heads_kv, seed=7))
    masks, fwd_masks = kernel_masks(mask)
    scale = 1 / math.sqrt(HEAD_DIM)
    flops = 4 * BATCH * HEADS * HEAD_DIM * visible_pairs(
        seqlen, seqlen, causal=True, window=mask.window, row_start=masks.get("row_start"))
    row = dict(heads_kv=heads_kv, seqlen=seqlen, **mask.describe())
    out, lse = flash_attention_forward(q, k, v, scale=scale, causal=True, variant="pointer",
                                       **fwd_masks)
    delta = flash_attention_delta(out, dout)
    for variant in FORWARD_VARIANTS:
        try:
            ms = time_ms(lambda: flash_attention_forward(q, k, v, scale=scale, causal=True,
                                                         variant=variant, **fwd_masks))
            row[f"fwd_{variant}_ms"] = ms
            row[f"fwd_{variant}_tflops"] = flops / ms * 1e-9
        except Exception as err:  # noqa: BLE001 - a variant that fails is a result
            row[f"fwd_{variant}"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
    for variant in BACKWARD_VARIANTS:
        try:
            ms = time_ms(lambda: flash_attention_backward(
                q, k, v, out, lse, dout, scale=scale, causal=True, delta=delta, variant=variant,
                **masks))
            row[f"bwd_{variant}_ms"] = ms
            row[f"bwd_{variant}_tflops"] = 2.5 * flops / ms * 1e-9
        except Exception as err:  # noqa: BLE001
            row[f"bwd_{variant}"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
    for phase, old, variants in (("fwd", "pointer", FORWARD_VARIANTS),
                                 ("bwd", "two_pass", BACKWARD_VARIANTS)):
        times = {v: row[f"{phase}_{v}_ms"] for v in variants if f"{phase}_{v}_ms" in row}
        if old in times and len(times) > 1:
            best = min((v for v in times if v != old), key=times.get)
            row[f"{phase}_best_new"] = best
            row[f"{phase}_best_new_vs_{old}"] = times[old] / times[best]
    return row


# --- phase: the matrix ---------------------------------------------------------------------------

def forward_blocks() -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the forward's last launch: the tuned config on the GPU."""
    from graphopt.kernels import flash_attention_fwd
    config = getattr(flash_attention_fwd._flash_fwd_tuned["half"], "best_config", None)
    if DEVICE != "cuda" or config is None:
        return flash_attention_fwd.INTERPRET_BLOCK_M, flash_attention_fwd.INTERPRET_BLOCK_N
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]


def matrix_case(mask_kind: str, heads_kv: int, seqlen: int, columns, sdpa_default: str) -> dict:
    from graphopt.kernels.attention_tiles import count_tiles
    mask = Mask(mask_kind, seqlen, DEVICE)
    q, k, v, dout = make_inputs(seqlen, heads_kv, seed=seqlen + heads_kv)
    row_start = mask.row_start()
    pairs_flops = None
    row = dict(heads_kv=heads_kv, seqlen=seqlen, heads_q=HEADS,
               head_dim=HEAD_DIM, batch=BATCH, dtype=str(DTYPE).replace("torch.", ""),
               **mask.describe())
    for column in columns:
        if column.startswith("sdpa") and mask_kind != "causal":
            continue
        if column == "sdpa_cudnn" and sdpa_default == "cudnn":
            continue  # the sdpa_default column ran cuDNN
        try:
            function = column_function(column, mask, heads_kv)
            forward, forward_backward = forward_and_backward(function, q, k, v, dout)
            if column in ("triton", "triton_v1", "auto"):
                row[f"{column}_ran"] = launched_by(forward_backward)
            if hasattr(function, "grouped_heads") and heads_kv != HEADS:
                row[f"{column}_grouped_heads"] = function.grouped_heads
            row[f"{column}_fwd_ms"] = time_ms(forward)
            if column == "triton":
                block_m, block_n = forward_blocks()
                tiles = count_tiles(seqlen, seqlen, block_m=block_m, block_n=block_n,
                                    causal=True, window=mask.window, row_start=row_start)
                row.update(tiles_computed=tiles.computed_fraction,
                           tiles_efficiency=tiles.efficiency, tile_blocks=[block_m, block_n])
                pairs_flops = 4 * BATCH * HEADS * HEAD_DIM * tiles.visible_pairs
            row[f"{column}_fwd_bwd_ms"] = time_ms(forward_backward)
        except Exception as err:  # noqa: BLE001 - a column that fails is a result of the run
            row[f"{column}_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        release_memory()
    if pairs_flops is None:
        from graphopt.kernels.attention_tiles import visible_pairs
        pairs_flops = 4 * BATCH * HEADS * HEAD_DIM * visible_pairs(
            seqlen, seqlen, causal=True, window=mask.window, row_start=row_start)
    row["fwd_flops"] = pairs_flops
    if sdpa_default == "cudnn" and "sdpa_default_fwd_ms" in row:
        for phase in ("fwd", "fwd_bwd"):
            row[f"sdpa_cudnn_{phase}_ms"] = row[f"sdpa_default_{phase}_ms"]
        row["sdpa_cudnn_ran"] = "sdpa_default (SDPA's default backend here is cuDNN)"
    for column in columns:
        for phase, work in (("fwd", pairs_flops), ("fwd_bwd", 3.5 * pairs_flops)):
            if f"{column}_{phase}_ms" in row:
                row[f"{column}_{phase}_tflops"] = work / row[f"{column}_{phase}_ms"] * 1e-9
    return row


# --- summary and report --------------------------------------------------------------------------

def ratio(row: dict, baseline: str, ours: str, phase: str) -> Optional[float]:
    """baseline time / ours (> 1: ours faster), or None where either is missing."""
    a, b = row.get(f"{baseline}_{phase}_ms"), row.get(f"{ours}_{phase}_ms")
    return a / b if a and b else None


def summarize(result: dict) -> dict:
    cases = result.get("cases", [])

    def extreme(mask, baseline, ours, phase, pick=min):
        values = [ratio(r, baseline, ours, phase) for r in cases if r["mask"] == mask]
        values = [v for v in values if v is not None]
        return pick(values) if values else None

    summary = {
        "triton_fwd_bwd_vs_cudnn_causal_min": extreme("causal", "sdpa_cudnn", "triton", "fwd_bwd"),
        "triton_fwd_vs_cudnn_causal_min": extreme("causal", "sdpa_cudnn", "triton", "fwd"),
        "docs_fwd_bwd_vs_flex_min": extreme("docs", "flex", "triton", "fwd_bwd"),
        "docs_fwd_vs_flex_min": extreme("docs", "flex", "triton", "fwd"),
        "window_fwd_bwd_vs_flex_min": extreme("window", "flex", "triton", "fwd_bwd"),
        "window_fwd_vs_flex_min": extreme("window", "flex", "triton", "fwd"),
        "auto_fwd_bwd_vs_sdpa_default_causal_min": extreme("causal", "sdpa_default", "auto",
                                                           "fwd_bwd"),
        "triton_fwd_bwd_vs_v1_min": min(
            (v for v in (ratio(r, "triton_v1", "triton", "fwd_bwd") for r in cases)
             if v is not None), default=None),
        "over": "ratio = baseline time / graphopt time (> 1: graphopt faster); min over S and "
                "Hkv of the mask's cases",
        "targets": TARGETS,
    }
    for key, target in TARGETS.items():
        summary[f"{key}_meets_target"] = (summary[key] >= target if summary[key] is not None
                                          else None)
    checks = result.get("correctness", [])
    summary["correctness_all_ok"] = all(r.get("ok") for r in checks) if checks else None
    return summary


def _cell(value, digits=2):
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(result: dict) -> str:
    env = result["environment"]
    s = result["summary"]
    lines = [
        "# Attention kernels: graphopt Triton vs cuDNN, FlexAttention, SDPA flash",
        "",
        f"Device: {env.get('device')}; torch {env.get('torch')}; triton {env.get('triton')}; "
        f"cuDNN {env.get('cudnn')}; SDPA's default backend here: {env.get('sdpa_default')}. "
        f"B = {BATCH}, Hq = {HEADS}, D = {HEAD_DIM}, bf16; medians of CUDA-event timed calls. "
        "Generated by bench/attention.py (its docstring names what every column runs).",
        "",
        "## Summary",
        "",
        "| key | value | target |",
        "| --- | --- | --- |",
    ]
    for key in ("triton_fwd_bwd_vs_cudnn_causal_min", "triton_fwd_vs_cudnn_causal_min",
                "docs_fwd_bwd_vs_flex_min", "docs_fwd_vs_flex_min", "window_fwd_bwd_vs_flex_min",
                "window_fwd_vs_flex_min", "auto_fwd_bwd_vs_sdpa_default_causal_min",
                "triton_fwd_bwd_vs_v1_min", "correctness_all_ok"):
        lines.append(f"| {key} | {_cell(s.get(key))} | {_cell(TARGETS.get(key))} |")
    lines += ["", f"Ratios: {s.get('over')}.", ""]
    checks = result.get("correctness", [])
    if checks:
        lines += [f"## Correctness (S = {CORRECTNESS_SEQLEN}, fresh inputs, one key/value head "
                  "group vs float32; max |err| / max |ref|)", "", "| mask | Hkv | kernel | out | dq | dk | dv | ok |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in checks:
            lines.append(f"| {r['mask']} | {r['heads_kv']} | {r['kernel']} | "
                         + " | ".join(_cell(r.get(x), 4) if isinstance(r.get(x), float) else "-"
                                      for x in ("out", "dq", "dk", "dv"))
                         + f" | {r.get('ok')} {r.get('error', '')} |")
        lines.append("")
    variants = result.get("variants", [])
    if variants:
        lines += [f"## Triton variants side by side (kernel calls, ms; S = {VARIANTS_SEQLEN})", "",
                  "| mask | Hkv | " + " | ".join(f"fwd {v}" for v in FORWARD_VARIANTS) + " | "
                  + " | ".join(f"bwd {v}" for v in BACKWARD_VARIANTS)
                  + " | fwd new/old | bwd new/old |",
                  "| " + " | ".join(["---"] * (4 + len(FORWARD_VARIANTS)
                                               + len(BACKWARD_VARIANTS))) + " |"]
        for r in variants:
            cells = [_cell(r.get(f"fwd_{v}_ms"), 3) if f"fwd_{v}_ms" in r else "failed"
                     for v in FORWARD_VARIANTS]
            cells += [_cell(r.get(f"bwd_{v}_ms"), 3) if f"bwd_{v}_ms" in r else "failed"
                      for v in BACKWARD_VARIANTS]
            lines.append(f"| {r['mask']} | {r['heads_kv']} | " + " | ".join(cells)
                         + f" | {_cell(r.get('fwd_best_new_vs_pointer'))} "
                           f"({r.get('fwd_best_new', '-')}) | "
                           f"{_cell(r.get('bwd_best_new_vs_two_pass'))} "
                           f"({r.get('bwd_best_new', '-')}) |")
        lines.append("")
    cases = result.get("cases", [])
    if cases:
        columns = result["columns"]
        lines += ["## Matrix (fwd+bwd ms, TFLOP/s on the mask's FLOPs in brackets; then ratios)",
                  "", "| mask | S | Hkv | " + " | ".join(columns)
                  + " | triton vs cuDNN | triton vs flex | triton vs v1 | tiles computed |",
                  "| " + " | ".join(["---"] * (7 + len(columns))) + " |"]
        for r in cases:
            cells = []
            for column in columns:
                ms = r.get(f"{column}_fwd_bwd_ms")
                cells.append(f"{ms:.2f} ({r[f'{column}_fwd_bwd_tflops']:.0f})" if ms else "-")
            lines.append(
                f"| {r['mask']} | {r['seqlen']} | {r['heads_kv']} | " + " | ".join(cells)
                + f" | {_cell(ratio(r, 'sdpa_cudnn', 'triton', 'fwd_bwd'))}"
                f" | {_cell(ratio(r, 'flex', 'triton', 'fwd_bwd'))}"
                f" | {_cell(ratio(r, 'triton_v1', 'triton', 'fwd_bwd'))}"
                f" | {_cell(r.get('tiles_computed'), 3)} |")
        lines += ["", "Forward only (ms):", "", "| mask | S | Hkv | " + " | ".join(columns)
                  + " |", "| " + " | ".join(["---"] * (3 + len(columns))) + " |"]
        for r in cases:
            lines.append(f"| {r['mask']} | {r['seqlen']} | {r['heads_kv']} | " + " | ".join(
                _cell(r.get(f"{column}_fwd_ms"), 3) for column in columns) + " |")
        ran = sorted({(c, r[f"{c}_ran"]) for r in cases for c in columns if f"{c}_ran" in r})
        if ran:
            lines += ["", "Kernels the graphopt columns ran: "
                      + "; ".join(f"{c}: {what}" for c, what in ran) + "."]
        lines.append("")
    if result.get("compile_failures") or result.get("variant_failures"):
        lines += ["## Compile failures", ""]
        if result.get("compile_failures_note"):
            lines += [result["compile_failures_note"], ""]
        lines += [f"- {what}: {why}" for what, why in {**result.get("compile_failures", {}),
                                                      **result.get("variant_failures", {})}.items()]
        lines.append("")
    if result.get("skipped"):
        lines += ["Skipped for the time budget: " + ", ".join(result["skipped"]), ""]
    return "\n".join(lines)


def environment() -> dict:
    import triton
    on_gpu = DEVICE == "cuda"
    return {"device": torch.cuda.get_device_name() if on_gpu else "cpu (Triton interpreter)",
            "capability": ".".join(map(str, torch.cuda.get_device_capability())) if on_gpu else None,
            "torch": torch.__version__, "triton": triton.__version__,
            "cudnn": torch.backends.cudnn.version() if on_gpu else None,
            "python": platform.python_version()}


def sdpa_default_backend(heads_kv: int) -> str:
    q = torch.empty(BATCH, HEADS, 1024, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    k = torch.empty(BATCH, heads_kv, 1024, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    choice = torch._fused_sdp_choice(q, k, k, is_causal=True, enable_gqa=heads_kv != HEADS)
    names = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}
    return names.get(int(choice), str(choice))


def tuned_configs() -> dict:
    from graphopt.kernels import flash_attention_bwd, flash_attention_fwd
    tuners = {"fwd": flash_attention_fwd._flash_fwd_tuned["half"],
              "bwd_fused": flash_attention_bwd._fused_tuned["half"],
              "bwd_dkdv": flash_attention_bwd._dkdv_tuned["half"],
              "bwd_dq": flash_attention_bwd._dq_tuned["half"]}
    return {name: {str(key): str(config) for key, config in tuner.cache.items()}
            for name, tuner in tuners.items()}


def write(out_dir: pathlib.Path, result: dict, started: float) -> None:
    from graphopt.kernels import flash_attention_fwd
    result["environment"]["seconds"] = round(time.time() - started, 1)
    result["variant_failures"] = {str(k): v for k, v in flash_attention_fwd.VARIANT_FAILURES.items()}
    result["tuned_configs"] = tuned_configs()
    result["summary"] = summarize(result)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "attention.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "attention.md").write_text(markdown(result))


def start_gpu_tests(out_dir: pathlib.Path) -> subprocess.Popen:
    out_dir.mkdir(parents=True, exist_ok=True)
    log = open(out_dir / "gpu_tests.log", "w")
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-v", "--tb=short", "-p", "no:cacheprovider", *GPU_TESTS],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)))


def finish_gpu_tests(tests: subprocess.Popen, out_dir: pathlib.Path, deadline: float) -> str:
    """Waits for the GPU tests until ``deadline``, then stops them; their closing line."""
    try:
        tests.wait(timeout=max(deadline - time.time(), 0.0))
        stopped = ""
    except subprocess.TimeoutExpired:
        tests.kill()
        tests.wait()
        stopped = " (stopped at the deadline)"
    lines = (out_dir / "gpu_tests.log").read_text().strip().splitlines()
    return (lines[-1] if lines else "no output") + stopped


def configure_smoke() -> None:
    """Sizes for a CPU run under the Triton interpreter (tests/kernels/test_attention_bench.py)."""
    global DEVICE, DTYPE, HEADS, HEAD_DIM, WINDOW, SEQLENS, HEADS_KV, CORRECTNESS_SEQLEN
    global VARIANTS_SEQLEN, DOC_MIN_LEN
    DEVICE, DTYPE, HEADS, HEAD_DIM, WINDOW = "cpu", torch.float16, 4, 16, 24
    SEQLENS, HEADS_KV, CORRECTNESS_SEQLEN, VARIANTS_SEQLEN, DOC_MIN_LEN = (80,), (4, 2), 80, 48, 6
    TIMING.update(least=1, most=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench/results"))
    parser.add_argument("--masks", default=",".join(MASKS))
    parser.add_argument("--seqlens", help=f"default {','.join(map(str, SEQLENS))}")
    parser.add_argument("--hkv", help=f"default {','.join(map(str, HEADS_KV))}")
    parser.add_argument("--columns", default="triton,triton_v1,auto,sdpa_default,sdpa_cudnn,"
                        "sdpa_flash,flex")
    parser.add_argument("--phases", default="correctness,variants,matrix")
    parser.add_argument("--jobs", type=int, default=0,
                        help="compile everything first in this many processes (0: no)")
    parser.add_argument("--budget-s", type=float, default=0.0,
                        help="start no new case past this many seconds (0: no limit)")
    parser.add_argument("--gpu-tests", type=float, default=0.0, metavar="SECONDS",
                        help="run the attention GPU tests beside the compile phase, stopping them "
                             "after this many seconds at the latest; timing waits for them")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes on the CPU under TRITON_INTERPRET=1: checks the control "
                             "flow (its times mean nothing)")
    args = parser.parse_args(argv)
    if args.smoke:
        configure_smoke()
    elif not torch.cuda.is_available():
        sys.exit("bench/attention.py needs a CUDA GPU (or --smoke under TRITON_INTERPRET=1)")
    import torch._dynamo as dynamo
    dynamo.config.cache_size_limit = 64  # one flex compile per (mask, S, Hkv)
    started = time.time()
    masks = [m for m in args.masks.split(",") if m]
    seqlens = [int(s) for s in args.seqlens.split(",")] if args.seqlens else list(SEQLENS)
    heads_kv = [int(h) for h in args.hkv.split(",")] if args.hkv else list(HEADS_KV)
    columns = [c for c in args.columns.split(",") if c]
    phases = set(args.phases.split(","))
    defaults = {h: sdpa_default_backend(h) for h in heads_kv}
    result = {"environment": dict(environment(), sdpa_default=" / ".join(
                  f"Hkv {h}: {name}" for h, name in defaults.items())),
              "columns": columns, "correctness": [], "variants": [], "cases": [], "skipped": []}
    tests = start_gpu_tests(args.out) if args.gpu_tests else None
    if args.jobs:
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # per pool process
        result["compile_failures"] = precompile(masks, seqlens, heads_kv, args.jobs,
                                                with_flex="flex" in columns and "matrix" in phases)
        write(args.out, result, started)

    def in_budget(what: str) -> bool:
        if args.budget_s and time.time() - started > args.budget_s:
            result["skipped"].append(what)
            return False
        return True

    if "correctness" in phases:
        for mask in masks:
            for h in heads_kv:
                if in_budget(f"correctness {mask} Hkv {h}"):
                    def on_row(row):
                        result["correctness"].append(row)
                        write(args.out, result, started)
                    try:
                        check_case(mask, h, columns, on_row)
                    except Exception as err:  # noqa: BLE001 - recorded; the run goes on
                        on_row(dict(mask=mask, heads_kv=h, kernel="(setup)", ok=False,
                                    error=f"{type(err).__name__}: {str(err).splitlines()[0]}"))
                    bad = [r["kernel"] for r in result["correctness"]
                           if r["mask"] == mask and r["heads_kv"] == h and not r.get("ok")]
                    print(f"correctness {mask} Hkv={h}: {'ok' if not bad else 'FAILED ' + str(bad)}",
                          flush=True)
                    release_memory()
    if tests is not None:
        result["gpu_tests"] = finish_gpu_tests(tests, args.out, started + args.gpu_tests)
        print(f"GPU tests: {result['gpu_tests']}", flush=True)
        write(args.out, result, started)
    if "variants" in phases:
        for mask in masks:
            for h in heads_kv:
                if in_budget(f"variants {mask} Hkv {h}"):
                    try:
                        row = variant_case(mask, h, VARIANTS_SEQLEN)
                    except Exception as err:  # noqa: BLE001 - recorded; the run goes on
                        row = dict(mask=mask, heads_kv=h, seqlen=VARIANTS_SEQLEN,
                                   error=f"{type(err).__name__}: {str(err).splitlines()[0]}")
                    result["variants"].append(row)
                    print(f"variants {mask} Hkv={h}: fwd {row.get('fwd_best_new')} "
                          f"{_cell(row.get('fwd_best_new_vs_pointer'))}x, bwd "
                          f"{row.get('bwd_best_new')} {_cell(row.get('bwd_best_new_vs_two_pass'))}x",
                          flush=True)
                    write(args.out, result, started)
                    release_memory()
    if "matrix" in phases:
        for seqlen in seqlens:
            for mask in masks:
                for h in heads_kv:
                    if not in_budget(f"{mask} S={seqlen} Hkv={h}"):
                        continue
                    try:
                        row = matrix_case(mask, h, seqlen, columns, defaults[h])
                    except Exception as err:  # noqa: BLE001 - recorded; the run goes on
                        row = dict(mask=mask, heads_kv=h, seqlen=seqlen,
                                   error=f"{type(err).__name__}: {str(err).splitlines()[0]}")
                    result["cases"].append(row)
                    print(f"{mask} S={seqlen} Hkv={h}: "
                          + ", ".join(f"{c} {row[f'{c}_fwd_bwd_ms']:.2f}" for c in columns
                                      if f"{c}_fwd_bwd_ms" in row) + " ms fwd+bwd", flush=True)
                    write(args.out, result, started)
                    release_memory()
    write(args.out, result, started)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
