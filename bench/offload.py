"""Activation offload: peak memory and step time against the alternatives a user would pick.

One training step (forward + loss + backward) of the reference Llama at 7B dimensions (dim 4096,
32 heads, ffn 11008, vocab 32000), a few layers, bf16, batch 1, per sequence length S:

  eager          PyTorch eager, nothing saved off the device (the baseline a user has)
  save_on_cpu    eager under torch.autograd.graph.save_on_cpu(pin_memory=True)
  compiled       graphopt, eager codegen, offload off (torch's min-cut partition)
  planned        graphopt, eager codegen, memory_budget=1.0: graphopt's planner partition without
                 offload (tells the partition's share of the overhead from the copies')
  offload        graphopt, eager codegen, offload_activations=True (joint plan + this pass)
  offload_roofline  the same, planned with roofline op times (op_timing="model"): what measured
                 op times change
  offload_linkM  (--link-margins) the same, planned as if the host link ran at M x its bandwidth
  remat          graphopt, eager codegen, memory_budget = the activation peak offload reached
                 (graphopt's rematerialization planner only: remat at equal peak)

Overheads are ratios of median step times measured in the same run: offload vs compiled (same
code generator, offload off), taken from a paired phase where both compiled modules alternate
step by step (``--pair-rounds``), so drift of the clock or the machine cancels; the separate
medians are kept beside them. Offloaded fraction = bytes the pass sent to the host / bytes of the
saved activations (the pass's own stats). Also written: a memory timeline of one step (allocator
trace, offload vs compiled) and a transfer/compute overlap timeline (torch.profiler CUDA events).
Results are rewritten after every sequence length, and what is left past ``--time-limit-s`` is
skipped and listed, so a run cut short still leaves its numbers.

The planners (remat and offload) size the transfer windows and price recomputation with op times
measured on the GPU at compile time (``graphopt.config.op_timing``, ``--op-timing``; the roofline
model where an op cannot be timed alone); ``model_forward_vs_measured`` compares the forward they
planned with against the measured forward graph, ``roofline_forward_vs_measured`` the roofline's.
The forward graph is timed twice: CUDA events around the call (``forward_graph_s``, the window of
``hideable_fraction``) and from its first kernel to its last (profiler, ``forward_gpu_span_s``,
``hideable_fraction_gpu_span``); the planner reports where its D2H queue idles
(``model_d2h_idle_*_ms``).

Targets: S >= 64K: >= 50% of activation bytes off the device at <= 3% step-time overhead;
S = 8K: >= 90% of what the transfer window hides (the model's hidden fraction) at <= 3% overhead;
offload faster than remat at equal peak.

    python bench/offload.py --out $OUT                 # GPU: S = 8K, 64K, 32K, ~4 minutes on one H100
    python bench/offload.py --out /tmp/o --smoke       # CPU smoke run (tiny model), under 2 minutes
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch

import graphopt
from graphopt import _compat
from graphopt.debug.dump import clear_compile_summaries, compile_summaries
from graphopt.models.llama import Llama, LlamaConfig, llama_loss
from graphopt.ops import offload as offload_ops

TARGET_FRACTION_LONG = 0.50
TARGET_OVERHEAD = 0.03
TARGET_HIDDEN_SHARE_8K = 0.90


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seqs", default="8192,65536,32768",
                        help="sequence lengths in the order run (the longest gets the timelines)")
    parser.add_argument("--iters", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--iters-short", type=int, default=20,
                        help="timed steps per variant at S <= 8192 (short steps, noisy ratios)")
    parser.add_argument("--iters-save-on-cpu", type=int, default=2,
                        help="timed steps of save_on_cpu (pins host memory every step: slow)")
    parser.add_argument("--pair-rounds", type=int, default=10,
                        help="alternating compiled / offload steps for the overhead (x2 at S <= 8192)")
    parser.add_argument("--time-limit-s", type=float, default=420.0,
                        help="skip what is left (and say so) past this many seconds")
    parser.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                        help="plan with the default device profile instead of one measured first")
    parser.add_argument("--link-margins", default="",
                        help="extra offload variants planned with the host link at these fractions of "
                             "its measured bandwidth (slack in the windows), e.g. 0.9,0.8; in the "
                             "paired phase too")
    parser.add_argument("--op-timing", default="auto", choices=("auto", "measure", "model"),
                        help="op times the planners use (graphopt.config.op_timing)")
    parser.add_argument("--tiny", "--smoke", dest="tiny", action="store_true",
                        help="CPU smoke run with LlamaConfig.tiny")
    parser.add_argument("--resummarize", metavar="JSON",
                        help="recompute summary and Markdown of an earlier run's offload.json into --out")
    return parser.parse_args(argv)


class Clock:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn):
        self.sync()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        begin = time.perf_counter()
        fn()
        return time.perf_counter() - begin


def make_step(model, tokens, targets, context=None):
    def step():
        model.zero_grad(set_to_none=True)
        if context is None:
            loss = llama_loss(model(tokens), targets)
            loss.backward()
        else:
            with context():
                loss = llama_loss(model(tokens), targets)
            loss.backward()
    return step


def measure(step, clock, iters):
    step()  # compile, pool allocation, warm-up
    clock.sync()
    cuda = clock.cuda
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    times = [clock.time(step) for _ in range(iters)]
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    return {"times_s": times, "median_s": statistics.median(times), "peak_bytes": peak,
            "peak_over_base_bytes": peak - base, "base_bytes": base}


def offload_stats():
    """The offload pass's forward stats of the graphs compiled since the last clear."""
    found = {"offloaded_bytes": 0, "activation_bytes": 0, "pool_bytes": 0, "offloaded": 0}
    for summary in compile_summaries():
        for entry in summary["passes"]:
            if entry.get("pass") == "offload_activations" and entry.get("stage") == "forward":
                stats = entry.get("stats") or {}
                for key in found:
                    found[key] += int(stats.get(key, 0) or 0)
        notes = summary.get("notes") or {}
        if "remat_plan" in notes:
            found["remat_plan"] = notes["remat_plan"]
        if "op_timing" in notes:  # measured vs roofline per distinct op of the joint graph
            found["op_timing"] = notes["op_timing"]
    return found


