"""Measured op times for the planners: each distinct op of a graph timed once on its device.

The roofline of ``cost_model`` prices a node from its FLOPs and bytes; on the lent H200s the
forward of the 7B reference layer runs about 1.2x longer than its roofline sum (attention below the
GEMM rate, pointwise ops below the HBM rate, launch gaps). The offload planner sizes the host-link
windows with these times and the remat planner prices recomputation with them, so a short model
hides less than the link could. Here each distinct op is run for real, at compile time::

    for node in graph:                               # call_function nodes that launch a kernel
        key = (op, per input: shape, stride, offset, dtype, device; constant arguments)
        if key not in cache:                          # repeated layers cost one measurement
            inputs = real tensors from node.meta      # random floats, zero integers and bools
            cache[key] = timer(node, lambda: op(*inputs))   # warm-up, then events around repeats
            del inputs                                # memory of the pass: one op's at a time
        time[node] = cache[key] if measured else roofline(node)

The mode (``config.op_timing``, handed in by the caller): "auto" measures graphs on a CUDA device
and keeps the roofline elsewhere; "measure" measures on any device (the CPU with a host clock);
"model" keeps the roofline.

Several ranks must make one plan, so they must plan with the same times: the lowest rank of the
process groups the graph's collectives name measures, and the others adopt its times through the
process group's store (``graphopt.measure.agreement``; the ranks compile the same graph, matched
by its structure, at the same point). A rank that gets no times within
``op_timing_agreement_timeout_s`` plans alone and says so: with the roofline under "auto", with its
own measurement under "measure". A graph that names no process group keeps the roofline under
"auto" (which ranks run it is unknown, so there is no one to agree with).

Refused (the roofline stays, and the log and the dump say why): collectives and graphopt:: ops
(their time depends on other ranks or on state), random ops (running them would advance the
generator; attention with dropout 0 is deterministic and timed), ops that mutate their inputs or
have other side effects, ops whose output shape depends on data, ops that move data between
devices, arguments that cannot be built from the meta, ops that do not fit in the free device
memory, and ops that fail or run out of memory in isolation. Integer and bool inputs are zeros,
so indices are in range whatever the op; float inputs are random from a private generator (the
user's random streams are not touched).

A measured time is the kernel time of the op on warm caches with its inputs built fresh, or the
launch rate where the host cannot keep the device busy (the step sees that too). It ignores
fusion: under Inductor a chain of pointwise ops costs less than the sum of their times.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import statistics
import time
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx

from graphopt import _compat
from graphopt.analysis import cost_model, kernel_time, op_facts
from graphopt.analysis.device_profile import DeviceProfile
from graphopt.measure import agreement

log = logging.getLogger("graphopt.measure.op_timing")

WARMUP = 1
REPEATS = 3
# Share of the device memory free for the timing pass that one op's inputs and outputs may take.
MEMORY_SHARE = 0.8

# (node, run) -> seconds of one call of run(); run() calls the op once on real inputs.
Timer = Callable[[fx.Node, Callable[[], Any]], float]


@dataclasses.dataclass(frozen=True)
class Measurement:
    """What timing one signature gave: seconds per call, or why it was not timed."""

    seconds: float | None
    reason: str | None = None
    retry: bool = False  # a refusal for want of memory: not cached, a later compile may fit


@dataclasses.dataclass
class GraphTiming:
    """Per node of one graph: the time the planners use, and where it came from."""

    mode: str                                   # "measure" or "model"
    why: str                                    # why this mode (auto's choice, or the flag)
    times: dict[str, float]                     # node -> seconds (measured, else roofline)
    modelled: dict[str, float]                  # node -> roofline seconds
    measured: dict[str, float]                  # node -> measured seconds
    refused: dict[str, str]                     # node -> why it kept the roofline
    signatures: dict[str, tuple]                # node -> its cache key (timed or refused nodes)
    new_measurements: int = 0
    elapsed_s: float = 0.0
    # Bandwidth the graph's measured memory-bound ops reached (``measured_bandwidth``), bytes read +
    # written per second; None where none was measured.
    memory_bytes_per_s: float | None = None

    def total(self, names) -> tuple[float, float]:
        """(planner seconds, roofline seconds) summed over ``names``."""
        names = list(names)
        return (math.fsum(self.times.get(n, 0.0) for n in names),
                math.fsum(self.modelled.get(n, 0.0) for n in names))

    def report(self) -> dict[str, Any]:
        """JSON for the dump: counts, refusals by reason, and per signature measured vs roofline."""
        rows: dict[tuple, dict[str, Any]] = {}
        for name, key in self.signatures.items():
            row = rows.setdefault(key, {"op": key[0], "inputs": _describe_inputs(key), "nodes": 0,
                                        "example": name, "measured_s": self.measured.get(name),
                                        "roofline_s": self.modelled.get(name, 0.0),
                                        "refused": self.refused.get(name)})
            row["nodes"] += 1
        reasons: dict[str, int] = {}
        for reason in self.refused.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        return {"mode": self.mode, "why": self.why, "measured_nodes": len(self.measured),
                "refused_nodes": len(self.refused), "distinct_ops": len(rows),
                "new_measurements": self.new_measurements, "elapsed_s": self.elapsed_s,
                "memory_gbps": None if self.memory_bytes_per_s is None else self.memory_bytes_per_s / 1e9,
                "refusals": reasons,
                "table": sorted(rows.values(), key=lambda r: -(r["measured_s"] or r["roofline_s"])
                                * r["nodes"])}


def table_markdown(report: dict[str, Any], title: str) -> str:
    """Measured vs roofline time per distinct op, largest total first."""
    lines = [f"# {title}", "",
             f"op_timing mode: {report['mode']} ({report['why']}); {report['measured_nodes']} nodes "
             f"measured, {report['refused_nodes']} kept the roofline; {report['new_measurements']} new "
             f"measurements in {report['elapsed_s']:.2f} s.", "",
             "| op | inputs | nodes | measured ms | roofline ms | measured / roofline | note |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in report["table"]:
        measured, roofline = row["measured_s"], row["roofline_s"]
        ratio = f"{measured / roofline:.2f}" if measured is not None and roofline else ""
        lines.append(f"| {row['op']} | {row['inputs']} | {row['nodes']} | "
                     f"{'' if measured is None else f'{measured * 1e3:.4f}'} | {roofline * 1e3:.4f} | "
                     f"{ratio} | {row['refused'] or ''} |")
    return "\n".join(lines) + "\n"


# --- the cache and the timer ---------------------------------------------------------------------

_cache: dict[tuple, Measurement] = {}
_timer_override: list[Timer] = []


@contextlib.contextmanager
def use_timer(timer: Timer) -> Iterator[dict[tuple, Measurement]]:
    """Time with ``timer`` and a fresh cache inside the scope (tests; other clocks). Yields the cache."""
    global _cache
    saved = _cache
    _cache = {}
    _timer_override.append(timer)
    try:
        yield _cache
    finally:
        _timer_override.pop()
        _cache = saved


def clear_cache() -> None:
    _cache.clear()


def cuda_event_timer(node: fx.Node, run: Callable[[], Any]) -> float:
    """Seconds per call: ``WARMUP`` calls, then CUDA events around ``REPEATS`` back-to-back calls."""
    for _ in range(WARMUP):
        run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPEATS):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / REPEATS


def host_timer(node: fx.Node, run: Callable[[], Any]) -> float:
    """Seconds per call on the CPU (synchronous ops): median of ``REPEATS`` after ``WARMUP``."""
    for _ in range(WARMUP):
        run()
    times = []
    for _ in range(REPEATS):
        begin = time.perf_counter()
        run()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def _timer_for(device: torch.device) -> Timer:
    if _timer_override:
        return _timer_override[-1]
    return cuda_event_timer if device.type == "cuda" else host_timer


# --- which mode, which device ----------------------------------------------------------------------

def graph_device(gm: fx.GraphModule) -> torch.device:
    """The accelerator the graph computes on (its first CUDA tensor), else the CPU."""
    for node in gm.graph.nodes:
        for value in _flat(node.meta.get("val")):
            if isinstance(value, torch.Tensor) and value.device.type == "cuda":
                return value.device
    return torch.device("cpu")


def resolve_mode(flag: str, device: torch.device, ranks: tuple[int, ...] = ()) -> tuple[str, str]:
    """("measure" | "model", why) for the mode ``flag`` (``config.op_timing``) on a graph computing
    on ``device``; ``ranks``: the ranks of the graph's process groups (``agreement.graph_group_ranks``)."""
    if flag == "model":
        return "model", "op_timing='model'"
    if flag == "measure":
        return "measure", f"op_timing='measure' on {device}"
    if device.type != "cuda":
        return "model", f"op_timing='auto' and the graph computes on {device.type}"
    if not torch.cuda.is_available():
        return "model", "op_timing='auto' and no CUDA device is visible"
    if _world_size() > 1 and len(ranks) < 2:
        return "model", ("op_timing='auto' in a run of several ranks, and the graph names no process "
                         "group: which ranks run it is unknown, so no rank can measure for the others "
                         "and every rank must make the same plan (set op_timing='measure' to measure "
                         "on each rank anyway)")
    return "measure", f"op_timing='auto' on {torch.cuda.get_device_name(device)}"


