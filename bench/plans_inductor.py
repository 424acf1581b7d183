"""Remat and offload plans under the default codegen (Inductor), at equal measured peak.

Two models at Llama-3-8B layer dimensions (dim 4096, 32 query / 8 key-value heads, ffn 14336,
vocab 128256), bf16, batch 1, a few layers, one training step (forward + loss + backward):

  ref  graphopt's reference Llama (graphopt.models.llama)
  hf   transformers' LlamaForCausalLM (attn_implementation="sdpa", use_cache=False): its decoder
       (model.model) and final norm. Causal attention: with --hf-mask stand-in (default) HF's mask
       builder returns None, so SDPA runs is_causal=True, a stand-in for the mask pass of issue 21
       ("attention on the models people train"); --hf-mask model keeps HF's own mask, so the lead
       can rerun the rows through that pass once it lands.

Both compute the loss with ``chunked_output_loss`` (output projection + cross entropy per chunk of
--loss-chunk-tokens tokens, the gradient formed in forward), so no [S, vocab] fp32 logits exist and
the comparison is between the partitions. Rows (--rows, per model and sequence length):

  inductor      torch.compile(backend="inductor"): torch's min-cut (= activation_memory_budget 1.0)
  torch:F       activation_memory_budget=F (torch's min-cut + knapsack), Inductor
  full_ac       torch.utils.checkpoint around every decoder layer, Inductor
  save_on_cpu   inductor under torch.autograd.graph.save_on_cpu(pin_memory=True)
  graphopt      graphopt, no flags (torch's min-cut inside graphopt's backend)
  graphopt:B    graphopt memory_budget=B (a fraction, or bytes such as 20GiB)
  offload       graphopt offload_activations=True, no budget
  offload:B     graphopt offload_activations=True and memory_budget=B
  ROW+expandable  ROW with the caching allocator's expandable segments (what reserved memory is
                without fragmentation; a diagnostic for the static arena of issue 23, item 6)

Every row records the step, forward and backward times (CUDA events, median), the allocator's
allocated and reserved peaks (torch.cuda.max_memory_allocated / max_memory_reserved over a step
after the cache was emptied), the least memory cap the step runs under (``fit_under_cap``), the
device time of one more step's kernels by kind (``graphopt.debug.kernel_profile``; the notes put
each offload row beside the same plan without offload), and for graphopt rows what the plan said: planned peak, modelled
forward / backward (as Inductor runs the kernels), offloaded bytes, refusals, and from one more step
under the allocator's record what holds the measured peak (``graphopt.debug.peak_holders``: the
live blocks by allocating line; a note where the peak misses the plan). The summary holds the
issue's keys (see ``summarize``). Results are written after every row (JSON + Markdown under
--out), so a run cut short keeps what it measured; --resume merges earlier JSON files and skips
their rows.

    # GPU, one call (rows in priority order; none starts that would end past --time-limit, 420 s):
    python3 bench/plans_inductor.py --out $OUT
    # the rows the first call did not reach, merged with its results:
    python3 bench/plans_inductor.py --out $OUT --resume bench/results/plans_inductor.json
    # rows measured before a change, measured again (any part may be '*'):
    python3 bench/plans_inductor.py --out $OUT --resume bench/results/plans_inductor.json --redo 'hf/*/offload'
    # < 60 s: modelled vs measured compiled forward of one graph (the fused time model)
    python3 bench/plans_inductor.py --out $OUT --validate --models hf --seqs 8192 --layers 1
    # CPU: tiny models, every row kind, a few minutes
    python3 bench/plans_inductor.py --out /tmp/plans --smoke
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import pathlib
import signal
import statistics
import sys
import time
import traceback

import torch
import torch.utils.checkpoint as checkpoint

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import graphopt  # noqa: E402
from graphopt import _compat  # noqa: E402
from graphopt.debug import kernel_profile, peak_holders  # noqa: E402
from graphopt.debug.dump import clear_compile_summaries, compile_summaries  # noqa: E402
from graphopt.models.llama import Llama, LlamaConfig, chunked_output_loss, rope_tables  # noqa: E402
from graphopt.ops import offload as offload_ops  # noqa: E402
from remat import frontier, interpolate  # noqa: E402

TARGETS = {"offloaded_fraction_64k": (">=", 0.5), "offload_overhead_64k": ("<=", 0.03),
           "offload_overhead_max": ("<=", 0.03), "peak_over_planned_max": ("<=", 1.05),
           "step_vs_torch_budget_max_hf": ("<=", 0.95), "step_vs_torch_budget_max_ref": ("<=", 0.95),
           "reserved_over_allocated_max": ("<=", 1.05), "model_forward_vs_measured_max_error": ("<=", 0.10)}

# (model, sequence length, rows): the default run, most needed first -- offload against Inductor
# at every S on both models (offload_overhead_max, offloaded_fraction_64k), then the comparisons at
# equal peak -- so a run cut short at --time-limit still has the first keys.
PRIORITY = [
    ("hf", 16384, "inductor,offload"),
    ("hf", 65536, "inductor,offload"),
    ("hf", 8192, "inductor,offload"),
    ("ref", 65536, "inductor,offload"),
    ("ref", 16384, "inductor,offload"),
    ("ref", 8192, "inductor,offload"),
    ("hf", 16384, "graphopt:1.0,graphopt:0.5,torch:0.5,torch:0.0,offload:0.5"),
    ("ref", 16384, "graphopt:1.0,graphopt:0.5,torch:0.5,torch:0.0,offload:0.5"),
    ("hf", 16384, "full_ac,save_on_cpu"),
    ("ref", 16384, "full_ac,save_on_cpu"),
    ("hf", 65536, "graphopt:0.5,torch:0.5,torch:0.0,offload:0.5,full_ac"),
    ("ref", 65536, "graphopt:0.5,torch:0.5,torch:0.0,offload:0.5,full_ac"),
    ("hf", 8192, "graphopt:1.0,graphopt:0.5,torch:0.5,torch:0.0,offload:0.5,full_ac,save_on_cpu"),
    ("ref", 8192, "graphopt:1.0,graphopt:0.5,torch:0.5,torch:0.0,offload:0.5,full_ac,save_on_cpu"),
    ("hf", 65536, "save_on_cpu"),
    ("ref", 65536, "save_on_cpu"),
    ("hf", 65536, "offload" + "+expandable"),
    ("ref", 65536, "offload" + "+expandable"),
]


# --- the models ---------------------------------------------------------------------------------------

SIZES_8B = dict(dim=4096, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=128256, rope_theta=500000.0)
SIZES_TINY = dict(dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=256, rope_theta=10000.0)


def use_hf_mask(mode: str) -> None:
    """``stand-in``: transformers' causal-mask builder returns None for the rest of the process,
    so SDPA runs is_causal=True (what issue 21's mask pass proves and rewrites); ``model``: HF's
    own mask. Set before tracing: Dynamo traces the builder the model calls."""
    from transformers.models.llama import modeling_llama
    original = getattr(modeling_llama, "_graphopt_bench_mask_builder", modeling_llama.create_causal_mask)
    modeling_llama._graphopt_bench_mask_builder = original
    modeling_llama.create_causal_mask = original if mode == "model" else _no_mask


def _no_mask(*args, **kwargs):
    return None


class Model:
    """One model at one set of sizes: the module, its loss, its full-AC loss."""

    def __init__(self, kind: str, layers: int, sizes: dict, device: str, dtype, seq_max: int, mask: str):
        self.kind, self.mask = kind, mask
        torch.manual_seed(0)
        if kind == "ref":
            cfg = LlamaConfig(n_layers=layers, max_seq_len=seq_max, **sizes)
            with torch.device(device):
                self.module = Llama(cfg).to(dtype)
            self.weight = self.module.output.weight
        else:
            import transformers
            cfg = transformers.LlamaConfig(
                hidden_size=sizes["dim"], intermediate_size=sizes["ffn_dim"],
                num_attention_heads=sizes["n_heads"], num_key_value_heads=sizes["n_kv_heads"],
                vocab_size=sizes["vocab_size"], rope_theta=sizes["rope_theta"], num_hidden_layers=layers,
                max_position_embeddings=seq_max, attn_implementation="sdpa")
            previous = torch.get_default_dtype()
            torch.set_default_dtype(dtype)
            try:
                with torch.device(device):
                    self.module = transformers.LlamaForCausalLM(cfg)
            finally:
                torch.set_default_dtype(previous)
            self.module.train()
            self.weight = self.module.lm_head.weight
            use_hf_mask(mask)
        self.config = cfg

    def parameters(self):
        return self.module.parameters()

    def release(self) -> None:
        """Give the parameters' and buffers' device memory back now, whoever still holds the
        module or its tensors."""
        for tensor in [*self.module.parameters(), *self.module.buffers()]:
            tensor.grad = None
            tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)

    def hidden(self, tokens, positions):
        if self.kind == "ref":
            return self.module.hidden(tokens, positions)
        return self.module.model(input_ids=tokens, position_ids=positions, use_cache=False).last_hidden_state

    def loss(self, tokens, targets, positions, chunks: int):
        return chunked_output_loss(self.hidden(tokens, positions), self.weight, targets, chunks)

    @contextlib.contextmanager
    def checkpointed(self):
        """HF's own gradient checkpointing (non-reentrant torch.utils.checkpoint per decoder layer)
        switched on for the scope; the reference model checkpoints in ``full_ac_loss``."""
        if self.kind == "hf":
            self.module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        try:
            yield
        finally:
            if self.kind == "hf":
                self.module.gradient_checkpointing_disable()

    def full_ac_loss(self, tokens, targets, positions, chunks: int):
        """torch.utils.checkpoint (non-reentrant) around every decoder layer."""
        if self.kind == "hf":  # under ``checkpointed``: HF's layers checkpoint themselves
            return self.loss(tokens, targets, positions, chunks)
        model = self.module
        cos, sin = rope_tables(positions, model.cfg.head_dim, model.cfg.rope_theta)
        h = model.tok_embeddings(tokens)
        for layer in model.layers:
            h = checkpoint.checkpoint(layer, h, cos, sin, use_reentrant=False)
        return chunked_output_loss(model.norm(h), self.weight, targets, chunks)


# --- one row ---------------------------------------------------------------------------------------

class Clock:
    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def event(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def between(self, start, end) -> float:
        """Milliseconds between two events (synchronised)."""
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end)
        return (end - start) * 1e3

    def allocated(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else 0

    def peaks(self) -> tuple[int, int]:
        if not self.cuda:
            return 0, 0
        return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def fresh_start(clock: Clock) -> None:
    """Forget compiled graphs and offload pools; give cached device and pinned host memory back."""
    torch._dynamo.reset()
    offload_ops.release_pools()
    clear_compile_summaries()
    gc.collect()
    if clock.cuda:
        torch.cuda.empty_cache()
        empty_host_cache = getattr(getattr(torch.accelerator, "memory", None), "empty_host_cache", None)
        if empty_host_cache is not None:
            empty_host_cache()


def row_callable(row: str, model: Model, args, profile_path: str | None):
    """(the compiled loss function, the context each step's forward runs in) of one row."""
    kind, _, value = row.partition(":")
    context = _save_on_cpu if kind == "save_on_cpu" else contextlib.nullcontext
    codegen_flags = {} if args.codegen == "inductor" else {"codegen": args.codegen}
    if kind in ("inductor", "torch", "save_on_cpu", "full_ac"):
        backend = "inductor" if args.codegen == "inductor" else "aot_eager"
        loss = model.full_ac_loss if kind == "full_ac" else model.loss
        fn = torch.compile(loss, backend=backend)
        if kind == "torch":
            budget = float(value)

            def with_budget(*inputs):
                with _compat.activation_memory_budget_patch(budget):
                    return fn(*inputs)
            return with_budget, context
        return fn, context
    flags = dict(codegen_flags, device_profile=profile_path)
    if value:
        flags["memory_budget"] = float(value) if _is_number(value) else value
    if kind == "offload":
        flags["offload_activations"] = True
    elif kind != "graphopt":
        raise ValueError(f"unknown row {row!r}; rows: inductor, torch:F, full_ac, save_on_cpu, graphopt, "
                         "graphopt:B, offload, offload:B")
    return torch.compile(model.loss, backend=graphopt.backend(**flags)), context


def raised_at(error: BaseException) -> str:
    """The innermost frame of an exception's traceback as 'file:line in function' (the file's
    path from its package on), so an error with no message still says where it came from."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return "-"
    frame = frames[-1]
    parts = pathlib.Path(frame.filename).parts
    start = max((i for i, part in enumerate(parts) if part in ("torch", "graphopt", "transformers",
                                                                 "bench")), default=len(parts) - 1)
    return f"{'/'.join(parts[start:])}:{frame.lineno} in {frame.name}"


def _save_on_cpu():
    return torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


EXPANDABLE = "+expandable"


def measure_row(row: str, model: Model, inputs, clock: Clock, args, profile_path) -> dict:
    """Compile (first step), one step for the peaks after the cache was emptied, then timed steps."""
    kind = row.removesuffix(EXPANDABLE)
    allocator = (_compat.cuda_allocator_settings("expandable_segments:True", "expandable_segments:False")
                 if kind != row and clock.cuda else contextlib.nullcontext())
    with allocator:
        fresh_start(clock)
        fn, context = row_callable(kind, model, args, profile_path)
        with model.checkpointed() if kind == "full_ac" else contextlib.nullcontext():
            result = _measure(kind, model, fn, context, inputs, clock, args)
        fresh_start(clock)  # segments of this kind go back before the next row
    result["row"] = row
    return result


def _measure(row: str, model: Model, fn, context, inputs, clock: Clock, args) -> dict:

    def step(times: list | None = None):
        for p in model.parameters():
            p.grad = None
        start = clock.event()
        with context():
            loss = fn(*inputs)
        middle = clock.event()
        forward_end = clock.allocated()
        loss.backward()
        end = clock.event()
        if times is not None:
            times.append((clock.between(start, middle), clock.between(middle, end)))
        return loss, forward_end

    t0 = time.perf_counter()
    step()
    clock.sync()
    compile_s = time.perf_counter() - t0
    for p in model.parameters():
        p.grad = None
    clock.reset()
    base = clock.allocated()
    stats_before = offload_ops.pool_stats()
    loss, forward_end = step()
    clock.sync()
    peak, reserved = clock.peaks()
    stats = offload_ops.pool_stats()
    staged = {key: stats[key] - stats_before[key] for key in ("staged_copies", "staged_bytes")}
    times: list = []
    started = time.perf_counter()
    while len(times) < args.repeats or (time.perf_counter() - started < args.min_time_s
                                        and len(times) < 3 * args.repeats):
        step(times)
    clock.sync()
    forward = [f for f, _ in times]
    backward = [b for _, b in times]
    result = {"row": row, "compile_s": compile_s, "base_bytes": base, "peak_bytes": peak,
              "reserved_bytes": reserved, "forward_end_bytes": forward_end,
              "reserved_over_allocated": reserved / peak if peak else None,
              "step_ms": statistics.median(f + b for f, b in times),
              "forward_ms": statistics.median(forward), "backward_ms": statistics.median(backward),
              "step_ms_all": [round(f + b, 3) for f, b in times], "loss": float(loss.detach())}
    result.update(plan_facts(base))
    if clock.cuda and result.get("planned_peak_bytes") and not args.no_peak_holders:
        # one more step under the allocator's record: what holds the measured peak, for a plan
        # that misses it (peak_over_planned)
        result["peak_holders"] = peak_holders.record_step(step)
    # diagnostics: one that fails is recorded in the row, which keeps its measurements
    if clock.cuda and not args.no_kernel_profile:
        result.update(_diagnostic("kernel_profile", lambda: profiled_step(model, fn, context, inputs)))
    if clock.cuda and args.fit_trials:
        result.update(_diagnostic("fit", lambda: fit_under_cap(
            step, clock, peak, reserved, args.fit_trials,
            lambda: [setattr(p, "grad", None) for p in model.parameters()])))
    result.update(staged)  # activations copied into the planned layout on the device in one step
    return result


def _diagnostic(name: str, run) -> dict:
    """``run()``'s fields, or ``{name + "_error": what was raised and where}``."""
    try:
        return run()
    except OutOfTime:
        raise
    except Exception as error:  # noqa: BLE001 -- a diagnostic never costs the row
        return {f"{name}_error": f"{type(error).__name__}: {str(error)[:200]} ({raised_at(error)})"}


def profiled_step(model: Model, fn, context, inputs) -> dict:
    """One more step, its forward and its backward each under torch's profiler: device time by
    kernel and kind (``graphopt.debug.kernel_profile``), so two rows' compiled steps compare kernel
    by kernel (the notes put each offload row beside its plan without offload)."""
    for p in model.parameters():
        p.grad = None
    losses = []

    def forward():
        with context():
            losses.append(fn(*inputs))

    forward_kernels = kernel_profile.profile_call(forward)
    backward_kernels = kernel_profile.profile_call(lambda: losses[0].backward())
    return {"forward_kernels": forward_kernels, "backward_kernels": backward_kernels}


def fit_under_cap(step, clock: Clock, peak: int, reserved: int, trials: int, clear_grads) -> dict:
    """The least memory the step runs in: steps under a cap on the caching allocator
    (``torch.cuda.set_per_process_memory_fraction``), as a multiple of the allocated peak. Without
    a cap the allocator keeps every segment it made (reserved / allocated reads what it cached, not
    what the step needs); under one it frees its cached segments and retries before it fails, so the
    least cap that runs is what fragmentation costs. The first trial is the target (1.05), each next
    one halves the interval between the highest cap that failed (at first the allocated peak) and
    the lowest that ran (at first the uncapped reserved peak)."""
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    ran, failed = max(reserved / peak, 1.0), 1.0
    tried = []

    def settle() -> None:
        clear_grads()
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()

    for trial in range(trials):
        factor = TARGETS["reserved_over_allocated_max"][1] if trial == 0 else (failed + ran) / 2
        settle()
        torch.cuda.set_per_process_memory_fraction(min(1.0, factor * peak / total))
        try:
            step()
            clock.sync()
            ok = True
        except torch.OutOfMemoryError:
            ok = False
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
        tried.append([round(factor, 4), ok])
        if ok:
            ran = min(ran, factor)
        else:
            failed = max(failed, factor)
    settle()
    return {"fit_bytes": int(ran * peak), "fit_failed_bytes": int(failed * peak) if failed > 1.0 else None,
            "fit_trials": tried}


def plan_facts(base: int) -> dict:
    """What graphopt's planner and offload pass said about the graphs compiled for this row."""
    facts: dict = {}
    offloaded = activation = 0
    graphs = 0
    for summary in compile_summaries():
        graphs += 1
        notes = summary.get("notes") or {}
        plan = notes.get("remat_plan")
        if plan:
            facts.update(
                planned_peak_bytes=base + plan["planned_peak_bytes"],
                planned_activation_peak_bytes=plan["planned_peak_bytes"],
                planned_forward_end_bytes=base + plan.get("planned_forward_end_bytes", 0),
                plan_feasible=plan.get("feasible"), plan_peak_at=plan.get("peak_at"),
                plan_kept_saved_bytes=plan.get("kept_saved_bytes"),
                min_cut_saved_bytes=plan.get("min_cut_saved_bytes"),
                model_forward_ms=plan["model_forward_s"] * 1e3,
                model_backward_ms=plan["model_backward_s"] * 1e3,
                model_step_ms=plan["model_step_s"] * 1e3,
                op_sum_forward_ms=plan["op_sum_forward_s"] * 1e3,
                memory_gbps=plan.get("memory_gbps"), host_link_gbps=plan.get("host_link_gbps"),
                plan_counts=plan.get("counts"), plan_refusals=plan.get("refusals"),
                offload_windows=plan.get("offload_windows"),
                op_timing=plan.get("op_timing"))
        order = notes.get("planned_order")
        if order:
            facts["planned_order"] = order
        for entry in summary.get("passes", []):
            if entry.get("pass") == "offload_activations" and entry.get("stage") == "forward":
                stats = entry.get("stats") or {}
                offloaded += int(stats.get("offloaded_bytes", 0) or 0)
                activation += int(stats.get("activation_bytes", 0) or 0)
                if entry.get("refusals"):
                    facts["offload_refusals"] = entry["refusals"][:6]
    facts["graphs"] = graphs
    if activation:
        facts.update(offloaded_bytes=offloaded, activation_bytes=activation,
                     offloaded_fraction=offloaded / activation)
    # plain JSON values: a row kept in the results holds no object of the compiled graphs, which
    # can reach a model's tensors (on one H100 a model's parameters and gradients, 5.54 GiB, stayed
    # allocated under every later model's rows; ``Model.release`` frees them whoever holds them)
    return json.loads(json.dumps(facts, default=str))


# --- the summary ----------------------------------------------------------------------------------

# Peaks this close count as equal (torch:0.5 and graphopt:1.0 on HF Llama at 16K: 133 KB apart at
# 10.0 GiB), so a row at torch's lowest point is compared there, not listed as a bound
EQUAL_PEAK = 0.005


def own_bytes(rows: list[dict]) -> None:
    """Each row's memory figures without what was allocated before its model was built and stayed
    (``carried_bytes``: memory of earlier models that was not given back; it sits unchanged under
    the step, so the row's own peak is the measured peak minus it, and its own reserved the same).
    Rows measured before the run recorded it get it from their base: the base (memory allocated
    before the step) minus the lowest base of the same model among the rows (the model and the
    inputs alone; inputs differ by at most 1.5 MiB between S = 8K and 64K)."""
    lowest: dict = {}
    for r in rows:
        base = r.get("base_bytes", 0)
        lowest[r["model"]] = min(lowest.get(r["model"], base), base)
    for r in rows:
        if r.get("carried_bytes") is None:
            r["carried_bytes"] = r.get("base_bytes", 0) - lowest[r["model"]]
            r["carried_from_base"] = True
        carried = r["carried_bytes"]
        r["peak_own_bytes"] = r["peak_bytes"] - carried
        r["reserved_own_bytes"] = r["reserved_bytes"] - carried
        if r.get("planned_peak_bytes"):
            r["planned_own_bytes"] = r["planned_peak_bytes"] - carried
        r["reserved_over_allocated"] = (r["reserved_own_bytes"] / r["peak_own_bytes"]
                                        if r["peak_own_bytes"] > 0 else None)
        if r.get("fit_bytes"):
            r["fit_own_bytes"] = r["fit_bytes"] - carried
            r["fit_over_allocated"] = (r["fit_own_bytes"] / r["peak_own_bytes"]
                                       if r["peak_own_bytes"] > 0 else None)


def summarize(rows: list[dict]) -> dict:
    """The issue's keys over every measured row:

    offloaded_fraction_64k, offload_overhead_64k  the 'offload' row at 64K (the smaller fraction and
                                                   the larger overhead of the two models)
    offload_overhead_max      offload step / inductor step - 1, the largest over models and S
    peak_over_planned_max     measured peak / planned peak (memory allocated before the step + the
                              plan's simulated peak) over graphopt's rows whose plan fits
    step_vs_torch_budget_max_hf / _ref  our step / torch's at our measured peak, torch's step
                              interpolated over its frontier (inductor and torch:F rows of that S no
                              other row beats on both); above its highest peak, its fastest point
                              (flat); rows below its lowest peak are listed apart (a bound
                              against its lowest-peak point, where torch holds more memory)
    Every memory figure is the row's own (``own_bytes``: without memory carried from earlier models).
    reserved_over_allocated_max  the largest reserved / allocated peak over every row with the
                              default allocator (and at 64K; with expandable segments apart)
    fit_over_allocated_max    the same with the least memory cap the step ran under (``fit_under_cap``)
                              in place of the uncapped reserved peak: what fragmentation costs a run
                              whose memory is short
    model_forward_vs_measured_max_error  |modelled forward / measured forward - 1| over graphopt rows
    """
    ok = [r for r in rows if "error" not in r]
    own_bytes(ok)
    by_group: dict = {}
    for r in ok:
        by_group.setdefault((r["model"], r["seq"]), {})[r["row"]] = r
    overheads, fractions64, overheads64 = [], [], []
    for (model, seq), group in by_group.items():
        base = group.get("inductor")
        for name, r in group.items():
            if base and name != "inductor":
                r["step_vs_inductor"] = r["step_ms"] / base["step_ms"]
                r["peak_vs_inductor"] = (r["peak_own_bytes"] / base["peak_own_bytes"]
                                         if base["peak_own_bytes"] else None)
        offload = group.get("offload")
        if offload and base:
            overheads.append(offload["step_vs_inductor"] - 1)
            if seq == 65536:
                overheads64.append(offload["step_vs_inductor"] - 1)
                fractions64.append(offload.get("offloaded_fraction", 0.0))
        torch_points = [(r["peak_own_bytes"], r["step_ms"]) for n, r in group.items()
                        if n == "inductor" or n.startswith("torch:")]
        curve = frontier(torch_points)
        remat_points = frontier([(r["peak_own_bytes"], r["step_ms"]) for n, r in group.items()
                                 if n.startswith("graphopt")])
        for name, r in group.items():
            if not (name.startswith("graphopt") or name.startswith("offload")):
                continue
            torch_ms = interpolate(curve, r["peak_own_bytes"]) if curve else None
            if (torch_ms is None and curve and curve[0][0] > 0
                    and abs(r["peak_own_bytes"] / curve[0][0] - 1) <= EQUAL_PEAK):
                torch_ms = curve[0][1]  # the same peak as torch's lowest point
            if torch_ms is not None:
                r["step_vs_torch_budget"], r["torch_comparison"] = r["step_ms"] / torch_ms, "interpolated"
            elif curve and r["peak_own_bytes"] > curve[-1][0]:
                # above torch's highest frontier point: a user with our memory takes torch's fastest
                # point under it, which is that one (the frontier's time falls as its peak rises)
                r["step_vs_torch_budget"], r["torch_comparison"] = r["step_ms"] / curve[-1][1], "flat"
            else:
                above = [(peak, ms) for peak, ms in curve if peak >= r["peak_own_bytes"]]
                if above:  # against torch's lowest-peak point above ours
                    r["step_vs_torch_budget"], r["torch_comparison"] = r["step_ms"] / min(above)[1], "bound"
            if name.startswith("offload"):
                remat_ms = interpolate(remat_points, r["peak_own_bytes"]) if remat_points else None
                if remat_ms is not None:
                    r["step_vs_remat_at_equal_peak"] = r["step_ms"] / remat_ms
            for other in ("save_on_cpu", "full_ac"):
                if other in group:
                    r[f"step_vs_{other}"] = r["step_ms"] / group[other]["step_ms"]
                    r[f"peak_vs_{other}"] = (r["peak_own_bytes"] / group[other]["peak_own_bytes"]
                                             if group[other]["peak_own_bytes"] else None)
            if r.get("planned_own_bytes") and r["peak_own_bytes"]:
                r["peak_over_planned"] = r["peak_own_bytes"] / r["planned_own_bytes"]
            if r.get("model_forward_ms") and r["forward_ms"]:
                r["model_forward_vs_measured"] = r["model_forward_ms"] / r["forward_ms"]
                r["op_sum_forward_vs_measured"] = r["op_sum_forward_ms"] / r["forward_ms"]

    def largest(values):
        values = [v for v in values if v is not None]
        return max(values) if values else None

    ours = [r for r in ok if r["row"].startswith(("graphopt", "offload"))]
    default_allocator = [r for r in ok if not r["row"].endswith(EXPANDABLE)]
    fitting = [r for r in ours if r.get("plan_feasible") is not False]
    # torch's frontier at our peak (interpolated, or flat above its highest point); a bound compares
    # with a torch point of more memory (where torch's budgets were not measured at that S, with
    # its default only), so those are listed apart
    compared = {m: [r["step_vs_torch_budget"] for r in ours
                    if r["model"] == m and r.get("torch_comparison") in ("interpolated", "flat")]
                for m in ("hf", "ref")}
    summary = {
        "offloaded_fraction_64k": min(fractions64) if fractions64 else None,
        "offload_overhead_64k": largest(overheads64),
        "offload_overhead_max": largest(overheads),
        "peak_over_planned_max": largest(r.get("peak_over_planned") for r in fitting),
        "peak_over_planned_max_all_plans": largest(r.get("peak_over_planned") for r in ours),
        "step_vs_torch_budget_max_hf": largest(compared["hf"]),
        "step_vs_torch_budget_max_ref": largest(compared["ref"]),
        "below_torch_frontier": [[r["model"], r["seq"], r["row"], round(r["step_vs_torch_budget"], 3)]
                                 for r in ours if r.get("torch_comparison") == "bound"],
        "above_torch_frontier": [[r["model"], r["seq"], r["row"], round(r["step_vs_torch_budget"], 3)]
                                 for r in ours if r.get("torch_comparison") == "flat"],
        "carried_bytes_max": largest(r.get("carried_bytes") for r in ok),
        "reserved_over_allocated_max": largest(r.get("reserved_over_allocated") for r in default_allocator),
        "reserved_over_allocated_max_64k": largest(r.get("reserved_over_allocated") for r in default_allocator
                                                   if r["seq"] == 65536),
        "reserved_over_allocated_max_expandable": largest(r.get("reserved_over_allocated") for r in ok
                                                          if r["row"].endswith(EXPANDABLE)),
        "fit_over_allocated_max": largest(r.get("fit_over_allocated") for r in default_allocator),
        "fit_over_allocated_max_expandable": largest(r.get("fit_over_allocated") for r in ok
                                                     if r["row"].endswith(EXPANDABLE)),
        "model_forward_vs_measured_max_error": largest(
            abs(r["model_forward_vs_measured"] - 1) for r in ours if r.get("model_forward_vs_measured")),
        "op_sum_forward_vs_measured": sorted({round(r["op_sum_forward_vs_measured"], 3) for r in ours
                                              if r.get("op_sum_forward_vs_measured")}),
    }
    summary["targets"] = {key: f"{op} {bound}" for key, (op, bound) in TARGETS.items()}
    summary["met"] = {key: (None if summary.get(key) is None else
                            summary[key] >= bound if op == ">=" else summary[key] <= bound)
                      for key, (op, bound) in TARGETS.items()}
    return summary


# --- output ----------------------------------------------------------------------------------------

def _gib(x) -> str:
    return "-" if x is None else f"{x / 2**30:.2f}"


def _f(x, digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(result: dict) -> str:
    s = result["summary"]
    lines = [f"# Remat and offload plans under Inductor ({result['device']})", "",
             f"torch {result['torch']}, triton {result['triton']}, transformers {result['transformers']}, "
             f"codegen {result['codegen']}; {result['model']}; {result['timing']}; HF mask: "
             f"{result['hf_mask']}", "", "## Summary", ""]
    for key in TARGETS:
        met = s["met"].get(key)
        lines.append(f"- {key}: {_f(s.get(key), 4)} (target {s['targets'][key]}: "
                     f"{'met' if met else 'not met' if met is False else 'not measured'})")
    for key in ("peak_over_planned_max_all_plans", "reserved_over_allocated_max_64k",
                "reserved_over_allocated_max_expandable", "fit_over_allocated_max",
                "fit_over_allocated_max_expandable",
                "op_sum_forward_vs_measured", "below_torch_frontier", "above_torch_frontier"):
        lines.append(f"- {key}: {s.get(key)}")
    lines += ["", "## Rows", "",
              "| model | S | row | step ms | fwd / bwd ms | peak GiB | reserved GiB | fits in GiB | planned GiB | "
              "carried GiB | peak / planned | model fwd / measured | offloaded | vs inductor (step, peak) | "
              "vs torch at equal peak | vs remat at equal peak |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        if "error" in r:
            detail = f" ({r['where']})" if r.get("where") else ""
            lines.append(f"| {r['model']} | {r['seq']} | {r['row']} | {r['error']}{detail} "
                         "| | | | | | | | | | | | |")
            continue
        vs_torch = _f(r.get("step_vs_torch_budget"))
        if r.get("torch_comparison") in ("bound", "flat"):
            vs_torch += f" ({r['torch_comparison']})"
        carried = _gib(r.get("carried_bytes")) + (" (from base)" if r.get("carried_from_base") else "")
        lines.append(
            f"| {r['model']} | {r['seq']} | {r['row']} | {r['step_ms']:.1f} | {r['forward_ms']:.1f} / "
            f"{r['backward_ms']:.1f} | {_gib(r.get('peak_own_bytes', r['peak_bytes']))} | "
            f"{_gib(r.get('reserved_own_bytes', r['reserved_bytes']))} | {_gib(r.get('fit_own_bytes'))} | "
            f"{_gib(r.get('planned_own_bytes', r.get('planned_peak_bytes')))} | {carried} | "
            f"{_f(r.get('peak_over_planned'))} | "
            f"{_f(r.get('model_forward_vs_measured'))} | {_f(r.get('offloaded_fraction'), 2)} | "
            f"{_f(r.get('step_vs_inductor'))}, {_f(r.get('peak_vs_inductor'))} | {vs_torch} | "
            f"{_f(r.get('step_vs_remat_at_equal_peak'))} |")
    lines += ["", "## Notes", "", *[f"- {n}" for n in result.get("notes", [])]]
    if result.get("commands"):
        lines += ["", "Commands, in the order they ran (each run's rows joined the earlier ones with "
                  "--resume):", "", *[f"- `{c}`" for c in result["commands"]]]
    return "\n".join(lines) + "\n"


def command_line(argv: list[str]) -> str:
    """This run's command as the results print it: --out as $OUT, files by their names (no path of
    the machine that ran it)."""
    words, after_out = ["python3", "bench/plans_inductor.py"], False
    for word in argv:
        if after_out:
            words.append("$OUT")
        elif os.sep in word and (os.path.isabs(word) or os.path.exists(word)):  # a file, not a row
            words.append(pathlib.Path(word).name)
        else:
            words.append(word)
        after_out = word == "--out"
    return " ".join(words)


def notes_for(result: dict) -> list[str]:
    notes = [
        "planned GiB = memory allocated before the step (parameters, inputs) + the plan's simulated "
        "peak of what the step allocates; the plan's own statement of what it counts: "
        + next((r["plan_counts"] for r in result["rows"] if r.get("plan_counts")), "-"),
        "reserved GiB: torch.cuda.max_memory_reserved over one step after torch.cuda.empty_cache(); "
        "peak GiB: max_memory_allocated over the same step. Without a cap the caching allocator "
        "keeps every segment it made, so reserved reads what it cached; 'fits in GiB' is the least "
        "cap (torch.cuda.set_per_process_memory_fraction, a multiple of the allocated peak: 1.05 "
        "first, then halving) under which one more step ran: there the allocator frees cached "
        "segments before it fails, and what is left over the allocated peak is fragmentation.",
        "model fwd / measured: the planner's modelled forward (Inductor's kernels priced by "
        "analysis/kernel_time: measured GEMM / attention times, memory-bound kernels at the "
        "bandwidth measured on the graph's ops) over the CUDA-event time of the compiled forward "
        "(loss included: the chunked loss forms its gradient in forward).",
        "vs torch at equal peak: our step over torch's activation_memory_budget frontier "
        "interpolated at our measured peak; '(bound)': our peak is below every torch point, "
        "compared with torch's lowest-peak point above ours (torch holds more memory there: an upper "
        "bound of the ratio at equal peak); '(flat)': our peak is above every torch frontier point, "
        "compared with torch's fastest point, which holds less. The summary's step_vs_torch_budget_max "
        "keys take the interpolated and flat rows; bound rows are listed apart (below_torch_frontier).",
        "peak, reserved and planned GiB are the row's own: without 'carried GiB', memory still "
        "allocated from models measured earlier in the same process (it sits unchanged under the "
        "step). '(from base)': a row measured before the bench recorded it, where it is the memory "
        "allocated before the step minus the lowest such base of the same model among the rows.",
    ]
    for r in result["rows"]:
        for reason in (r.get("plan_refusals") or [])[:2]:
            notes.append(f"{r['model']} S={r['seq']} {r['row']}: {reason}")
        holders = r.get("peak_holders")
        if holders and (r.get("peak_over_planned") or 0) > TARGETS["peak_over_planned_max"][1]:
            notes.append(
                f"{r['model']} S={r['seq']} {r['row']}: measured peak "
                f"{_gib(r.get('peak_own_bytes', r['peak_bytes']))} GiB over planned "
                f"{_gib(r.get('planned_own_bytes', r['planned_peak_bytes']))}; the step's peak (plan's at "
                f"{r.get('plan_peak_at')}) is in the {holders['phase_at_peak']}, held by: " + "; ".join(
                    f"{h['bytes'] / 2**20:.0f} MiB {h['phase']} `{h['where']}`"
                    for h in holders["holders"][:6]))
    notes += kernel_notes(result["rows"])
    for r in result["rows"]:
        for name in ("kernel_profile", "fit"):
            if r.get(f"{name}_error"):
                notes.append(f"{r['model']} S={r['seq']} {r['row']}: the {name} step failed: {r[f'{name}_error']}")
        if r.get("staged_copies"):
            notes.append(f"{r['model']} S={r['seq']} {r['row']}: {r['staged_copies']} offloaded "
                         f"activations ({_gib(r['staged_bytes'])} GiB) were copied on the device into "
                         "the plan's layout each step (the compiled tensor's strides were not the "
                         "plan's)")
    if result.get("not_run"):
        notes.append("not run (time limit; rerun with --resume): " + ", ".join(result["not_run"]))
    notes += [f"--resume {skipped}" for skipped in result.get("resume_skipped", [])]
    return notes


# the plan each offload row is put beside, first found in its group: graphopt's rows run the same
# attention (the mask pass's), inductor's HF rows HF's own mask
KERNEL_BASELINES = ("graphopt:1.0", "graphopt", "graphopt:0.5", "inductor")


def kernel_notes(rows: list[dict]) -> list[str]:
    """Per offload row with kernel profiles: its forward's and backward's device time by kind
    against the same model and S without offload (the first of ``KERNEL_BASELINES`` measured)."""
    by_key = {(r["model"], r["seq"], r["row"]): r for r in rows if "error" not in r}
    notes = []
    for (model, seq, name), r in by_key.items():
        if not name.startswith("offload") or not r.get("forward_kernels"):
            continue
        base_name = next((b for b in KERNEL_BASELINES
                          if (by_key.get((model, seq, b)) or {}).get("forward_kernels")), None)
        if base_name is None:
            continue
        base = by_key[(model, seq, base_name)]
        for phase in ("forward", "backward"):
            difference = kernel_profile.compare(r[f"{phase}_kernels"], base[f"{phase}_kernels"])
            compute = (r[f"{phase}_kernels"].get("streams") or {}).get("compute") or {}
            gaps = ("; longest idle: " + ", ".join(f"{g['ms']:.2f} ms before {g['before']}"
                                                   for g in compute["gaps"][:2])
                    if compute.get("gaps") else "")
            notes.append(f"{model} S={seq} {name} {phase} ({r[f'{phase}_ms']:.1f} ms) against {base_name} "
                         f"({base[f'{phase}_ms']:.1f} ms): " + kernel_profile.format_comparison(difference)
                         + gaps)
    return notes


def write_result(out: str, result: dict) -> None:
    result["summary"] = summarize(result["rows"])
    result["notes"] = notes_for(result)
    os.makedirs(out, exist_ok=True)
    for name, text in (("plans_inductor.json", json.dumps(result, indent=1, default=str)),
                       ("plans_inductor.md", markdown(result))):
        path = os.path.join(out, name)
        with open(path + ".tmp", "w") as handle:
            handle.write(text)
        os.replace(path + ".tmp", path)


def short_table(result: dict) -> str:
    lines = ["model S row: step ms, peak GiB, reserved/alloc, peak/planned, model fwd/measured, vs torch"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"{r['model']} {r['seq']} {r['row']}: {r['error']}")
            continue
        lines.append(f"{r['model']} {r['seq']} {r['row']}: {r['step_ms']:.1f}, "
                     f"{_gib(r.get('peak_own_bytes', r['peak_bytes']))}, "
                     f"{_f(r.get('reserved_over_allocated'))}, {_f(r.get('peak_over_planned'))}, "
                     f"{_f(r.get('model_forward_vs_measured'))}, {_f(r.get('step_vs_torch_budget'))}")
    s = result["summary"]
    lines.append("summary: " + ", ".join(f"{k}={_f(s.get(k))}" for k in TARGETS))
    return "\n".join(lines)


# --- the run ---------------------------------------------------------------------------------------

class OutOfTime(Exception):
    pass


SMOKE_ROWS = "inductor,offload,graphopt:0.5,torch:0.5,offload:0.5,full_ac,save_on_cpu"


def plan_rows(args) -> list[tuple[str, int, str]]:
    """(model, seq, row) in the order they run: --rows for every model and S, else the priority
    plan's rows of the models and S asked for."""
    models, seqs = args.models.split(","), [int(s) for s in args.seqs.split(",")]
    if args.rows:
        return [(m, s, r) for s in seqs for m in models for r in args.rows.split(",")]
    ordered = []
    for model, seq, rows in PRIORITY:
        if model in models and seq in seqs:
            ordered += [(model, seq, r) for r in rows.split(",") if (model, seq, r) not in ordered]
    return ordered


def redo_matches(patterns: list[str], row: dict) -> bool:
    """Whether --redo names this row: MODEL/S/ROW, each part a value or '*'."""
    for pattern in patterns:
        parts = pattern.split("/", 2)
        if len(parts) != 3:
            raise SystemExit(f"--redo {pattern!r}: expected MODEL/S/ROW, e.g. hf/16384/offload or "
                             "hf/*/offload")
        have = (row["model"], row["seq"], row["row"])
        if all(want == "*" or want == str(value) for want, value in zip(parts, have)):
            return True
    return False


def environment(device: str) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    try:
        import transformers
        transformers_version = transformers.__version__
    except ImportError:
        transformers_version = "-"
    return {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch": torch.__version__, "triton": triton_version, "transformers": transformers_version}


def resumable_rows(earlier: dict, current: dict) -> tuple[list[dict], str | None]:
    """The rows of an earlier run that join this one: those measured without error on the same
    device, torch and codegen (rows of another card or version would sit in one table under this
    run's header), and why none join where they don't."""
    differs = [f"{key} {earlier.get(key)!r} (this run: {current.get(key)!r})"
               for key in ("device", "torch", "codegen", "hf_mask") if earlier.get(key) != current.get(key)]
    if differs:
        return [], "not merged, measured with another " + ", ".join(differs)
    return [row for row in earlier.get("rows", []) if "error" not in row], None


def device_profile(device: str, out: str) -> str | None:
    """``graphopt calibrate`` on this GPU (GEMM, HBM, host link), written beside the results."""
    if device != "cuda":
        return None
    from graphopt.measure.calibrate import calibrate
    profile, _ = calibrate()
    path = os.path.abspath(os.path.join(out, "plans_inductor_device_profile.json"))
    os.makedirs(out, exist_ok=True)
    with open(path, "w") as handle:
        json.dump(profile.to_json(), handle, indent=1)
    print(f"device profile: {profile}", flush=True)
    return path


def validate(args, device: str, clock: Clock, profile_path) -> int:
    """The fused time model against the measured compiled forward on one configuration."""
    model_kind, seq = args.models.split(",")[0], int(args.seqs.split(",")[0])
    sizes = SIZES_TINY if args.smoke else SIZES_8B
    model = Model(model_kind, args.layers, sizes, device, args.dtype, seq, args.hf_mask)
    inputs = batch(model, seq, device, args.loss_chunk_tokens)
    r = measure_row("graphopt:1.0", model, inputs, clock, args, profile_path)
    r.update(model=model_kind, seq=seq)
    summarize([r])
    print(json.dumps({k: r.get(k) for k in (
        "model", "seq", "forward_ms", "model_forward_ms", "op_sum_forward_ms", "model_forward_vs_measured",
        "op_sum_forward_vs_measured", "backward_ms", "model_backward_ms", "peak_bytes", "planned_peak_bytes",
        "peak_over_planned", "reserved_bytes", "memory_gbps", "compile_s")}, indent=1))
    error = abs(r["model_forward_vs_measured"] - 1) if r.get("model_forward_vs_measured") else None
    print(f"modelled / measured forward: {_f(r.get('model_forward_vs_measured'))} (target within 10 %: "
          f"{'met' if error is not None and error <= 0.1 else 'not met'}); the op-by-op sum: "
          f"{_f(r.get('op_sum_forward_vs_measured'))}")
    with open(os.path.join(args.out, "plans_inductor_validate.json"), "w") as handle:
        json.dump(r, handle, indent=1, default=str)
    return 0


def batch(model: Model, seq: int, device: str, chunk_tokens: int):
    generator = torch.Generator().manual_seed(seq)
    vocab = model.weight.shape[0]
    tokens = torch.randint(0, vocab, (1, seq), generator=generator).to(device)
    targets = torch.randint(0, vocab, (1, seq), generator=generator).to(device)
    positions = torch.arange(seq, device=device).expand(1, seq)
    return tokens, targets, positions, math.ceil(seq / chunk_tokens)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", default="hf,ref")
    parser.add_argument("--seqs", default="8192,16384,65536")
    parser.add_argument("--rows", default="", help="rows for every model and S (default: the priority plan)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-time-s", type=float, default=1.0,
                        help="time more steps (up to 3x --repeats) until they add up to this")
    parser.add_argument("--loss-chunk-tokens", type=int, default=4096)
    parser.add_argument("--hf-mask", default="stand-in", choices=("stand-in", "model"))
    parser.add_argument("--codegen", default="inductor", choices=("inductor", "eager"))
    parser.add_argument("--time-limit", type=float, default=420.0,
                        help="seconds: no row starts that would likely end past it")
    parser.add_argument("--resume", nargs="*", default=[], help="earlier plans_inductor.json files to merge")
    parser.add_argument("--validate", action="store_true", help="modelled vs measured forward, one config")
    parser.add_argument("--no-peak-holders", action="store_true",
                        help="skip the extra step under the allocator's record on planned rows")
    parser.add_argument("--no-kernel-profile", action="store_true",
                        help="skip the profiled step (device time by kernel) of every row")
    parser.add_argument("--fit-trials", type=int, default=4,
                        help="steps under a memory cap to find the least the step runs in (0: none)")
    parser.add_argument("--redo", nargs="*", default=[], metavar="MODEL/S/ROW",
                        help="measure these rows again though --resume holds them ('*' matches any "
                             "part: hf/*/offload)")
    parser.add_argument("--no-calibrate", action="store_true", help="plan with the default device profile")
    parser.add_argument("--smoke", action="store_true", help="tiny models on this machine's device")
    args = parser.parse_args(argv)
    started = time.monotonic()
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    args.dtype = torch.bfloat16 if device == "cuda" else torch.float32
    clock = Clock(device)
    if args.smoke:
        args.seqs = "128" if args.seqs == parser.get_default("seqs") else args.seqs
        args.rows = args.rows or SMOKE_ROWS
        args.loss_chunk_tokens = min(args.loss_chunk_tokens, 64)
        args.repeats, args.min_time_s = 1, 0.0
    profile_path = None if args.no_calibrate else device_profile(device, args.out)
    if args.validate:
        return validate(args, device, clock, profile_path)
    result = {"name": "plans_inductor", **environment(device), "codegen": args.codegen,
              "hf_mask": ("stand-in: transformers' create_causal_mask returns None, SDPA is_causal=True "
                          "(for issue 21's mask pass)" if args.hf_mask == "stand-in" else "HF's own"),
              "model": (f"{'tiny' if args.smoke else 'Llama-3-8B layer dimensions'}, {args.layers} layers, "
                        f"{str(args.dtype).replace('torch.', '')}, batch 1, chunked loss of "
                        f"{args.loss_chunk_tokens} tokens"),
              "timing": (f"step ms: median of {args.repeats}+ steps (CUDA events), more while under "
                         f"{args.min_time_s:g} s"),
              "rows": []}
    commands = []
    for path in args.resume:
        with open(path) as handle:
            earlier = json.load(handle)
        rows, why_not = resumable_rows(earlier, result)
        result["rows"] += rows
        if rows:
            commands += [c for c in earlier.get("commands", []) if c not in commands]
        if why_not:
            print(f"--resume {path}: {why_not}", flush=True)
            result.setdefault("resume_skipped", []).append(f"{pathlib.Path(path).name}: {why_not}")
    result["commands"] = [*commands, command_line(sys.argv[1:] if argv is None else list(argv))]
    this_run = len(result["commands"])  # the command (1-based, in the results' list) that measures a row
    # rows --redo names stay in the results until their new measurement replaces them
    done = {(r["model"], r["seq"], r["row"]) for r in result["rows"] if not redo_matches(args.redo, r)}
    todo = [item for item in plan_rows(args) if item not in done]

    def alarm(_signum, _frame):
        raise OutOfTime()

    if hasattr(signal, "SIGALRM"):
        signal.signal(signal.SIGALRM, alarm)
        signal.alarm(max(1, int(args.time_limit)))
    models: dict = {}
    last_s: dict = {}
    carried = 0
    sizes = SIZES_TINY if args.smoke else SIZES_8B
    seq_max = max(s for _, s, _ in todo) if todo else 0
    try:
        for model_kind, seq, row in todo:
            elapsed = time.monotonic() - started
            estimate = last_s.get((model_kind, seq), max(last_s.values(), default=0.0))
            if elapsed + 1.2 * estimate > args.time_limit:
                raise OutOfTime()
            if model_kind not in models:
                for previous in models.values():
                    previous.release()
                models.clear()
                model = inputs = None
                fresh_start(clock)
                carried = clock.allocated()
                if carried:
                    print(f"{carried / 2**30:.2f} GiB still allocated before building the {model_kind} "
                          "model: subtracted from every peak of its rows (carried_bytes)", flush=True)
                models[model_kind] = Model(model_kind, args.layers, sizes, device, args.dtype, seq_max,
                                           args.hf_mask)
            model = models[model_kind]
            inputs = batch(model, seq, device, args.loss_chunk_tokens)
            t0 = time.monotonic()
            try:
                r = measure_row(row, model, inputs, clock, args, profile_path)
            except torch.OutOfMemoryError as error:
                r = {"row": row, "error": "out of memory", "detail": str(error).splitlines()[0]}
            except OutOfTime:
                raise
            except Exception as error:  # a row that fails is recorded; the others still run
                r = {"row": row, "error": f"{type(error).__name__}", "detail": str(error)[:500],
                     "where": raised_at(error)}
            last_s[(model_kind, seq)] = time.monotonic() - t0
            r.update(model=model_kind, seq=seq, wall_s=last_s[(model_kind, seq)], carried_bytes=carried,
                     run=this_run)
            result["rows"] = [old for old in result["rows"]
                              if (old["model"], old["seq"], old["row"]) != (model_kind, seq, row)] + [r]
            print({k: v for k, v in r.items() if k not in ("plan_refusals", "op_timing", "offload_windows",
                                                             "plan_counts", "planned_order", "step_ms_all")},
                  flush=True)
            write_result(args.out, result)
    except OutOfTime:
        measured = {(r["model"], r["seq"], r["row"]) for r in result["rows"]
                    if not redo_matches(args.redo, r) or r.get("run") == this_run}
        result["not_run"] = [f"{m} {s} {r}" for m, s, r in todo if (m, s, r) not in measured]
    finally:
        if hasattr(signal, "SIGALRM"):
            signal.alarm(0)
    write_result(args.out, result)
    print(markdown(result))
    print(short_table(result))
    print(f"wall {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