def fresh_start(clock):
    """Forget compiled graphs and offload pools; give cached device and pinned host memory back
    (save_on_cpu and the pools pin tens of GiB at long S; the caching host allocator keeps them)."""
    torch._dynamo.reset()
    offload_ops.release_pools()
    gc.collect()
    if clock.cuda:
        torch.cuda.empty_cache()
        memory = getattr(torch.accelerator, "memory", None)
        empty_host_cache = getattr(memory, "empty_host_cache", None)  # absent in older torch
        if empty_host_cache is not None:
            empty_host_cache()


def run_variant(name, model, tokens, targets, clock, iters, backend=None, context=None,
                forward_only=False):
    """Compile (when ``backend``), warm up and time ``iters`` steps of one variant."""
    fresh_start(clock)
    clear_compile_summaries()
    module = model if backend is None else torch.compile(model, backend=backend, dynamic=False)
    begin = time.perf_counter()
    try:
        result = measure(make_step(module, tokens, targets, context), clock, iters)
    except torch.OutOfMemoryError as error:
        print(f"  {name:12s} out of memory", flush=True)
        return {"oom": str(error).splitlines()[0], "median_s": float("nan"), "peak_bytes": 0,
                "peak_over_base_bytes": 0}
    if forward_only:
        result["forward_s"] = statistics.median(
            clock.time(lambda: llama_loss(module(tokens), targets)) for _ in range(iters))
        # the compiled forward graph alone (the loss runs outside it): the window the device ->
        # host copies must fit in, since the forward waits for them before it returns
        result["forward_graph_s"] = statistics.median(clock.time(lambda: module(tokens))
                                                      for _ in range(iters))
        # the same forward from its first kernel to its last (no host time before or after)
        result["forward_gpu_span_s"] = gpu_span_s(lambda: module(tokens), clock)
    result["wall_s"] = time.perf_counter() - begin
    if backend is not None:
        result["pass"] = offload_stats()
        if name != "offload":  # the per-op table is the same for every graphopt variant
            result["pass"].pop("op_timing", None)
    print(f"  {name:12s} {result['median_s'] * 1e3:9.2f} ms  peak {result['peak_bytes'] / 2**30:7.2f} GiB "
          f"({result['wall_s']:.1f} s)", flush=True)
    return result


def gpu_span_s(fn, clock):
    """Seconds from the first to the end of the last CUDA kernel or copy of one call (profiler)."""
    if not clock.cuda:
        return None
    from torch.profiler import ProfilerActivity, profile
    fn()
    clock.sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        clock.sync()
    events = [e for e in _trace_events(prof) if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
              and "dur" in e]
    if not events:
        return None
    begin = min(float(e["ts"]) for e in events)
    return (max(float(e["ts"]) + float(e["dur"]) for e in events) - begin) / 1e6


def _trace_events(prof):
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as handle:
            return json.load(handle).get("traceEvents", [])


def compiled_steps(model, tokens, targets, clock, backends):
    """One training-step function per backend, each compiled and warmed by two steps."""
    steps = {name: make_step(torch.compile(model, backend=backend, dynamic=False), tokens, targets)
             for name, backend in backends.items()}
    for step in steps.values():
        step()
        step()
    clock.sync()
    return steps


def alternate(steps, clock, rounds):
    """Seconds per step of several step functions run alternately (ABAB.., then BABA..), so slow
    drift of the machine hits each alike."""
    times = {name: [] for name in steps}
    for index in range(rounds):
        for name in (list(steps) if index % 2 == 0 else list(reversed(steps))):
            times[name].append(clock.time(steps[name]))
    return times


