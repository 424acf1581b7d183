"""Where activation offload's step-time overhead goes, kernel by kernel: three variants profiled in
one run -- torch's min-cut partition ("compiled"), graphopt's partition without copies ("planned"),
and that partition with offload ("offload").

    python bench/profile_offload.py --out $OUT             # GPU: S = 8K, 2 layers, about 1 minute
    python bench/profile_offload.py --out /tmp/p --smoke   # CPU: tiny model, host-side tables only

All are the reference Llama at 7B dimensions under torch.compile(backend=graphopt) with the eager
codegen, as in bench/offload.py ("planned": memory_budget=1.0; "offload": offload_activations=True),
planning with a device profile measured first (``graphopt calibrate``) unless --no-calibrate. Per
variant: the median of alternating timed steps (CUDA events), then one profiled step, from which:

  kernels     device time per kernel name, summed over the step
  copies      device -> host, host -> device and device -> device copies: count, time, GB/s
  streams     each stream's busy time; the step's span from its first kernel to its last
  gaps        idle stretches of the busiest stream longer than --gap-us, with the kernels around them
  causes      what each gap waited for: the host, a device -> host or host -> device copy, or other
  host ops    count and host time of graphopt's custom ops (offload, offload_wait, reload, reload_wait)

The offload bench's overhead at S = 8K (offload vs compiled) is then split in two comparisons --
planned vs compiled (the partition) and offload vs planned (the copies) -- each into more device
time in the same kernels, new kernels, and idle time of the busiest stream by cause.
Writes profile_offload.json and .md.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import offload as offload_bench  # noqa: E402  (bench/offload.py: model, steps, clocks, traces)

import graphopt  # noqa: E402
from graphopt.debug import kernel_profile  # noqa: E402
from graphopt.models.llama import Llama, LlamaConfig  # noqa: E402

COPY_KINDS = (("DtoH", "d2h"), ("HtoD", "h2d"), ("DtoD", "d2d"))
CAUSE_WINDOW_US = 15.0  # a copy that ended this close before a gap's end is what the gap waited for


def step_profile(step, clock, gap_us: float) -> dict:
    """One profiled step (after one unprofiled): the tables of the module docstring."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if clock.cuda else [])
    step()
    clock.sync()
    with profile(activities=activities) as prof:
        step()
        clock.sync()
    events = offload_bench._trace_events(prof)
    device = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    kernels = collections.Counter()
    copies = {kind: [0, 0.0, 0] for _, kind in COPY_KINDS}
    copy_spans = {kind: [] for _, kind in COPY_KINDS}      # (start, end) of each copy, for the gaps
    by_stream = collections.defaultdict(list)
    for event in device:
        start, duration = float(event["ts"]), float(event["dur"])
        by_stream[event.get("args", {}).get("stream")].append(
            (start, start + duration, event["name"], event.get("args", {}).get("correlation")))
        if event["cat"] == "kernel":
            kernels[event["name"]] += duration
            continue
        for marker, kind in COPY_KINDS:
            if marker in event["name"]:
                copies[kind][0] += 1
                copies[kind][1] += duration
                copies[kind][2] += int(event.get("args", {}).get("bytes", 0))
                copy_spans[kind].append((start, start + duration))
    streams = {str(stream): sum(span[1] - span[0] for span in spans) / 1e3
               for stream, spans in by_stream.items()}
    busiest = max(by_stream, key=lambda s: streams[str(s)], default=None)
    host_ops = collections.defaultdict(lambda: [0, 0.0])
    for event in events:
        if event.get("cat") == "cpu_op" and event.get("name", "").startswith("graphopt::"):
            host_ops[event["name"]][0] += 1
            host_ops[event["name"]][1] += float(event.get("dur", 0.0))
    span_ms = ((max(e[1] for spans in by_stream.values() for e in spans)
                - min(e[0] for spans in by_stream.values() for e in spans)) / 1e3 if by_stream else None)
    gaps = _gaps(sorted(by_stream.get(busiest, [])), gap_us)
    _attribute_gaps(gaps, events, copy_spans)
    return {
        "kernels_us": dict(kernels),
        "kernel_ms": sum(kernels.values()) / 1e3,
        "copies": {kind: {"count": count, "ms": us / 1e3, "bytes": nbytes,
                          "gbps": nbytes / (us * 1e3) if us else None}
                   for kind, (count, us, nbytes) in copies.items()},
        "stream_busy_ms": streams,
        "busiest_stream": str(busiest),
        "span_ms": span_ms,
        "gaps": gaps,
        "gap_causes_ms": _gap_causes(gaps),
        "host_ops": {name: {"count": count, "ms": us / 1e3} for name, (count, us) in host_ops.items()},
    }