def _world_size() -> int:
    distributed = torch.distributed
    if distributed.is_available() and distributed.is_initialized():
        return distributed.get_world_size()
    return 1


# --- the pass over a graph -------------------------------------------------------------------------

def time_graph(gm: fx.GraphModule, profile: DeviceProfile, flag: str,
               agreement_timeout_s: float) -> GraphTiming:
    """Times of every node of ``gm``: measured where the mode ``flag`` (``config.op_timing``) and
    the op allow, the roofline on ``profile`` elsewhere; with several ranks, the times of the
    graph's leading rank, waited for at most ``agreement_timeout_s``
    (``config.op_timing_agreement_timeout_s``)."""
    device = graph_device(gm)
    ranks = agreement.graph_group_ranks(gm)
    mode, why = resolve_mode(flag, device, ranks)
    modelled = {node.name: cost_model.node_time(node, profile) for node in gm.graph.nodes}
    if mode == "measure" and len(ranks) > 1:
        return _agreed_timing(gm, device, flag, agreement_timeout_s, ranks, modelled, why)
    return _local_timing(gm, device, mode, why, modelled)


def _local_timing(gm: fx.GraphModule, device: torch.device, mode: str, why: str,
                  modelled: dict[str, float]) -> GraphTiming:
    timing = GraphTiming(mode, why, dict(modelled), modelled, {}, {}, {})
    if mode == "model":
        return timing
    begin = time.perf_counter()
    timer = _timer_for(device)
    retry_later: dict[tuple, Measurement] = {}  # out of memory: not cached, not retried in this graph
    for node in gm.graph.nodes:
        if not op_facts.launches_kernel(node):
            continue
        key = signature(node)
        if key is None:
            timing.refused[node.name] = "an argument is not a tensor, number or constant"
            continue
        timing.signatures[node.name] = key
        cached = _cache.get(key) or retry_later.get(key)
        if cached is None:
            cached = _measure(node, device, timer)
            (retry_later if cached.retry else _cache)[key] = cached
            timing.new_measurements += 1
            log.debug("timed %s %s: %s (roofline %.4f ms)", node.name, key[0],
                      f"{cached.seconds * 1e3:.4f} ms" if cached.seconds is not None else cached.reason,
                      modelled[node.name] * 1e3)
        if cached.seconds is None:
            timing.refused[node.name] = cached.reason
        else:
            timing.measured[node.name] = cached.seconds
            timing.times[node.name] = cached.seconds
    timing.elapsed_s = time.perf_counter() - begin
    timing.memory_bytes_per_s = measured_bandwidth(gm, timing.measured)
    planner, roofline = timing.total(timing.measured)
    log.info("op_timing: %d nodes measured (%d new measurements, %.2f s), %d kept the roofline; "
             "measured nodes %.3f ms vs roofline %.3f ms", len(timing.measured),
             timing.new_measurements, timing.elapsed_s, len(timing.refused), planner * 1e3,
             roofline * 1e3)
    for reason, count in timing.report()["refusals"].items():
        log.info("op_timing: roofline kept for %d nodes: %s", count, reason)
    return timing


