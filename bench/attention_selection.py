"""Attention selection for fine-tuning: accuracy and attention FLOPs offline, step time on a GPU.

CPU evaluation (no downloads): a transformers ``LlamaModel`` (hidden 64, 4 layers, 4 heads, 2
key/value heads) reads scikit-learn's 8x8 digits as 16 patches of 2x2 pixels; a linear head reads
the mean of its last hidden states. It is pretrained to classify the digits 0-4, then fine-tuned
on a different task: the digits 5-9 with a new head (half of them to train, half to test). Fine-tuning variants, each over 3 seeds (data order, head, selection):

  full                every attention module runs on every sample (graphopt, pass off)
  random f            attention_selection at kept fraction f, the graph's own random draw per step
  score f             the samples whose attention output was largest against their residual when
                      last seen run (plan_step with the dataset indices)
  layer f             warm-up epochs under 'random f', then per-module capacities from the measured
                      importance (selector().layer_fractions(f)), compiled once more
  lora / lora random  peft LoRA (r 8) on q/k/v/o, the head trained, without and with selection

Accuracy: the fine-tuned model evaluated whole (every attention) under torch.no_grad on the test
half. FLOPs: counted by torch's FlopCounterMode around every compiled graph's execution (forward +
backward) of one training step, with the patches requiring grad so the backward spans every layer
in every variant; attention FLOPs = full minus the same graph with every attention module at
capacity 0; ``attention_flops_saved`` = (full - selected) / (full - none) per step (the layer
strategy's warm-up steps run at the same fraction; its row uses seed 0's per-module fractions).

Balance: with the scores the 'score' runs measured, 4 simulated ranks (2 nodes x 2 GPUs) of 32
samples plan 40 steps of random global batches; max / mean of the modelled attention work per rank
before (contiguous) and after the hierarchical multiple knapsack.

GPU (``--gpu``): transformers LlamaModel at 7B layer dimensions (hidden 4096, ffn 11008, 32 heads),
2 layers, batch 8 x 2048 tokens, bf16, random inputs, loss = mean square of the last hidden state,
AdamW; Inductor. Step time (forward + backward + AdamW, median of CUDA-event timed steps) and peak
memory for: torch.compile (Inductor, no graphopt), graphopt with attention_selection at f, and
graphopt with every attention at capacity 0 and zero gradients for its parameters (the attention
modules' share of the step). Writes ``attention_selection_gpu.json`` under
``--out``; ``--merge FILE`` folds it into the committed results.

    python bench/attention_selection.py                 # CPU evaluation, 3 seeds (~15 min, 1 thread)
    python bench/attention_selection.py --quick         # 1 seed, 4 variants (~2 minutes)
    python bench/attention_selection.py --gpu --out $OUT   # one H100: 3 Inductor compiles, ~1.5 min
    python bench/attention_selection.py --merge $OUT/attention_selection_gpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt import _compat
from graphopt.analysis import attention_work
from graphopt.ops.attention_selection import selector

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
RECOMMENDED = {"strategy": "random", "fraction": 0.6}  # the flags' defaults, chosen before the run
TARGET_FLOPS_SAVED, TARGET_DROP, TARGET_IMBALANCE, TARGET_TIME_EFFICIENCY = 0.35, 2.0, 1.05, 0.8


# --- data and model -------------------------------------------------------------------------------

def digits():
    """(patches [N, 16, 4] in [0, 1], labels [N])."""
    from sklearn.datasets import load_digits
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0          # [N, 8, 8]
    patches = images.reshape(-1, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(-1, 16, 4)
    return patches, torch.tensor(data.target)


def split(labels: torch.Tensor, classes: range, test_fraction: float, seed: int = 0):
    """Train / test indices of the samples of ``classes``, stratified."""
    from sklearn.model_selection import train_test_split
    chosen = [i for i, y in enumerate(labels.tolist()) if y in classes]
    train, test = train_test_split(chosen, test_size=test_fraction, random_state=seed,
                                   stratify=[labels[i].item() for i in chosen])
    return sorted(train), sorted(test)


class PatchTransformer(nn.Module):
    """Patches -> linear embedding -> transformers LlamaModel -> mean over tokens -> classes."""

    def __init__(self, classes: int, hidden: int = 64, layers: int = 4):
        super().__init__()
        import transformers
        config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                                          num_hidden_layers=layers, num_attention_heads=4,
                                          num_key_value_heads=2, vocab_size=1, bos_token_id=None,
                                          eos_token_id=None, pad_token_id=None,
                                          max_position_embeddings=32)
        self.embed = nn.Linear(4, hidden)
        self.llama = transformers.LlamaModel(config)
        self.head = nn.Linear(hidden, classes)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        hidden = self.llama(inputs_embeds=self.embed(patches), use_cache=False).last_hidden_state
        return self.head(hidden.mean(1))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        correct = (model(x).argmax(-1) == y).float().mean().item()
    model.train()
    return 100.0 * correct


def pretrain(x, y, train, test, epochs: int, seed: int = 0) -> tuple[dict, float]:
    torch.manual_seed(seed)
    model = PatchTransformer(classes=5)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.tensor(train)[torch.randperm(len(train), generator=order)]
        for start in range(0, len(perm) - 31, 32):
            ids = perm[start:start + 32]
            loss = F.cross_entropy(model(x[ids]), y[ids])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.state_dict(), accuracy(model, x[test], y[test])


# --- FLOPs of the compiled graphs -------------------------------------------------------------------

class GraphFlops:
    """Counts FLOPs of every compiled graph graphopt runs (eager codegen) while ``on``: torch's FLOP
    formulas (torch.utils.flop_counter) for every aten op the graph executes, CPU SDPA kernels
    priced like the others. (A dispatch mode of its own: FlopCounterMode's module tracker hooks
    the graph module's outputs, which inside AOTAutograd's forward carry no grad_fn.)"""

    def __init__(self):
        self.on, self.flops = False, 0
        self._original = _compat.make_boxed_func
        _compat.make_boxed_func = self._wrap

    def _wrap(self, fn):
        boxed = self._original(fn)

        def run(args):
            if not self.on:
                return boxed(args)
            with _Counting() as counting:
                out = boxed(args)
            self.flops += counting.flops
            return out
        run._boxed_call = True
        return run


def _counting_mode():
    from torch.utils import flop_counter
    from torch.utils._python_dispatch import TorchDispatchMode
    aten = torch.ops.aten
    registry = dict(flop_counter.flop_registry)

    def forward(query, key, value, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)
    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", forward),
                          ("_scaled_dot_product_flash_attention_for_cpu_backward", backward)):
        op = getattr(aten, name, None)
        if op is not None:
            registry[op] = flop_counter.shape_wrapper(formula)

    class Counting(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.flops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = registry.get(func._overloadpacket)
            if formula is not None:
                self.flops += formula(*args, **kwargs, out_val=out)
            return out
    return Counting


def _Counting():
    return _counting_mode()()


# --- fine-tuning ----------------------------------------------------------------------------------

def variants(quick: bool) -> list[dict]:
    rows = [dict(name="full", strategy=None, fraction=1.0)]
    for fraction in ((0.6,) if quick else (0.8, 0.6, 0.4)):
        rows.append(dict(name=f"random {fraction}", strategy="random", fraction=fraction))
    rows.append(dict(name="score 0.6", strategy="score", fraction=0.6))
    rows.append(dict(name="layer 0.6", strategy="layer", fraction=0.6))
    if not quick:
        rows.append(dict(name="lora", strategy=None, fraction=1.0, lora=True))
        rows.append(dict(name="lora random 0.6", strategy="random", fraction=0.6, lora=True))
    return rows


def _flags(variant: dict, layer_fractions=None) -> dict:
    if variant["strategy"] is None:
        return dict(codegen="eager")
    flags = dict(codegen="eager", attention_selection=True,
                 attention_selection_kept_fraction=variant["fraction"],
                 attention_selection_strategy=variant["strategy"])
    if layer_fractions is not None:
        flags["attention_selection_layer_fractions"] = layer_fractions
    elif variant["strategy"] == "layer":
        flags["attention_selection_strategy"] = "random"  # the warm-up
    return flags


def _model(variant: dict, pretrained: dict, seed: int) -> tuple[nn.Module, nn.Module]:
    """(the module to train and evaluate, the module to compile)."""
    torch.manual_seed(seed)
    model = PatchTransformer(classes=5)
    state = {k: v for k, v in pretrained.items() if not k.startswith("head.")}
    model.load_state_dict(state, strict=False)
    if not variant.get("lora"):
        return model, model
    import peft
    wrapped = peft.get_peft_model(model, peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        lora_dropout=0.0, modules_to_save=["head"]))
    return wrapped, wrapped.base_model.model


def finetune(variant: dict, pretrained: dict, x, y, train, test, epochs: int, seed: int,
             warmup_epochs: int, batch: int = 32) -> dict:
    torch._dynamo.reset()
    selector().reset()
    model, inner = _model(variant, pretrained, seed)
    compiled = torch.compile(inner, dynamic=False, backend=graphopt.backend(**_flags(variant)))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3 if not variant.get("lora") else 3e-3,
                            weight_decay=0.01)
    order = torch.Generator().manual_seed(1000 + seed)
    steps, fractions = 0, None
    started = time.perf_counter()
    for epoch in range(epochs):
        if variant["strategy"] == "layer" and epoch == warmup_epochs:
            fractions = selector().layer_fractions(variant["fraction"])
            compiled = torch.compile(inner, dynamic=False,
                                     backend=graphopt.backend(**_flags(variant, fractions)))
        perm = torch.tensor(train)[torch.randperm(len(train), generator=order)].tolist()
        for start in range(0, len(perm) - batch + 1, batch):
            ids = perm[start:start + batch]
            if variant["strategy"] == "score":
                plan = selector().plan_step(ids)
                if plan is not None:
                    ids = [ids[i] for i in plan.local_positions]
            loss = F.cross_entropy(compiled(x[ids]), y[ids])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if variant["strategy"] is not None:
                selector().end_step()
            steps += 1
    result = {"accuracy": accuracy(model, x[test], y[test]), "steps": steps,
              "seconds": time.perf_counter() - started}
    if fractions is not None:
        result["layer_fractions"] = list(fractions)
        result["warmup_steps"] = warmup_epochs * (len(train) // batch)
    if variant["strategy"] == "score":
        result["selector"] = selector()
    return result


def step_flops(pretrained: dict, x, train, counter: GraphFlops, lora: bool, flags: dict,
               batch: int = 32) -> int:
    """FLOPs of one training step (forward + backward) of the graph compiled with ``flags``.

    The patches require grad here, so the backward runs through every layer in every variant: with
    LoRA and every attention at capacity 0 nothing trainable would otherwise remain below the head,
    and the difference to the full graph would count the MLPs' backward as attention work."""
    torch._dynamo.reset()
    selector().reset()
    model, inner = _model(dict(lora=lora), pretrained, 0)
    compiled = torch.compile(inner, dynamic=False, backend=graphopt.backend(codegen="eager", **flags))
    patches = x[train[:batch]].clone().requires_grad_(True)
    compiled(patches).sum().backward()
    counter.on, counter.flops = True, 0
    compiled(patches).sum().backward()
    counter.on = False
    return counter.flops