def paired_steps(model, tokens, targets, clock, rounds, backends):
    """Median step times of several compiled modules run alternately (``alternate``); all are
    compiled and warmed first."""
    fresh_start(clock)
    begin = time.perf_counter()
    steps = compiled_steps(model, tokens, targets, clock, backends)
    compiled_graphs = len(compile_summaries())
    times = alternate(steps, clock, rounds)
    result = {name: {"times_s": t, "median_s": statistics.median(t)} for name, t in times.items()}
    result["recompiled"] = len(compile_summaries()) - compiled_graphs
    result["wall_s"] = time.perf_counter() - begin
    print("  paired       " + "  ".join(f"{name} {r['median_s'] * 1e3:.2f} ms" for name, r in result.items()
                                       if isinstance(r, dict)) + f" ({result['wall_s']:.1f} s)", flush=True)
    return result


def scaled_link_profile(path, margin, folder):
    """A copy of the device profile at ``path`` whose host link is ``margin`` x as fast."""
    from graphopt.analysis.device_profile import current_profile, load_profile
    import dataclasses
    profile = load_profile(path) if path else current_profile(None)
    scaled = dataclasses.replace(profile, host_link_gbps=profile.host_link_gbps * margin)
    out = os.path.abspath(os.path.join(folder, f"device_profile_link{margin:g}.json"))
    with open(out, "w") as handle:
        json.dump(scaled.to_json(), handle, indent=1)
    return out


def measured_profile(device, folder):
    """``graphopt calibrate`` on this GPU (GEMM, HBM and host-link figures), written beside the
    results; the planners read it through ``config.device_profile``. None on CPU."""
    if device.type != "cuda":
        return None
    from graphopt.measure.calibrate import calibrate
    profile, _ = calibrate()
    path = os.path.abspath(os.path.join(folder, "device_profile.json"))
    with open(path, "w") as handle:
        json.dump(profile.to_json(), handle, indent=1)
    print(f"device profile: {profile}", flush=True)
    return path


def _read_json(path):
    if path is None:
        return None
    with open(path) as handle:
        return json.load(handle)