def _agreed_timing(gm: fx.GraphModule, device: torch.device, flag: str, timeout_s: float,
                   ranks: tuple[int, ...], modelled: dict[str, float], why: str) -> GraphTiming:
    """The leading rank's times (measured there), or this rank's own where none came."""
    nodes = list(gm.graph.nodes)
    measured_here = []

    def measure_here() -> str:
        measured_here.append(True)
        return _encode(_local_timing(gm, device, "measure", why, modelled), nodes)

    begin = time.perf_counter()
    agreed = agreement.agree("op_timing", _fingerprint(nodes, device), ranks, measure_here, timeout_s)
    if agreed.payload is None:
        alone = "measure" if flag == "measure" else "model"
        log.warning("op_timing: %s; this rank plans with %s, so ranks may plan differently",
                    agreed.why, "its own measured times" if alone == "measure" else "the roofline")
        return _local_timing(gm, device, alone, f"{why}; {agreed.why}; planned alone", modelled)
    timing = _decode(agreed.payload, nodes, modelled, f"{why}; {agreed.why}")
    if not measured_here:  # adopted, or decided by an earlier compile of this graph
        timing.new_measurements = 0
        timing.elapsed_s = time.perf_counter() - begin
        log.info("op_timing: %s: %d nodes measured, waited %.2f s", agreed.why,
                 len(timing.measured), timing.elapsed_s)
    return timing