def _selection_flags(row: dict) -> dict:
    if row["strategy"] is None:
        return {}
    if row["strategy"] == "layer":
        return dict(attention_selection=True,
                    attention_selection_layer_fractions=tuple(row["runs"][0]["layer_fractions"]))
    return dict(attention_selection=True, attention_selection_kept_fraction=row["fraction"])


# --- balance across simulated ranks -----------------------------------------------------------------

def simulate_balance(scored, train: list[int], ranks: int = 4, gpus_per_node: int = 2,
                     batch: int = 32, steps: int = 40) -> dict:
    """Plans of ``steps`` random global batches from the scores a 'score' run kept."""
    modules = scored.modules()
    rng = random.Random(0)
    rows = {"score": [], "random": []}
    for step in range(steps):
        ids = rng.sample(train, ranks * batch)
        score_priority = scored.priorities(ids)
        random_priority = [[rng.random() for _ in ids] for _ in modules]
        for name, priority in (("score", score_priority), ("random", random_priority)):
            plan = attention_work.plan_step(priority, [m.capacity for m in modules], batch, ranks,
                                            gpus_per_node, [m.seconds_per_sample for m in modules])
            rows[name].append((plan.imbalance_before, plan.imbalance_after,
                               plan.moved / max(1, plan.planned_cells)))
    out = {}
    for name, values in rows.items():
        out[name] = {"before_mean": statistics.mean(v[0] for v in values),
                     "before_max": max(v[0] for v in values),
                     "after_mean": statistics.mean(v[1] for v in values),
                     "after_max": max(v[1] for v in values),
                     "cells_moved_by_capacity_mean": statistics.mean(v[2] for v in values)}
    out["setup"] = (f"{ranks} ranks ({ranks // gpus_per_node} nodes x {gpus_per_node} GPUs) x "
                    f"{batch} samples, {steps} random global batches of the fine-tuning set; "
                    "work = modelled seconds of the planned (module, sample) cells")
    return out