def _gaps(spans: list[tuple], gap_us: float) -> list[dict]:
    """Idle stretches longer than ``gap_us`` between consecutive ops of one stream
    (``kernel_profile.idle_gaps``), each with the correlation id of the op after it."""
    return [{**{key: value for key, value in gap.items() if key != "next"}, "correlation": gap["next"]}
            for gap in kernel_profile.idle_gaps(spans, gap_us)]


def _attribute_gaps(gaps: list[dict], events: list[dict], copies: dict[str, list]) -> None:
    """Name what each idle gap waited for, in place (``cause``):

      host   the op after the gap was launched (its CUDA runtime call ended) after the stream
             went idle: the stream ran dry waiting for the host;
      d2h / h2d
             a copy of that kind ended within ``CAUSE_WINDOW_US`` before the gap ended: the stream
             waited on that copy's event (graphopt::offload_wait / reload_wait);
      other  neither (an event wait on something else, or allocator work)."""
    launch_end = {}
    for event in events:
        if event.get("cat") == "cuda_runtime" and "correlation" in event.get("args", {}):
            launch_end[event["args"]["correlation"]] = float(event["ts"]) + float(event.get("dur", 0.0))
    for gap in gaps:
        launched = launch_end.get(gap.pop("correlation", None))
        if launched is not None and launched > gap["start"]:
            gap["cause"] = "host"
            continue
        gap["cause"] = "other"
        for kind in ("d2h", "h2d"):
            if any(gap["end"] - CAUSE_WINDOW_US <= stop <= gap["end"] + 1.0 for _, stop in copies[kind]):
                gap["cause"] = kind
                break


def _gap_causes(gaps: list[dict]) -> dict[str, float]:
    causes = collections.Counter()
    for gap in gaps:
        causes[gap["cause"]] += gap["us"] / 1e3
    return dict(causes)


def compare(base: dict, other: dict, top: int) -> dict:
    """``other`` minus ``base``, per step: kernel time by name, idle time of the busiest stream."""
    names = set(base["kernels_us"]) | set(other["kernels_us"])
    delta = {n: other["kernels_us"].get(n, 0.0) - base["kernels_us"].get(n, 0.0) for n in names}
    new = {n: d for n, d in delta.items() if n not in base["kernels_us"]}
    shared = {n: d for n, d in delta.items() if n in base["kernels_us"]}

    def idle(profile):
        return sum(g["us"] for g in profile["gaps"]) / 1e3
    return {
        "kernel_ms_delta": other["kernel_ms"] - base["kernel_ms"],
        "shared_kernels_ms_delta": sum(shared.values()) / 1e3,
        "new_kernels_ms": sum(new.values()) / 1e3,
        "busiest_stream_gaps_ms": {"base": idle(base), "other": idle(other)},
        "span_ms_delta": (other["span_ms"] - base["span_ms"]
                          if other["span_ms"] is not None and base["span_ms"] is not None else None),
        "largest_kernel_deltas_us": sorted(delta.items(), key=lambda kv: -abs(kv[1]))[:top],
    }


# (base, other, what the difference is)
COMPARISONS = (("compiled", "planned", "graphopt's partition vs torch's min-cut"),
               ("planned", "offload", "the offload copies on graphopt's partition"))


def _fmt_causes(profile: dict) -> str:
    return ", ".join(f"{cause} {ms:.2f} ms" for cause, ms in sorted(profile["gap_causes_ms"].items())) or "none"