def host_link_gbps(device):
    """Measured pinned host <-> device copy bandwidth (GB/s, each way) on 1 GiB."""
    if device.type != "cuda":
        return None
    host = torch.empty(2**30, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(2**30, dtype=torch.uint8, device=device)
    clock = Clock(device)
    for _ in range(2):
        host.copy_(dev, non_blocking=True)
        dev.copy_(host, non_blocking=True)
    d2h = statistics.median(clock.time(lambda: host.copy_(dev, non_blocking=True)) for _ in range(3))
    h2d = statistics.median(clock.time(lambda: dev.copy_(host, non_blocking=True)) for _ in range(3))
    return {"d2h": 2**30 / d2h / 1e9, "h2d": 2**30 / h2d / 1e9}


def memory_timeline(step, clock):
    """Bytes allocated after every allocator event of one step (CUDA only)."""
    if not clock.cuda:
        return []
    step()
    clock.sync()
    _compat.record_cuda_memory_history(True)
    base = torch.cuda.memory_allocated()
    step()
    clock.sync()
    trace = _compat.cuda_memory_trace()
    _compat.record_cuda_memory_history(False)
    live, points = base, []
    for event in trace:
        if event.get("action") == "alloc":
            live += event.get("size", 0)
        elif event.get("action") == "free_completed":
            live -= event.get("size", 0)
        else:
            continue
        points.append(live)
    return points


def overlap_timeline(step, clock, folder):
    """CUDA kernels and copies of one step, by stream, from torch.profiler."""
    if not clock.cuda:
        return {"events": [], "summary": {}}
    from torch.profiler import ProfilerActivity, profile
    step()
    clock.sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        clock.sync()
    path = os.path.join(folder, "offload_trace.json")
    prof.export_chrome_trace(path)
    with open(path) as handle:
        trace = json.load(handle)
    os.remove(path)
    events = []
    for event in trace.get("traceEvents", []):
        category = event.get("cat", "")
        if category not in ("kernel", "gpu_memcpy", "gpu_memset") or "dur" not in event:
            continue
        name = event.get("name", "")
        kind = ("d2h" if "DtoH" in name else "h2d" if "HtoD" in name else
                "copy" if category != "kernel" else "compute")
        events.append({"kind": kind, "stream": event.get("args", {}).get("stream"),
                       "start_us": float(event["ts"]), "dur_us": float(event["dur"])})
    return {"events": events, "summary": summarize_overlap(events)}


def _union(intervals):
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def _covered(start, end, union):
    return sum(max(0.0, min(end, b) - max(start, a)) for a, b in union)


def summarize_overlap(events):
    compute = _union([(e["start_us"], e["start_us"] + e["dur_us"]) for e in events if e["kind"] == "compute"])
    out = {}
    for kind in ("d2h", "h2d"):
        copies = [(e["start_us"], e["start_us"] + e["dur_us"]) for e in events if e["kind"] == kind]
        total = sum(b - a for a, b in copies)
        hidden = sum(_covered(a, b, compute) for a, b in copies)
        out[kind] = {"copies": len(copies), "busy_ms": total / 1e3,
                     "under_compute_fraction": hidden / total if total else None}
    if compute:
        out["step_span_ms"] = (compute[-1][1] - compute[0][0]) / 1e3
        out["compute_busy_ms"] = sum(b - a for a, b in compute) / 1e3
    return out


def svg_lines(series, title, y_label):
    width, height, margin = 900, 340, 60
    top = max([max(p) for _, p in series if p] + [1])
    lines = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
             "font-family='sans-serif' font-size='12'>",
             f"<text x='{margin}' y='20'>{title}</text>",
             f"<line x1='{margin}' y1='{height - margin}' x2='{width - margin}' y2='{height - margin}' stroke='#444'/>",
             f"<line x1='{margin}' y1='{margin}' x2='{margin}' y2='{height - margin}' stroke='#444'/>",
             f"<text x='5' y='{margin - 5}'>{top / 2**30:.1f} {y_label}</text>",
             f"<text x='{width - margin - 180}' y='{height - margin + 30}'>fraction of the step's allocator events</text>"]
    colors = ("#d62728", "#1f77b4", "#2ca02c")
    for index, (label, points) in enumerate(series):
        if not points:
            continue
        step = max(1, len(points) // 2000)
        sampled = points[::step]
        coords = " ".join(f"{margin + i / max(1, len(sampled) - 1) * (width - 2 * margin):.1f},"
                          f"{height - margin - p / top * (height - 2 * margin):.1f}"
                          for i, p in enumerate(sampled))
        color = colors[index % len(colors)]
        lines.append(f"<polyline fill='none' stroke='{color}' stroke-width='1.2' points='{coords}'/>")
        lines.append(f"<text x='{width - margin - 170}' y='{margin + 16 * index}' fill='{color}'>"
                     f"{label}: peak {max(points) / 2**30:.2f} GiB</text>")
    lines.append("</svg>")
    return "\n".join(lines)


def svg_overlap(events, title):
    width, lane_h, margin = 1000, 28, 90
    if not events:
        return f"<svg xmlns='http://www.w3.org/2000/svg' width='400' height='40'><text y='20'>{title}: no CUDA events</text></svg>"
    begin = min(e["start_us"] for e in events)
    end = max(e["start_us"] + e["dur_us"] for e in events)
    lanes = ["compute", "d2h", "h2d"]
    colors = {"compute": "#7f7f7f", "d2h": "#d62728", "h2d": "#1f77b4", "copy": "#bbbbbb"}
    height = margin + lane_h * len(lanes) + 40
    scale = (width - margin - 20) / max(1.0, end - begin)
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
             "font-family='sans-serif' font-size='12'>", f"<text x='10' y='20'>{title}</text>"]
    for row, lane in enumerate(lanes):
        y = margin + row * lane_h
        parts.append(f"<text x='10' y='{y + 16}'>{lane}</text>")
        for event in events:
            if (event["kind"] if event["kind"] != "copy" else "compute") != lane:
                continue
            x = margin + (event["start_us"] - begin) * scale
            w = max(0.5, event["dur_us"] * scale)
            parts.append(f"<rect x='{x:.1f}' y='{y}' width='{w:.2f}' height='{lane_h - 6}' "
                         f"fill='{colors[event['kind']]}'/>")
    parts.append(f"<text x='{margin}' y='{height - 10}'>0 .. {(end - begin) / 1e3:.1f} ms</text></svg>")
    return "\n".join(parts)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.resummarize:
        with open(args.resummarize) as handle:
            results = json.load(handle)
        return write_results(results, args.out)
    started = time.perf_counter()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if args.tiny:
        cfg = LlamaConfig.tiny(n_layers=args.layers)
        seqs = [64, 128]
    else:
        cfg = LlamaConfig.llama2_7b(n_layers=args.layers)
        seqs = [int(s) for s in args.seqs.split(",")]
    clock = Clock(device)
    link = host_link_gbps(device)
    profile_path = measured_profile(device, args.out) if args.calibrate else None

    margins = [float(m) for m in args.link_margins.split(",") if m.strip()]
    margin_profiles = {f"offload_link{m:g}": scaled_link_profile(profile_path, m, args.out)
                       for m in margins}

    def backend(**flags):  # every graphopt variant plans with the same (measured) device profile
        return graphopt.backend(**{"codegen": "eager", "device_profile": profile_path,
                                   "op_timing": args.op_timing, **flags})

    results = {"host_link_gbps": link,"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "triton": _triton_version(), "layers": args.layers,
               "dim": cfg.dim, "heads": cfg.n_heads, "ffn": cfg.ffn_dim, "vocab": cfg.vocab_size,
               "dtype": str(dtype), "op_timing": args.op_timing, "remat_baseline": "graphopt memory_budget (plan_rematerialization)",
               "device_profile": _read_json(profile_path), "runs": {}, "skipped": []}
    torch.manual_seed(0)
    model = Llama(cfg).to(device=device, dtype=dtype)
    def past_limit():
        return time.perf_counter() - started > args.time_limit_s

    for seq in seqs:
        if past_limit():
            results["skipped"].append(f"S={seq}: time limit")
            continue
        print(f"S={seq}", flush=True)
        tokens = torch.randint(0, cfg.vocab_size, (1, seq), device=device)
        targets = torch.randint(0, cfg.vocab_size, (1, seq), device=device)
        run = results["runs"][str(seq)] = {}
        pin = device.type == "cuda"
        iters = args.iters_short if seq <= 8192 and not args.tiny else args.iters
        variants = [
            ("eager", {}),
            ("save_on_cpu", {"iters": args.iters_save_on_cpu,
                             "context": lambda: torch.autograd.graph.save_on_cpu(pin_memory=pin)}),
            ("compiled", {"backend": backend(), "forward_only": True}),
            ("planned", {"backend": backend(memory_budget=1.0)}),
            ("offload", {"backend": backend(offload_activations=True)}),
        ]
        if args.op_timing != "model":  # the same plan made with the roofline's op times
            variants.append(("offload_roofline", {"backend": backend(offload_activations=True,
                                                                     op_timing="model")}))
        variants += [(name, {"backend": backend(offload_activations=True, device_profile=path)})
                     for name, path in margin_profiles.items()]
        for name, options in variants:
            if past_limit():
                results["skipped"].append(f"S={seq}: {name} (time limit)")
                continue
            options = {"iters": iters, **options}
            run[name] = run_variant(name, model, tokens, targets, clock, **options)
        measured = {name for name, row in run.items() if isinstance(row, dict) and "times_s" in row}
        if "offload" in measured and not past_limit():
            budget = max(1, run["offload"]["peak_over_base_bytes"]) if pin else 0.9
            run["remat_budget"] = budget
            run["remat"] = run_variant("remat", model, tokens, targets, clock, iters,
                                       backend=backend(memory_budget=budget))
        elif "offload" in measured:
            results["skipped"].append(f"S={seq}: remat at equal peak (time limit)")
        if {"offload", "compiled"} <= measured and not past_limit():
            rounds = args.pair_rounds * (2 if seq <= 8192 and not args.tiny else 1)
            run["paired"] = paired_steps(model, tokens, targets, clock, rounds, {
                "compiled": backend(), "offload": backend(offload_activations=True),
                **{name: backend(offload_activations=True, device_profile=path)
                   for name, path in margin_profiles.items() if name in measured}})
        elif {"offload", "compiled"} <= measured:
            results["skipped"].append(f"S={seq}: paired compiled / offload steps (time limit)")
        results["total_wall_s"] = time.perf_counter() - started
        write_results(results, args.out, quiet=True)  # a run cut short still leaves its numbers
    longest = max(results["runs"], key=int, default=None)
    if longest is not None and device.type == "cuda" and past_limit():
        results["skipped"].append("memory and overlap timelines (time limit)")
    elif longest is not None and device.type == "cuda":
        seq = int(longest)
        tokens = torch.randint(0, cfg.vocab_size, (1, seq), device=device)
        targets = torch.randint(0, cfg.vocab_size, (1, seq), device=device)
        fresh_start(clock)
        compiled = torch.compile(model, backend=backend(), dynamic=False)
        plain_points = memory_timeline(make_step(compiled, tokens, targets), clock)
        torch._dynamo.reset()
        offloaded = torch.compile(model, backend=backend(offload_activations=True), dynamic=False)
        off_step = make_step(offloaded, tokens, targets)
        off_points = memory_timeline(off_step, clock)
        with open(os.path.join(args.out, "offload_memory.svg"), "w") as handle:
            handle.write(svg_lines([("no offload (compiled)", plain_points), ("offload", off_points)],
                                   f"device bytes allocated over one step, S={seq}", "GiB"))
        overlap = overlap_timeline(off_step, clock, args.out)
        results["overlap_long"] = overlap["summary"]
        torch._dynamo.reset()  # the same timeline without offload: compute time the copies add
        compiled = torch.compile(model, backend=backend(), dynamic=False)
        results["overlap_long_compiled"] = overlap_timeline(make_step(compiled, tokens, targets),
                                                            clock, args.out)["summary"]
        with open(os.path.join(args.out, "offload_overlap.svg"), "w") as handle:
            handle.write(svg_overlap(overlap["events"], f"CUDA streams during one offload step, S={seq}"))
    results["total_wall_s"] = time.perf_counter() - started
    write_results(results, args.out)