# --- the CPU evaluation -----------------------------------------------------------------------------

def run_cpu(args) -> dict:
    torch.set_num_threads(max(1, args.threads))
    x, y = digits()
    pre_train, pre_test = split(y, range(0, 5), 0.3)
    fine_train, fine_test = split(y, range(5, 10), 0.5)
    y_fine = y - 5
    started = time.perf_counter()
    pretrained, pre_accuracy = pretrain(x, y, pre_train, pre_test, args.pretrain_epochs)
    print(f"pretrained on digits 0-4: test accuracy {pre_accuracy:.1f}% "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    counter = GraphFlops()
    seeds = list(range(1 if args.quick else args.seeds))
    rows, scored = [], None
    for variant in variants(args.quick):
        runs = []
        for seed in seeds:
            result = finetune(variant, pretrained, x, y_fine, fine_train, fine_test, args.epochs,
                              seed, args.warmup_epochs)
            if "selector" in result:
                kept = result.pop("selector")
                scored = scored or copy.copy(kept)
            runs.append(result)
            print(f"  {variant['name']:>18} seed {seed}: accuracy {result['accuracy']:.2f}%, "
                  f"{result['seconds']:.0f} s", flush=True)
        rows.append({**{k: v for k, v in variant.items()}, "runs": runs,
                     "accuracy_mean": statistics.mean(r["accuracy"] for r in runs),
                     "accuracy_std": statistics.pstdev(r["accuracy"] for r in runs)})
    layers = len(PatchTransformer(classes=5).llama.layers)
    for lora in sorted({bool(r.get("lora")) for r in rows}):
        none = step_flops(pretrained, x, fine_train, counter, lora,
                          dict(attention_selection=True,
                               attention_selection_layer_fractions=(0.0,) * layers))
        mine = [r for r in rows if bool(r.get("lora")) == lora]
        for row in mine:
            row["step_flops"] = step_flops(pretrained, x, fine_train, counter, lora,
                                           _selection_flags(row))
            row["attention_free_step_flops"] = none
        full = next(r for r in mine if r["strategy"] is None)
        for row in mine:
            row["attention_flops_saved"] = (full["step_flops"] - row["step_flops"]) / \
                (full["step_flops"] - none)
            row["accuracy_drop_points"] = full["accuracy_mean"] - row["accuracy_mean"]
    balance = simulate_balance(scored, fine_train) if scored is not None else None
    recommended = next(r for r in rows if r["strategy"] == RECOMMENDED["strategy"]
                       and r["fraction"] == RECOMMENDED["fraction"] and not r.get("lora"))
    summary = {
        "attention_flops_saved": recommended["attention_flops_saved"],
        "accuracy_drop_points": recommended["accuracy_drop_points"],
        "step_time_saved_gpu": None,
        "rank_work_imbalance": balance["score"]["after_max"] if balance else None,
        "recommended": f"{RECOMMENDED['strategy']} at kept fraction {RECOMMENDED['fraction']} "
                       "(the flags' defaults, fixed before the run)",
        "targets": {"attention_flops_saved": f">= {TARGET_FLOPS_SAVED} at accuracy_drop_points "
                                             f"<= {TARGET_DROP}",
                    "step_time_saved_gpu": f">= {TARGET_TIME_EFFICIENCY} x attention share x "
                                           "attention_flops_saved",
                    "rank_work_imbalance": f"<= {TARGET_IMBALANCE}"},
    }
    summary["flops_and_accuracy_target_met"] = (
        summary["attention_flops_saved"] >= TARGET_FLOPS_SAVED
        and summary["accuracy_drop_points"] <= TARGET_DROP)
    summary["imbalance_target_met"] = (summary["rank_work_imbalance"] is not None
                                       and summary["rank_work_imbalance"] <= TARGET_IMBALANCE)
    return {
        "name": "attention_selection",
        "device": f"{_cpu_name()}, {torch.get_num_threads()} thread(s) on a shared machine",
        "torch": torch.__version__, "codegen": "eager (FX graphs of aten ops; FLOPs counted per op)",
        "quick": args.quick, "seeds": seeds, "epochs": args.epochs,
        "run": time.strftime("%Y-%m-%d"),
        "pretrain": {"task": "digits 0-4 (sklearn load_digits, 70/30 split)",
                     "epochs": args.pretrain_epochs, "test_accuracy": pre_accuracy},
        "finetune": {"task": "digits 5-9, new head (50/50 split)", "train": len(fine_train),
                     "test": len(fine_test), "batch": 32, "epochs": args.epochs,
                     "layer_warmup_epochs": args.warmup_epochs},
        "model": "transformers LlamaModel hidden 64, ffn 128, 4 layers, 4 heads (2 kv), 16 tokens "
                 "(patches of 2x2 pixels), mean-pooled into a linear head, fp32",
        "rows": rows, "balance": balance, "summary": summary,
        "wall_s": time.perf_counter() - started,
    }


# --- the GPU step time --------------------------------------------------------------------------------

def run_gpu(args) -> dict:
    """Step time and peak memory of the 7B-dimension layers with and without selection."""
    import transformers
    torch.manual_seed(0)
    device = torch.device(args.gpu_device)
    on_cuda = device.type == "cuda"
    config = transformers.LlamaConfig(hidden_size=args.gpu_hidden, intermediate_size=args.gpu_ffn,
                                      num_hidden_layers=args.gpu_layers,
                                      num_attention_heads=args.gpu_heads,
                                      num_key_value_heads=args.gpu_heads, vocab_size=1,
                                      bos_token_id=None, eos_token_id=None, pad_token_id=None,
                                      max_position_embeddings=args.gpu_seq)
    dtype = torch.bfloat16 if on_cuda else torch.float32
    model = transformers.LlamaModel(config).to(device=device, dtype=dtype)
    x = torch.randn(args.gpu_batch, args.gpu_seq, args.gpu_hidden, device=device, dtype=dtype)
    fraction = RECOMMENDED["fraction"]
    capacity = attention_work.capacity(fraction, args.gpu_batch)
    setups = {
        "inductor": None,
        "selected": dict(attention_selection=True, attention_selection_kept_fraction=fraction),
        "no_attention": dict(attention_selection=True,
                             attention_selection_layer_fractions=(0.0,) * args.gpu_layers),
    }
    rows = {}
    for name, flags in setups.items():
        torch._dynamo.reset()
        selector().reset()
        fn = lambda e: model(inputs_embeds=e, use_cache=False).last_hidden_state  # noqa: E731
        if flags is None:  # what a user has without graphopt
            compiled = torch.compile(fn, dynamic=False) if args.gpu_codegen == "inductor" else \
                torch.compile(fn, dynamic=False, backend="aot_eager")
        else:
            compiled = torch.compile(fn, dynamic=False, backend=graphopt.backend(
                codegen=args.gpu_codegen, **flags))
        # Without attention its parameters get no gradient; zeros keep the optimizer's work the
        # same, so the difference to the full step is the attention modules' forward + backward.
        rows[name] = _time_steps(compiled, model, x, args.gpu_iters, on_cuda,
                                 zero_missing_grads=name == "no_attention")
        print(f"{name:>13}: {rows[name]['step_ms']:.2f} ms, peak {rows[name]['peak_gib']} GiB",
              flush=True)
    base, selected, none = (rows[k]["step_ms"] for k in ("inductor", "selected", "no_attention"))
    share = 1 - none / base
    flops_saved = 1 - capacity / args.gpu_batch
    saved = 1 - selected / base
    peaks = [rows[k]["peak_gib"] for k in ("inductor", "selected")]
    return {
        "name": "attention_selection_gpu",
        "device": torch.cuda.get_device_name() if on_cuda else f"CPU ({platform.machine()})",
        "torch": torch.__version__, "triton": _triton_version(), "codegen": args.gpu_codegen,
        "model": f"transformers LlamaModel hidden {args.gpu_hidden}, ffn {args.gpu_ffn}, "
                 f"{args.gpu_heads} heads, {args.gpu_layers} layers, batch {args.gpu_batch} x "
                 f"{args.gpu_seq} tokens, {str(dtype).split('.')[-1]}, AdamW (foreach)",
        "kept_fraction": fraction, "capacity": capacity, "batch": args.gpu_batch,
        "rows": rows, "attention_share_of_step": share,
        "attention_flops_saved": flops_saved, "step_time_saved_gpu": saved,
        "target_step_time_saved": TARGET_TIME_EFFICIENCY * share * flops_saved,
        "target_met": saved >= TARGET_TIME_EFFICIENCY * share * flops_saved,
        "peak_saved_gib": peaks[0] - peaks[1] if None not in peaks else None,
    }


def _time_steps(compiled, model: nn.Module, x: torch.Tensor, iters: int, on_cuda: bool,
                zero_missing_grads: bool) -> dict:
    """Median step time (forward + backward + AdamW) and peak memory after 3 warm-up steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    zeros = {p: torch.zeros_like(p) for p in model.parameters()} if zero_missing_grads else {}

    def step():
        loss = compiled(x).float().pow(2).mean()
        loss.backward()
        for param, zero in zeros.items():
            if param.grad is None:
                param.grad = zero
        opt.step()
        opt.zero_grad(set_to_none=True)

    started = time.perf_counter()
    for _ in range(3):
        step()
    _synchronize(on_cuda)
    compile_s = time.perf_counter() - started
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    times = [_timed(step, on_cuda) for _ in range(iters)]
    return {"step_ms": statistics.median(times), "step_ms_all": times,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if on_cuda else None,
            "warmup_and_compile_s": compile_s}


def _synchronize(on_cuda: bool) -> None:
    if on_cuda:
        torch.cuda.synchronize()


def _timed(step, on_cuda: bool) -> float:
    """Milliseconds of one step (CUDA events on a GPU)."""
    if not on_cuda:
        started = time.perf_counter()
        step()
        return (time.perf_counter() - started) * 1e3
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    step()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _triton_version() -> str | None:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


# --- results -----------------------------------------------------------------------------------------

def merge(result: dict, gpu: dict) -> dict:
    result["gpu"] = gpu
    result["summary"]["step_time_saved_gpu"] = gpu["step_time_saved_gpu"]
    result["summary"]["gpu_attention_share_of_step"] = gpu["attention_share_of_step"]
    result["summary"]["gpu_step_time_target"] = gpu["target_step_time_saved"]
    result["summary"]["gpu_target_met"] = gpu["target_met"]
    return result


def render(result: dict) -> str:
    s = result["summary"]
    lines = [
        "# Attention selection for fine-tuning", "",
        f"CPU evaluation: {result['device']}, torch {result['torch']}, codegen {result['codegen']}, "
        f"seeds {result['seeds']}, {result['wall_s'] / 60:.1f} minutes"
        + (f" ({result['run']})." if result.get("run") else "."),
        f"Model: {result['model']}.",
        f"Pretrained on {result['pretrain']['task']} for {result['pretrain']['epochs']} epochs: "
        f"{result['pretrain']['test_accuracy']:.1f}% test accuracy. Fine-tuned on "
        f"{result['finetune']['task']}: {result['finetune']['train']} train / "
        f"{result['finetune']['test']} test samples, batch 32, {result['epochs']} epochs.", "",
        "| variant | test accuracy % (mean +- sd) | drop (points) | step GFLOP (fwd+bwd) | attention FLOPs saved |",
        "| --- | --- | --- | --- | --- |"]
    for row in result["rows"]:
        lines.append(f"| {row['name']} | {row['accuracy_mean']:.2f} +- {row['accuracy_std']:.2f} | "
                     f"{row['accuracy_drop_points']:+.2f} | {row['step_flops'] / 1e9:.4f} | "
                     f"{row['attention_flops_saved']:.3f} |")
    lines += ["", "drop = the same kind's full fine-tuning (full, or lora) minus the variant, in "
              "accuracy points over the seeds' means (negative: the variant scored higher); test "
              f"accuracy resolution {100 / max(1, result['finetune']['test']):.2f} points."]
    layer = next((r for r in result["rows"] if r["strategy"] == "layer"), None)
    if layer is not None and layer["runs"][0].get("layer_fractions"):
        lines += ["", "Layer strategy, per-module kept fractions after the warm-up (seed 0): "
                  f"{[round(f, 3) for f in layer['runs'][0]['layer_fractions']]}."]
    balance = result.get("balance")
    if balance:
        lines += ["", f"Balance ({balance['setup']}):", "",
                  "| priorities | max/mean before (mean, worst) | after (mean, worst) | cells moved by the capacities |",
                  "| --- | --- | --- | --- |"]
        for name in ("score", "random"):
            b = balance[name]
            lines.append(f"| {name} | {b['before_mean']:.3f}, {b['before_max']:.3f} | "
                         f"{b['after_mean']:.4f}, {b['after_max']:.4f} | "
                         f"{100 * b['cells_moved_by_capacity_mean']:.1f}% |")
    gpu = result.get("gpu")
    if gpu:
        lines += ["", f"GPU: {gpu['device']}, torch {gpu['torch']}, triton {gpu['triton']}, "
                  f"{gpu['codegen']}; {gpu['model']}; kept fraction {gpu['kept_fraction']} "
                  f"(capacity {gpu['capacity']} of {gpu['batch']}).", "",
                  "| variant | step ms (median) | min - max of the timed steps | peak GiB |",
                  "| --- | --- | --- | --- |"]
        for name, row in gpu["rows"].items():
            peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
            steps = row.get("step_ms_all") or [row["step_ms"]]
            lines.append(f"| {name} | {row['step_ms']:.2f} | {min(steps):.2f} - {max(steps):.2f} | {peak} |")
        lines += ["", f"Attention share of the step {gpu['attention_share_of_step']:.3f} (1 - no_attention "
                  f"/ inductor); attention FLOPs saved at this batch {gpu['attention_flops_saved']:.3f} "
                  f"(capacity {gpu['capacity']} of {gpu['batch']}); step time saved "
                  f"{gpu['step_time_saved_gpu']:.3f} (1 - selected / inductor; target >= 0.8 x share x "
                  f"FLOPs saved = {gpu['target_step_time_saved']:.3f}: "
                  f"{'met' if gpu['target_met'] else 'missed'}). Measured with `python3 "
                  "bench/attention_selection.py --gpu --out $OUT`, folded in with `--merge`."]
        proportional = gpu["attention_share_of_step"] * gpu["attention_flops_saved"]
        if gpu["step_time_saved_gpu"] > proportional:
            lines += ["", f"The saving is above the proportional one (share x FLOPs saved = "
                      f"{proportional:.3f}). The baseline is plain Inductor (what a user has without "
                      "graphopt); the selected and no_attention rows run graphopt's backend, whose other "
                      "default passes this run did not time apart, and the baseline's timed steps "
                      "spread the most."]
    lines += ["", "Summary: " + ", ".join(f"{k} = {_fmt(v)}" for k, v in s.items()
                                           if k != "targets"),
              "", "Targets: " + "; ".join(f"{k} {v}" for k, v in s["targets"].items()), ""]
    return "\n".join(lines)


def _fmt(value):
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write(result: dict, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "attention_selection.json"), "w") as handle:
        json.dump(result, handle, indent=1, default=str)
    with open(os.path.join(folder, "attention_selection.md"), "w") as handle:
        handle.write(render(result))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, fewer variants")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--pretrain-epochs", type=int, default=20)
    parser.add_argument("--warmup-epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (1: on a shared machine more spin more than they compute)")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--gpu", action="store_true", help="the GPU step-time part only")
    parser.add_argument("--gpu-layers", type=int, default=2)
    parser.add_argument("--gpu-hidden", type=int, default=4096)
    parser.add_argument("--gpu-ffn", type=int, default=11008)
    parser.add_argument("--gpu-heads", type=int, default=32)
    parser.add_argument("--gpu-device", default="cuda", help="cpu: a smoke run of the GPU part")
    parser.add_argument("--gpu-codegen", default="inductor", choices=("inductor", "eager"))
    parser.add_argument("--gpu-batch", type=int, default=8)
    parser.add_argument("--gpu-seq", type=int, default=2048)
    parser.add_argument("--gpu-iters", type=int, default=10)
    parser.add_argument("--merge", metavar="GPU_JSON",
                        help="fold a --gpu result into --out's attention_selection.json")
    args = parser.parse_args(argv)
    if args.merge:
        with open(os.path.join(args.out, "attention_selection.json")) as handle:
            result = json.load(handle)
        with open(args.merge) as handle:
            write(merge(result, json.load(handle)), args.out)
        return
    if args.gpu:
        if args.gpu_device == "cuda" and not torch.cuda.is_available():
            sys.exit("--gpu needs a CUDA device (or --gpu-device cpu for a smoke run)")
        gpu = run_gpu(args)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "attention_selection_gpu.json"), "w") as handle:
            json.dump(gpu, handle, indent=1)
        print(json.dumps({k: gpu[k] for k in ("attention_share_of_step", "attention_flops_saved",
                                              "step_time_saved_gpu", "target_step_time_saved",
                                              "target_met")}))
        return
    result = run_cpu(args)
    write(result, args.out)
    print(json.dumps(result["summary"], indent=1, default=str))


if __name__ == "__main__":
    main()