def markdown(result: dict) -> str:
    names = list(result["profiles"])
    step = result["step_ms"]
    lines = [f"# Offload overhead, kernel by kernel ({result['device']}, S={result['seq']}, "
             f"{result['layers']} layers)", "",
             f"torch {result['torch']}; median step (alternating): "
             + ", ".join(f"{name} {step[name]:.2f} ms" for name in names), ""]
    profiles = [result["profiles"][name] for name in names]
    lines += ["| per step | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]

    def row(label, cell):
        lines.append(f"| {label} | " + " | ".join(cell(p) for p in profiles) + " |")
    row("kernel time (ms)", lambda p: f"{p['kernel_ms']:.2f}")
    row("span, first kernel to last (ms)", lambda p: f"{p['span_ms'] or 0:.2f}")
    row("idle gaps of the busiest stream (ms)", lambda p: f"{sum(g['us'] for g in p['gaps']) / 1e3:.2f}")
    row("idle gaps by cause (ms)", _fmt_causes)
    for kind in ("d2h", "h2d", "d2d"):
        row(f"{kind} copies (count, ms, GB/s)",
            lambda p, k=kind: f"{p['copies'][k]['count']}, {p['copies'][k]['ms']:.2f}, "
                              f"{p['copies'][k]['gbps'] or 0:.1f}")
    row("host time of graphopt:: ops (ms)", lambda p: f"{sum(v['ms'] for v in p['host_ops'].values()):.2f}")
    for key, c in result["comparisons"].items():
        base, other, what = next(entry for entry in COMPARISONS if f"{entry[1]}_vs_{entry[0]}" == key)
        lines += ["", f"## {other} vs {base}: {what}", "",
                  f"Step {step[other] / step[base] - 1:+.1%} (median); span {c['span_ms_delta'] or 0:+.2f} ms; "
                  f"kernel time {c['kernel_ms_delta']:+.2f} ms, of which kernels both run "
                  f"{c['shared_kernels_ms_delta']:+.2f} ms and kernels only {other} runs "
                  f"{c['new_kernels_ms']:+.2f} ms; idle gaps {c['busiest_stream_gaps_ms']['base']:.2f} -> "
                  f"{c['busiest_stream_gaps_ms']['other']:.2f} ms.", "", "Largest kernel changes (us per step):", ""]
        lines += [f"- {delta:+.1f}  {name[:120]}" for name, delta in c["largest_kernel_deltas_us"]]
    last = result["profiles"][names[-1]]
    lines += ["", f"Longest idle gaps of the busiest stream, {names[-1]} (us, cause, kernel after, kernel before):", ""]
    lines += [f"- {g['us']:.0f}  {g['cause']}  after {str(g['after'])[:60]}  before {str(g['before'])[:60]}"
              for g in last["gaps"][:15]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10, help="alternating timed steps per variant")
    parser.add_argument("--gap-us", type=float, default=20.0)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU")
    parser.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                        help="plan with the default device profile instead of one measured first")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        cfg, dtype, seq = LlamaConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=4, ffn_dim=128,
                                      vocab_size=256, max_seq_len=256), torch.float32, 128
    else:
        cfg, dtype, seq = LlamaConfig.llama2_7b(n_layers=args.layers), torch.bfloat16, args.seq
    clock = offload_bench.Clock(device)
    torch.manual_seed(0)
    model = Llama(cfg).to(device=device, dtype=dtype)
    tokens = torch.randint(0, cfg.vocab_size, (1, seq), device=device)
    targets = torch.randint(0, cfg.vocab_size, (1, seq), device=device)

    os.makedirs(args.out, exist_ok=True)
    profile_path = offload_bench.measured_profile(device, args.out) if args.calibrate else None

    def backend(**flags):  # both variants plan with the device profile bench/offload.py uses
        return graphopt.backend(codegen="eager", device_profile=profile_path, **flags)

    variants = {"compiled": backend(), "planned": backend(memory_budget=1.0),
                "offload": backend(offload_activations=True)}
    offload_bench.fresh_start(clock)
    steps = offload_bench.compiled_steps(model, tokens, targets, clock, variants)
    times = offload_bench.alternate(steps, clock, args.rounds)
    step_ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    profiles = {name: step_profile(step, clock, args.gap_us) for name, step in steps.items()}
    result = {"device": torch.cuda.get_device_name() if clock.cuda else "cpu", "torch": torch.__version__,
              "seq": seq, "layers": cfg.n_layers, "step_ms": step_ms,
              "overhead": step_ms["offload"] / step_ms["compiled"] - 1.0,
              "overhead_vs_planned": step_ms["offload"] / step_ms["planned"] - 1.0, "profiles": profiles,
              "comparisons": {f"{other}_vs_{base}": compare(profiles[base], profiles[other], args.top)
                              for base, other, _ in COMPARISONS}}
    with open(os.path.join(args.out, "profile_offload.json"), "w") as handle:
        json.dump(result, handle, indent=1)
    text = markdown(result)
    with open(os.path.join(args.out, "profile_offload.md"), "w") as handle:
        handle.write(text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
