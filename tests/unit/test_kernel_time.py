"""kernel_time: a schedule priced as its code runs -- Inductor's kernels from their bytes, calls out
at their own times, what a kernel computes inside another free; the bandwidth measured on the
graph's own ops; the planner's modelled forward of a Llama as Inductor runs it."""

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from graphopt.analysis import cost_model, kernel_time, liveness
from graphopt.analysis.device_profile import CPU
from graphopt.analysis.liveness import Step
from graphopt.measure import op_timing

BANDWIDTH = 1e9  # 1 GB/s: 1e6 bytes take 1 ms
LAUNCH = 1e-5


def test_kernels_inductor_writes_cost_their_bytes_calls_out_their_time_inlined_values_nothing():
    steps = [Step("mm", 1_000_000, "mm", (), seconds=2e-3, value_bytes=1_000_000),
             Step("view", 0, "mm", ("mm",), seconds=0.0, value_bytes=1_000_000),
             Step("mul", 0, "mul", ("view",), kind="pointwise", value_bytes=1_000_000, inlined=True),
             Step("sum", 4, "sum", ("mul", "mm", "in:w"), kind="reduction", value_bytes=4)]
    seconds = kernel_time.step_seconds(steps, BANDWIDTH, LAUNCH, preloaded={"in:w": 500_000})
    # the reduction reads mm once (listed twice after inlining), the inlined value reads nothing
    # itself, and the graph input w: 1.5 MB read + 4 B written
    assert seconds == [2e-3, 0.0, 0.0, pytest.approx(LAUNCH + (1_500_004) / BANDWIDTH)]


def _chain(x, w):
    h = x @ w
    return (h.sin() * 2 + 1).relu().sum(-1)


def _node_seconds(gm, profile):
    return {n.name: cost_model.node_time(n, profile) for n in gm.graph.nodes}


def test_a_fused_chain_costs_one_kernel_where_op_by_op_costs_every_op():
    gm = make_fx(_chain, tracing_mode="fake")(torch.randn(1024, 256), torch.randn(256, 512))
    times = _node_seconds(gm, CPU)
    eager = kernel_time.graph_seconds(gm, times, 20e9, CPU.kernel_launch_s, fuse_pointwise=False)
    fused = kernel_time.graph_seconds(gm, times, 20e9, CPU.kernel_launch_s, fuse_pointwise=True)
    mm = next(n.name for n in gm.graph.nodes if n.target is torch.ops.aten.mm.default)
    pointwise = [n.name for n in gm.graph.nodes if n.op == "call_function" and n.name != mm
                 and "sum" not in n.name]
    assert eager == {n: times[n] for n in eager}                  # op by op: each op's own time
    assert fused[mm] == times[mm]                                  # the GEMM is a call out
    assert all(fused[n] == 0.0 for n in pointwise)                 # computed inside the sum
    reduction = next(n for n in fused if "sum" in n)
    h_bytes = 1024 * 512 * 4
    assert fused[reduction] == pytest.approx(CPU.kernel_launch_s + (h_bytes + 1024 * 4) / 20e9)
    memory_bound = [n for n in fused if n != mm]  # 5 kernels op by op, 1 fused
    assert sum(fused[n] for n in memory_bound) < 0.25 * sum(eager[n] for n in memory_bound)


def test_the_bandwidth_is_measured_on_the_graphs_large_elementwise_ops():
    gm = make_fx(lambda x: (x * 2).relu().sum(), tracing_mode="fake")(torch.randn(4096, 4096))
    names = {n.name: n for n in gm.graph.nodes}
    mul = next(n for n in names if n.startswith("mul"))
    relu = next(n for n in names if n.startswith("relu"))
    total = sum(4096 * 4096 * 4 * 2 for _ in (mul, relu))  # each reads and writes 64 MiB
    measured = {mul: 1e-3, relu: 3e-3, "sum": 5.0}          # the reduction is not elementwise
    assert op_timing.measured_bandwidth(gm, measured) == pytest.approx(total / 4e-3)
    small = make_fx(lambda x: x * 2, tracing_mode="fake")(torch.randn(16, 16))
    assert op_timing.measured_bandwidth(small, {n.name: 1e-6 for n in small.graph.nodes}) is None
    timing = op_timing.time_graph(small, CPU, "model", 1.0)
    assert op_timing.memory_bandwidth(timing, CPU) == pytest.approx(
        CPU.hbm_gbps * 1e9 * kernel_time.PROFILE_BANDWIDTH_SHARE)


def test_graph_timeline_can_hold_named_inputs_alive():
    gm = make_fx(lambda w, x: ((x @ w).relu() * 2).sum(), tracing_mode="fake")(
        torch.randn(64, 64), torch.randn(32, 64))
    w = next(iter(gm.graph.find_nodes(op="placeholder"))).name
    _, freed = liveness.graph_timeline(gm, hold_inputs=False)
    _, held = liveness.graph_timeline(gm, hold_inputs={w})
    assert held.live_bytes[-1] == freed.live_bytes[-1] + 64 * 64 * 4