def _fingerprint(nodes: list[fx.Node], device: torch.device) -> str:
    """The graph's structure: per node its op, target, arguments, value (shapes, dtypes) and the
    positions of its inputs."""
    index = {node: i for i, node in enumerate(nodes)}
    groups = agreement.canonical_group_names(nodes)

    def canonical(value: Any) -> Any:
        if isinstance(value, tuple):
            return tuple(canonical(v) for v in value)
        return groups.get(value, value) if isinstance(value, str) else value

    return agreement.fingerprint([device.type] + [
        (node.op, str(node.target),
         canonical(signature(node)) if node.op == "call_function" else None,
         _value_description(node), tuple(index[n] for n in node.all_input_nodes))
        for node in nodes])


def _value_description(node: fx.Node) -> Any:
    try:
        return _describe_value(node.meta.get("val"))
    except _Unbuildable as error:
        return f"unbuildable {error}"


def _encode(timing: GraphTiming, nodes: list[fx.Node]) -> str:
    """The planner's times by node position (names may differ between ranks), and what was measured."""
    position = {node.name: i for i, node in enumerate(nodes)}
    return json.dumps({"times": [timing.times[node.name] for node in nodes],
                       "measured": sorted(position[n] for n in timing.measured),
                       "refused": {str(position[n]): reason for n, reason in timing.refused.items()},
                       "new_measurements": timing.new_measurements, "elapsed_s": timing.elapsed_s})


def _decode(payload: str, nodes: list[fx.Node], modelled: dict[str, float], why: str) -> GraphTiming:
    data = json.loads(payload)
    if len(data["times"]) != len(nodes):
        raise RuntimeError(f"op times for {len(data['times'])} nodes arrived for a graph of "
                           f"{len(nodes)} nodes under the same fingerprint; report this as a bug")
    times = {node.name: seconds for node, seconds in zip(nodes, data["times"])}
    measured = {nodes[i].name: times[nodes[i].name] for i in data["measured"]}
    refused = {nodes[int(i)].name: reason for i, reason in data["refused"].items()}
    by_name = {node.name: node for node in nodes}
    signatures = {name: key for name in [*measured, *refused]
                  if (key := signature(by_name[name])) is not None}
    return GraphTiming("measure", why, times, modelled, measured, refused, signatures,
                       data["new_measurements"], data["elapsed_s"],
                       measured_bandwidth_of(nodes, measured))


def graph_times(gm: fx.GraphModule, profile: DeviceProfile, flag: str,
                agreement_timeout_s: float) -> dict[str, float]:
    """Seconds per node name: measured where allowed (see ``time_graph``), else the roofline."""
    return time_graph(gm, profile, flag, agreement_timeout_s).times


def codegen_times(gm: fx.GraphModule, profile: DeviceProfile, flag: str, agreement_timeout_s: float,
                  fuse_pointwise: bool) -> dict[str, float]:
    """Seconds per node name as the graph's code runs: each op's own time (``graph_times``), or
    under Inductor (``fuse_pointwise``) the time of the kernel Inductor writes for it, 0 where it
    is computed inside another kernel (``analysis/kernel_time``)."""
    timing = time_graph(gm, profile, flag, agreement_timeout_s)
    return kernel_time.graph_seconds(gm, timing.times, memory_bandwidth(timing, profile),
                                     profile.kernel_launch_s, fuse_pointwise)