def write_results(results, folder, quiet=False):
    results["summary"] = summarize(results)
    for name, text in (("offload.json", json.dumps(results, indent=1, default=str)),
                       ("offload.md", markdown(results))):
        with open(os.path.join(folder, name + ".tmp"), "w") as handle:
            handle.write(text)
        os.replace(os.path.join(folder, name + ".tmp"), os.path.join(folder, name))
    if not quiet:
        print(markdown(results))


def summarize(results):
    summary = {"targets": {"fraction_long_min": TARGET_FRACTION_LONG, "overhead_max": TARGET_OVERHEAD,
                           "hidden_share_8k_min": TARGET_HIDDEN_SHARE_8K,
                           "offload_vs_remat_at_equal_peak": "< 1.0"}}
    rows = {}
    for seq, run in results["runs"].items():
        if not all(isinstance(run.get(name), dict) and "times_s" in run[name]
                   for name in ("offload", "compiled")):
            continue  # cut short by the time limit (or out of memory)
        stats = run["offload"].get("pass", {})
        fraction = stats["offloaded_bytes"] / stats["activation_bytes"] if stats.get("activation_bytes") else 0.0
        planned = planner_saved_bytes(stats)
        plan = stats.get("remat_plan") or {}
        separate = run["offload"]["median_s"] / run["compiled"]["median_s"] - 1
        paired = run.get("paired")
        rows[seq] = {
            "planner_peak_without_offload_bytes": plan.get("min_cut_peak_bytes"),
            "planner_peak_with_offload_bytes": plan.get("planned_peak_bytes"),
            "offloaded_fraction": fraction,
            "planner_saved_bytes": planned,
            "offloaded_fraction_of_planner_saved": stats["offloaded_bytes"] / planned if planned else None,
            "overhead_vs_compiled": (paired["offload"]["median_s"] / paired["compiled"]["median_s"] - 1
                                     if paired else separate),
            "overhead_vs_compiled_separate_runs": separate,
            "overhead_measured_by": "alternating steps" if paired else "separate runs",
            "hideable_fraction": hideable(results, run, stats),
            "hideable_fraction_gpu_span": hideable(results, run, stats, "forward_gpu_span_s"),
            "model_hideable_fraction": model_hideable(plan, stats),
            "model_forward_vs_measured": (plan["model_forward_s"] / run["compiled"]["forward_graph_s"]
                                          if plan.get("model_forward_s") and run["compiled"].get("forward_graph_s")
                                          else None),
            "roofline_forward_vs_measured": (plan["roofline_forward_s"] / run["compiled"]["forward_graph_s"]
                                             if plan.get("roofline_forward_s") and run["compiled"].get("forward_graph_s")
                                             else None),
            **window_fractions(plan),
            **roofline_plan(run),
            **margin_variants(run),
            "op_timing": {k: v for k, v in (plan.get("op_timing") or {}).items() if k != "why"},
            "model_exposed_offload_ms": (plan["exposed_offload_s"] * 1e3
                                         if plan.get("exposed_offload_s") is not None else None),
            "peak_ratio_vs_compiled": _ratio(run["offload"]["peak_bytes"], run["compiled"]["peak_bytes"]),
        }
        if "planned" in run and "times_s" in run["planned"]:
            rows[seq]["overhead_vs_planner_partition"] = run["offload"]["median_s"] / run["planned"]["median_s"] - 1
            rows[seq]["planner_partition_vs_compiled"] = run["planned"]["median_s"] / run["compiled"]["median_s"] - 1
        if "eager" in run and "times_s" in run["eager"]:
            rows[seq]["overhead_vs_eager"] = run["offload"]["median_s"] / run["eager"]["median_s"] - 1
            if "save_on_cpu" in run and "times_s" in run["save_on_cpu"]:
                rows[seq]["save_on_cpu_overhead_vs_eager"] = (run["save_on_cpu"]["median_s"]
                                                              / run["eager"]["median_s"] - 1)
                rows[seq]["peak_ratio_save_on_cpu_vs_eager"] = _ratio(run["save_on_cpu"]["peak_bytes"],
                                                                      run["eager"]["peak_bytes"])
        if "remat" in run and "times_s" in run["remat"]:
            rows[seq]["offload_time_vs_remat"] = run["offload"]["median_s"] / run["remat"]["median_s"]
            rows[seq]["remat_peak_vs_offload_peak"] = _ratio(run["remat"]["peak_bytes"], run["offload"]["peak_bytes"])
    summary["per_seq"] = rows
    if rows:
        longest, shortest = max(rows, key=int), min(rows, key=int)
        summary["seq_long"] = int(longest)
        summary["offloaded_fraction_long"] = rows[longest]["offloaded_fraction"]
        summary["offloaded_fraction_long_of_planner_saved"] = rows[longest]["offloaded_fraction_of_planner_saved"]
        summary["overhead_long"] = rows[longest]["overhead_vs_compiled"]
        summary["seq_short"] = int(shortest)
        summary["offloaded_fraction_8k"] = rows[shortest]["offloaded_fraction"]
        summary["offloaded_fraction_8k_of_planner_saved"] = rows[shortest]["offloaded_fraction_of_planner_saved"]
        summary["overhead_8k"] = rows[shortest]["overhead_vs_compiled"]
        if rows[shortest]["hideable_fraction"]:
            summary["share_of_hideable_8k"] = (rows[shortest]["offloaded_fraction"]
                                               / rows[shortest]["hideable_fraction"])
    return summary


