"""Where activation offload's step-time overhead goes: the step with graphopt's partition and no
copies ("planned") against the same step with offload, profiled in one run, kernel by kernel.

    python bench/profile_offload.py --out $OUT             # GPU: S = 8K, 2 layers, about 2 minutes
    python bench/profile_offload.py --out /tmp/p --smoke   # CPU: tiny model, host-side tables only

Both variants are the reference Llama at 7B dimensions under torch.compile(backend=graphopt) with the
eager codegen, as in bench/offload.py ("planned": memory_budget=1.0; "offload":
offload_activations=True). Per variant: the median of alternating timed steps (CUDA events), then
one profiled step, from which:

  kernels     device time per kernel name, summed over the step
  copies      device -> host, host -> device and device -> device copies: count and time
  streams     each stream's busy time; the step's span from its first kernel to its last
  gaps        idle stretches of the busiest stream longer than --gap-us, with the kernels around them
  host ops    count and host time of graphopt's custom ops (offload, offload_wait, reload, reload_wait)

The overhead the offload bench measures at S = 8K (offload vs planned, 3.6 % on 1 x H200) is then
split into: more device time in the same kernels (slowed beside the copies), new kernels, and
idle time of the busiest stream (waiting for the host or for a copy).
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
from graphopt.models.llama import Llama, LlamaConfig  # noqa: E402

COPY_KINDS = (("DtoH", "d2h"), ("HtoD", "h2d"), ("DtoD", "d2d"))


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
    copies = {kind: [0, 0.0] for _, kind in COPY_KINDS}
    by_stream = collections.defaultdict(list)
    for event in device:
        start, duration = float(event["ts"]), float(event["dur"])
        by_stream[event.get("args", {}).get("stream")].append((start, start + duration, event["name"]))
        if event["cat"] == "kernel":
            kernels[event["name"]] += duration
            continue
        for marker, kind in COPY_KINDS:
            if marker in event["name"]:
                copies[kind][0] += 1
                copies[kind][1] += duration
    streams = {str(stream): sum(end - start for start, end, _ in spans) / 1e3
               for stream, spans in by_stream.items()}
    busiest = max(by_stream, key=lambda s: streams[str(s)], default=None)
    host_ops = collections.defaultdict(lambda: [0, 0.0])
    for event in events:
        if event.get("cat") == "cpu_op" and event.get("name", "").startswith("graphopt::"):
            host_ops[event["name"]][0] += 1
            host_ops[event["name"]][1] += float(event.get("dur", 0.0))
    span_ms = ((max(e[1] for spans in by_stream.values() for e in spans)
                - min(e[0] for spans in by_stream.values() for e in spans)) / 1e3 if by_stream else None)
    return {
        "kernels_us": dict(kernels),
        "kernel_ms": sum(kernels.values()) / 1e3,
        "copies": {kind: {"count": count, "ms": us / 1e3} for kind, (count, us) in copies.items()},
        "stream_busy_ms": streams,
        "busiest_stream": str(busiest),
        "span_ms": span_ms,
        "gaps": _gaps(sorted(by_stream.get(busiest, [])), gap_us),
        "host_ops": {name: {"count": count, "ms": us / 1e3} for name, (count, us) in host_ops.items()},
    }


def _gaps(spans: list[tuple[float, float, str]], gap_us: float) -> list[dict]:
    """Idle stretches longer than ``gap_us`` between consecutive ops of one stream."""
    gaps, end, before = [], None, None
    for start, stop, name in spans:
        if end is not None and start - end > gap_us:
            gaps.append({"us": start - end, "after": before, "before": name})
        if end is None or stop > end:
            end, before = stop, name
    return sorted(gaps, key=lambda g: -g["us"])


def compare(planned: dict, offload: dict, top: int) -> dict:
    """Offload minus planned, per step: kernel time by name, idle time of the busiest stream."""
    names = set(planned["kernels_us"]) | set(offload["kernels_us"])
    delta = {n: offload["kernels_us"].get(n, 0.0) - planned["kernels_us"].get(n, 0.0) for n in names}
    new = {n: d for n, d in delta.items() if n not in planned["kernels_us"]}
    shared = {n: d for n, d in delta.items() if n in planned["kernels_us"]}

    def idle(profile):
        return sum(g["us"] for g in profile["gaps"]) / 1e3
    return {
        "kernel_ms_delta": offload["kernel_ms"] - planned["kernel_ms"],
        "shared_kernels_ms_delta": sum(shared.values()) / 1e3,
        "new_kernels_ms": sum(new.values()) / 1e3,
        "busiest_stream_gaps_ms": {"planned": idle(planned), "offload": idle(offload)},
        "span_ms_delta": (offload["span_ms"] - planned["span_ms"]
                          if offload["span_ms"] is not None and planned["span_ms"] is not None else None),
        "largest_kernel_deltas_us": sorted(delta.items(), key=lambda kv: -abs(kv[1]))[:top],
    }


def markdown(result: dict) -> str:
    lines = [f"# Offload overhead, kernel by kernel ({result['device']}, S={result['seq']}, "
             f"{result['layers']} layers)", "",
             f"torch {result['torch']}; median step (alternating): planned "
             f"{result['step_ms']['planned']:.2f} ms, offload {result['step_ms']['offload']:.2f} ms "
             f"({result['overhead']:+.1%})", ""]
    c = result["comparison"]
    lines += ["| per step | planned | offload |", "| --- | --- | --- |"]
    p, o = result["profiles"]["planned"], result["profiles"]["offload"]
    lines.append(f"| kernel time (ms) | {p['kernel_ms']:.2f} | {o['kernel_ms']:.2f} |")
    lines.append(f"| span, first kernel to last (ms) | {p['span_ms'] or 0:.2f} | {o['span_ms'] or 0:.2f} |")
    lines.append(f"| idle gaps of the busiest stream (ms) | {c['busiest_stream_gaps_ms']['planned']:.2f} | "
                 f"{c['busiest_stream_gaps_ms']['offload']:.2f} |")
    for kind in ("d2h", "h2d", "d2d"):
        lines.append(f"| {kind} copies (count, ms) | {p['copies'][kind]['count']}, "
                     f"{p['copies'][kind]['ms']:.2f} | {o['copies'][kind]['count']}, "
                     f"{o['copies'][kind]['ms']:.2f} |")
    host = sum(v["ms"] for v in o["host_ops"].values())
    lines.append(f"| host time of graphopt:: ops (ms) | - | {host:.2f} |")
    lines += ["", f"Kernel time: {c['kernel_ms_delta']:+.2f} ms, of which the planned step's kernels "
              f"{c['shared_kernels_ms_delta']:+.2f} ms and kernels only offload runs "
              f"{c['new_kernels_ms']:+.2f} ms.", "", "Largest kernel changes (us per step):", ""]
    lines += [f"- {delta:+.1f}  {name[:120]}" for name, delta in c["largest_kernel_deltas_us"]]
    lines += ["", "Longest idle gaps of the busiest stream with offload (us, kernel after, kernel before):", ""]
    lines += [f"- {g['us']:.0f}  after {str(g['after'])[:60]}  before {str(g['before'])[:60]}"
              for g in o["gaps"][:15]]
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

    def backend(**flags):
        return graphopt.backend(codegen="eager", **flags)

    variants = {"planned": backend(memory_budget=1.0), "offload": backend(offload_activations=True)}
    offload_bench.fresh_start(clock)
    steps = offload_bench.compiled_steps(model, tokens, targets, clock, variants)
    times = offload_bench.alternate(steps, clock, args.rounds)
    step_ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    profiles = {name: step_profile(step, clock, args.gap_us) for name, step in steps.items()}
    result = {"device": torch.cuda.get_device_name() if clock.cuda else "cpu", "torch": torch.__version__,
              "seq": seq, "layers": cfg.n_layers, "step_ms": step_ms,
              "overhead": step_ms["offload"] / step_ms["planned"] - 1.0, "profiles": profiles,
              "comparison": compare(profiles["planned"], profiles["offload"], args.top)}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "profile_offload.json"), "w") as handle:
        json.dump(result, handle, indent=1)
    text = markdown(result)
    with open(os.path.join(args.out, "profile_offload.md"), "w") as handle:
        handle.write(text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