# Memory-bound ops smaller than this say more about launch latency than bandwidth: left out of
# the measured bandwidth.
BANDWIDTH_SAMPLE_MIN_BYTES = 32 * 2**20


def measured_bandwidth(gm: fx.GraphModule, measured: dict[str, float]) -> float | None:
    """Bytes per second (read + written) the graph's measured elementwise ops reached, over every
    one moving at least ``BANDWIDTH_SAMPLE_MIN_BYTES``: the rate Inductor's own memory-bound
    kernels are priced at (``analysis/kernel_time``); None where none qualifies."""
    return measured_bandwidth_of(list(gm.graph.nodes), measured)


def measured_bandwidth_of(nodes: list[fx.Node], measured: dict[str, float]) -> float | None:
    moved = seconds = 0.0
    for node in nodes:
        if node.name not in measured or op_facts.fusion_kind(node) != "pointwise":
            continue
        nbytes = cost_model.tensor_nbytes(node.meta.get("val")) + sum(
            cost_model.tensor_nbytes(op_facts.val(i)) for i in node.all_input_nodes)
        if nbytes >= BANDWIDTH_SAMPLE_MIN_BYTES and measured[node.name] > 0:
            moved += nbytes
            seconds += measured[node.name]
    return moved / seconds if seconds else None


def memory_bandwidth(timing: GraphTiming, profile: DeviceProfile) -> float:
    """Bytes per second the planners price Inductor's memory-bound kernels at: measured on the
    graph's own ops where ``timing`` has them, else ``kernel_time.PROFILE_BANDWIDTH_SHARE`` of the
    profile's peak."""
    if timing.memory_bytes_per_s:
        return timing.memory_bytes_per_s
    return profile.hbm_gbps * 1e9 * kernel_time.PROFILE_BANDWIDTH_SHARE


# --- signatures and refusals ----------------------------------------------------------------------

def signature(node: fx.Node) -> tuple | None:
    """The cache key of a node: its op and a description of every argument (None if unbuildable)."""
    try:
        args = tuple(_describe(a) for a in node.args)
        kwargs = tuple(sorted((k, _describe(v)) for k, v in node.kwargs.items()))
    except _Unbuildable:
        return None
    return (str(node.target), args, kwargs)


class _Unbuildable(Exception):
    pass


def _describe(arg: Any) -> Any:
    if isinstance(arg, fx.Node):
        return _describe_value(arg.meta.get("val"))
    if isinstance(arg, (list, tuple)):
        return tuple(_describe(a) for a in arg)
    return _describe_value(arg)


def _describe_value(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(_compat.hint_int(s) for s in value.shape),
                tuple(_compat.hint_int(s) for s in value.stride()),
                _compat.hint_int(value.storage_offset()), str(value.dtype), value.device.type)
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return _hint(value)
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device,
                                           torch.layout, torch.memory_format)):
        return value
    if isinstance(value, (list, tuple)):
        return tuple(_describe_value(v) for v in value)
    raise _Unbuildable(type(value).__name__)


def _describe_inputs(key: tuple) -> str:
    """``bfloat16[8192, 4096], ...`` for the tensor arguments of a signature."""
    shapes = []

    def visit(arg: Any) -> None:
        if isinstance(arg, tuple) and len(arg) == 6 and arg[0] == "tensor":
            shapes.append(f"{arg[4].replace('torch.', '')}{list(arg[1])}")
        elif isinstance(arg, tuple):
            for item in arg:
                visit(item)

    visit(key[1])
    return ", ".join(shapes)