def planner_saved_bytes(stats):
    """Bytes of the saved tensors the joint planner priced (kept or offloaded): its table, where a
    saved view counts its base's bytes, once per base."""
    plan = stats.get("remat_plan") or {}
    return sum(row["bytes"] for row in plan.get("table", ()) if row["action"] in ("save", "offload"))


def hideable(results, run, stats, key="forward_graph_s"):
    """The transfer window's limit: bytes the D2H link moves during the forward graph / activation
    bytes (runs before forward_graph_s was measured: the forward with the loss). With
    ``forward_gpu_span_s``: the window from the forward's first kernel to its last."""
    link = results.get("host_link_gbps")
    window = run["compiled"].get(key, run["compiled"].get("forward_s") if key == "forward_graph_s" else None)
    if not link or not stats.get("activation_bytes") or window is None:
        return None
    return min(1.0, window * link["d2h"] * 1e9 / stats["activation_bytes"])


def margin_variants(run):
    """Offloaded fraction and paired overhead of the variants planned with a slower link."""
    rows = {}
    paired = run.get("paired") or {}
    for name, row in run.items():
        if not name.startswith("offload_link") or not isinstance(row, dict) or "times_s" not in row:
            continue
        stats = row.get("pass") or {}
        rows[name] = {"offloaded_fraction": (stats["offloaded_bytes"] / stats["activation_bytes"]
                                             if stats.get("activation_bytes") else None),
                      "overhead_separate_runs": row["median_s"] / run["compiled"]["median_s"] - 1}
        if name in paired and "compiled" in paired:
            rows[name]["overhead_vs_compiled"] = (paired[name]["median_s"]
                                                  / paired["compiled"]["median_s"] - 1)
    return {"link_margin_variants": rows} if rows else {}