def why_not_timed(node: fx.Node, device: torch.device) -> str | None:
    """Why timing ``node`` alone would be unsafe or meaningless, or None."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return "not an operator overload (a higher-order op or a Python function)"
    if op_facts.communicates(node):
        return (f"{target.namespace}:: op: it communicates or keeps state, so its time alone "
                "means nothing")
    if op_facts.is_in_place(node):
        return "mutates its inputs"
    random = op_facts.is_random(node)
    if random and not _deterministic_attention(node):
        return "random: running it would advance the random generator"
    if op_facts.output_depends_on_data(node):
        return "its output depends on the data"
    if not random and node.is_impure():
        return "has side effects"
    devices = {v.device.type for v in _flat([op_facts.val(a) for a in node.all_input_nodes]
                                              + [node.meta.get("val")])
               if isinstance(v, torch.Tensor)} - {"meta"}
    if devices - {device.type}:
        return f"moves data between devices ({', '.join(sorted(devices))})"
    return None


def _deterministic_attention(node: fx.Node) -> bool:
    """Attention whose only randomness is dropout, with dropout 0."""
    return op_facts.is_attention(node) and op_facts.argument(node, "dropout_p") == 0


# --- running one op on real inputs ------------------------------------------------------------------

def _measure(node: fx.Node, device: torch.device, timer: Timer) -> Measurement:
    reason = why_not_timed(node, device)
    if reason is not None:
        return Measurement(None, reason)
    need = _bytes_needed(node)
    free = _free_bytes(device)
    if free is not None and need > MEMORY_SHARE * free:
        return Measurement(None, f"needs {need / 2**30:.2f} GiB of device memory, "
                                 f"{free / 2**30:.2f} GiB free", retry=True)
    with _compat.real_tensors(), torch.no_grad():
        try:
            generator = torch.Generator(device=device)
            generator.manual_seed(0)
            built: dict[fx.Node, Any] = {}
            args = tuple(_build(a, device, generator, built) for a in node.args)
            kwargs = {k: _build(v, device, generator, built) for k, v in node.kwargs.items()}
        except torch.OutOfMemoryError:
            return Measurement(None, "out of memory while building its inputs", retry=True)
        except Exception as error:  # a meta value this builder cannot turn into a tensor
            return Measurement(None, f"inputs cannot be built: {_first_line(error)}")
        target = node.target

        def run() -> None:
            target(*args, **kwargs)

        try:
            seconds = timer(node, run)
        except torch.OutOfMemoryError:
            return Measurement(None, "out of memory when run alone", retry=True)
        except Exception as error:
            return Measurement(None, f"failed when run alone: {_first_line(error)}")
        finally:
            del args, kwargs, built
    return Measurement(float(seconds))


def _build(arg: Any, device: torch.device, generator: torch.Generator, built: dict) -> Any:
    if isinstance(arg, fx.Node):
        if arg not in built:
            built[arg] = _real(arg.meta.get("val"), device, generator)
        return built[arg]
    if isinstance(arg, (list, tuple)):
        return type(arg)(_build(a, device, generator, built) for a in arg)
    if isinstance(arg, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return _hint(arg)
    return arg


def _real(value: Any, device: torch.device, generator: torch.Generator) -> Any:
    """A real value like the meta value: tensors with its shape, strides, offset and dtype."""
    if isinstance(value, torch.Tensor):
        shape = [_compat.hint_int(s) for s in value.shape]
        stride = [_compat.hint_int(s) for s in value.stride()]
        offset = _compat.hint_int(value.storage_offset())
        numel = offset + 1 + sum((s - 1) * st for s, st in zip(shape, stride)) if all(shape) else 0
        base = torch.empty(numel, dtype=value.dtype, device=device)
        if value.dtype.is_floating_point or value.dtype.is_complex:
            try:
                base.normal_(generator=generator)
            except (RuntimeError, NotImplementedError):  # float8 and other types without normal_
                base.zero_()
        else:
            base.zero_()  # indices and masks: 0 is in range for every op
        return base.as_strided(shape, stride, offset)
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return _hint(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_real(v, device, generator) for v in value)
    return value


def _hint(value: Any) -> Any:
    """The value Dynamo saw for a symbolic int, float or bool."""
    if isinstance(value, torch.SymInt):
        return _compat.hint_int(value)
    kind = float if isinstance(value, torch.SymFloat) else bool
    return kind(value.node.hint)


def _bytes_needed(node: fx.Node) -> int:
    inputs = sum(cost_model.tensor_nbytes(op_facts.val(a)) for a in set(node.all_input_nodes))
    return inputs + cost_model.tensor_nbytes(node.meta.get("val")) + cost_model.workspace_bytes(node)


def _free_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free + cached


def _flat(value: Any) -> list:
    if isinstance(value, (list, tuple)):
        return [item for v in value for item in _flat(v)]
    return [value]


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:200]