def roofline_plan(run):
    """The offload variant planned with roofline op times (op_timing='model'), same run."""
    row = run.get("offload_roofline")
    if not isinstance(row, dict) or "times_s" not in row:
        return {}
    stats = row.get("pass") or {}
    return {"offloaded_fraction_roofline_plan": (stats["offloaded_bytes"] / stats["activation_bytes"]
                                                 if stats.get("activation_bytes") else None),
            "overhead_roofline_plan_separate_runs": row["median_s"] / run["compiled"]["median_s"] - 1}


def window_fractions(plan):
    """Shares of the saved bytes the planner's windows reach (with the op times it planned with):
    the forward's D2H queue alone, and with each reload also due before its first backward use."""
    windows = plan.get("offload_windows") or {}
    if not windows.get("saved_bytes"):
        return {}
    result = {"model_d2h_window_fraction": windows["d2h_window_bytes"] / windows["saved_bytes"],
              "model_both_windows_fraction": windows["d2h_and_h2d_window_bytes"] / windows["saved_bytes"]}
    if windows.get("forward_s"):  # where the modelled forward's link time goes
        result["model_d2h_idle_before_first_ms"] = windows["d2h_before_first_s"] * 1e3
        result["model_d2h_idle_gaps_ms"] = windows["d2h_gaps_s"] * 1e3
    return result


def model_hideable(plan, stats):
    """The same bound as ``hideable`` with the planner's own figures: its modelled forward time and
    link bandwidth. Below ``hideable`` when the cost model makes the forward shorter than it runs."""
    if not plan.get("model_forward_s") or not plan.get("host_link_gbps") or not stats.get("activation_bytes"):
        return None
    return min(1.0, plan["model_forward_s"] * plan["host_link_gbps"] * 1e9 / stats["activation_bytes"])


def _ratio(a, b):
    return a / b if b else None


def markdown(results):
    lines = [f"# Activation offload ({results['device']}, torch {results['torch']}, triton {results['triton']})",
             "",
             f"Llama {results['layers']} layers at dim {results['dim']}, {results['heads']} heads, ffn "
             f"{results['ffn']}, vocab {results['vocab']}, {results['dtype']}, B=1. Median step time "
             "(forward+loss+backward) and peak torch.cuda.max_memory_allocated. Remat baseline: "
             f"{results['remat_baseline']} at the activation peak the offload run reached. "
             "'compiled' uses torch's min-cut partition; 'offload' uses graphopt's planner partition "
             "plus offload, so its peak ratio also reflects the partition: the planner's simulated "
             "activation peak without / with offload is planner_peak_*_bytes below.", "",
             "| S | variant | step ms | peak GiB | offloaded / activation bytes |",
             "| --- | --- | --- | --- | --- |"]
    for seq, run in results["runs"].items():
        for name, row in run.items():
            if not isinstance(row, dict) or "peak_bytes" not in row:
                continue  # the paired phase has no peak of its own; see the summary
            stats = row.get("pass") or {}
            share = (f"{stats['offloaded_bytes'] / 2**30:.2f} / {stats['activation_bytes'] / 2**30:.2f} GiB"
                     if name == "offload" and stats.get("activation_bytes") else "")
            lines.append(f"| {seq} | {name} | {row['median_s'] * 1e3:.1f} | {row['peak_bytes'] / 2**30:.2f} | {share} |")
    summary = results.get("summary", {})
    lines += ["", "Summary (targets: >= 50% offloaded at S >= 64K with <= 3% overhead; at 8K >= 90% of "
              "what the transfer window hides at <= 3%; faster than remat at equal peak):", "",
              "```", json.dumps({k: v for k, v in summary.items() if k != "per_seq"}, indent=1), "```", ""]
    for seq, row in summary.get("per_seq", {}).items():
        lines.append(f"- S={seq}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in row.items()))
    lines += ["", *shortfalls(summary)]
    if results.get("overlap_long"):
        lines += ["", f"Overlap at the longest S: `{json.dumps(results['overlap_long'])}`"]
    if results.get("overlap_long_compiled"):
        lines += ["", f"Same S without offload (compiled): `{json.dumps(results['overlap_long_compiled'])}`"]
    if results.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(results["skipped"])]
    return "\n".join(lines) + "\n"


def shortfalls(summary):
    """Where a target is missed, what the measured numbers say about why."""
    notes = []
    for tag, seq_key in (("long", "seq_long"), ("8k", "seq_short")):
        fraction = summary.get(f"offloaded_fraction_{tag}")
        of_planned = summary.get(f"offloaded_fraction_{tag}_of_planner_saved")
        row = summary.get("per_seq", {}).get(str(summary.get(seq_key)), {})
        if fraction is None:
            continue
        if tag == "long" and fraction < TARGET_FRACTION_LONG and of_planned:
            notes.append(
                f"- S={summary[seq_key]}: {fraction:.0%} of the saved bytes went to the host, short of "
                f"{TARGET_FRACTION_LONG:.0%}. The joint planner priced "
                f"{row['planner_saved_bytes'] / 2**30:.2f} GiB of saved allocations (views by their base) "
                f"and offloaded {of_planned:.0%} of them: the rest is what its queue model says the "
                "host link cannot move without a stall (D2H before the end of the forward, H2D before "
                "each tensor's first backward use).")
        if tag == "8k" and summary.get("share_of_hideable_8k") is not None \
                and summary["share_of_hideable_8k"] < TARGET_HIDDEN_SHARE_8K:
            notes.append(
                f"- S={summary[seq_key]}: offloaded {fraction:.0%} of the saved bytes while the forward's "
                f"D2H window could carry {row['hideable_fraction']:.0%} "
                f"({summary['share_of_hideable_8k']:.0%} of it; the planner offloaded {of_planned:.0%} of "
                "what it priced). " + _window_reasons(row))
        overhead = summary.get(f"overhead_{tag}")
        if overhead is not None and overhead > TARGET_OVERHEAD:
            split = ""
            if row.get("overhead_vs_planner_partition") is not None:
                split = (f"; of it, graphopt's partition vs torch's min-cut: "
                         f"{row['planner_partition_vs_compiled']:+.1%}, the copies on that partition: "
                         f"{row['overhead_vs_planner_partition']:+.1%} (separate runs)")
            notes.append(f"- S={summary[seq_key]}: overhead {overhead:.1%} vs the {TARGET_OVERHEAD:.0%} target "
                         f"(medians of {row.get('overhead_measured_by', 'separate runs')}; see times_s "
                         f"in the JSON){split}.")
    for seq, row in summary.get("per_seq", {}).items():
        ratio = row.get("offload_time_vs_remat")
        if ratio is not None and ratio >= 1.0:
            notes.append(f"- S={seq}: offload is not faster than remat at equal peak "
                         f"({ratio:.3f}x its step time): recomputation is cheap at this length.")
    return ["Where targets are missed:", *notes] if notes else []


def _window_reasons(row):
    """What the planner's own figures say about the short fall, from the measured run."""
    parts = []
    if row.get("model_forward_vs_measured") and row.get("model_hideable_fraction"):
        mode = (row.get("op_timing") or {}).get("mode", "model")
        roofline = row.get("roofline_forward_vs_measured")
        parts.append(f"The planner's forward ({'measured op times' if mode == 'measure' else 'roofline'}) "
                     f"is {row['model_forward_vs_measured']:.2f}x the measured one"
                     + (f" (the roofline's {roofline:.2f}x)" if roofline and mode == "measure" else "")
                     + f": its own bound is {row['model_hideable_fraction']:.0%} of the activation bytes.")
    d2h, both = row.get("model_d2h_window_fraction"), row.get("model_both_windows_fraction")
    if d2h is not None and both is not None:
        parts.append(f"Of the saved bytes it priced, its D2H queue hides {d2h:.0%} in the forward and "
                     f"{both:.0%} once every reload must also arrive before its first backward use"
                     + (": the tensors produced last are the first the backward reads, so their reload "
                        "window is short and they stay on the device." if both < d2h - 0.02 else "."))
    if row.get("model_d2h_idle_before_first_ms") is not None:
        parts.append(f"In its forward the link idles {row['model_d2h_idle_before_first_ms']:.2f} ms before "
                     f"the first saved tensor exists and {row['model_d2h_idle_gaps_ms']:.2f} ms where the "
                     "copies catch up with production; after that the queue is full to the forward's end.")
    span = row.get("hideable_fraction_gpu_span")
    if span is not None and row.get("hideable_fraction"):
        parts.append(f"Counted from the forward's first kernel to its last (profiler) instead of events "
                     f"around the whole call, the window carries {span:.0%} "
                     f"(offloaded: {row['offloaded_fraction'] / span:.0%} of it).")
    if row.get("offloaded_fraction_roofline_plan") is not None:
        parts.append(f"Planned with roofline op times in the same run, the pass offloaded "
                     f"{row['offloaded_fraction_roofline_plan']:.0%}.")
    return " ".join(parts)


def _triton_version():
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    sys.exit(main())
