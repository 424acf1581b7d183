"""op_timing: measured op times for the planners, with an injected clock so the tests are exact.

The fake timers run the op (so the inputs really are built and the op really runs on them) and
return a figure derived from the node's roofline, so every expected number is known."""

import copy
import json

import pytest
import torch
import torch.nn as nn
from torch.fx.experimental.proxy_tensor import make_fx

import graphopt
from graphopt import _compat, config
from graphopt.analysis import cost_model
from graphopt.measure import op_timing
from graphopt.analysis.device_profile import CPU, DeviceProfile
from graphopt.debug.dump import compile_summaries
from graphopt.models.llama import Llama, LlamaConfig
from graphopt.ops import offload as _offload_ops  # noqa: F401  registers graphopt::offload
from graphopt.passes.manager import PassContext, run_stage
from graphopt.passes.pipeline import PLAN_REMATERIALIZATION
from graphopt.passes.plans import JointSignature

aten = torch.ops.aten
TIMEOUT_S = 300.0  # the agreement's wait (config.op_timing_agreement_timeout_s); one rank here


class ScaledRoofline:
    """A clock that runs the op once and reports ``scale`` x its roofline; counts calls per op."""

    def __init__(self, scale=1.0, profile=CPU, fail=None):
        self.scale, self.profile, self.fail = scale, profile, fail or {}
        self.calls = []

    def __call__(self, node, run):
        self.calls.append(str(node.target))
        error = self.fail.get(node.target)
        if error is not None:
            raise error
        run()
        return self.scale * cost_model.node_time(node, self.profile)


def fake_graph(fn, *shapes):
    return make_fx(fn, tracing_mode="fake")(*[torch.randn(*s) for s in shapes])


def _two_equal_layers(x, w1, w2):
    h = torch.relu(x @ w1) @ w2  # layer 1
    return torch.relu(h @ w1) @ w2  # layer 2: the same ops on the same shapes


def test_each_distinct_op_is_timed_once_and_cached_across_graphs():
    gm = fake_graph(_two_equal_layers, (64, 32), (32, 32), (32, 32))
    clock = ScaledRoofline(2.0)
    with op_timing.use_timer(clock) as cache:
        first = op_timing.time_graph(gm, CPU, "measure", TIMEOUT_S)
        # mm and relu on one signature each: 2 layers x (2 mm + 1 relu) = 6 nodes, 2 measurements
        mm_nodes = [n.name for n in gm.graph.nodes if n.target is aten.mm.default]
        assert len(mm_nodes) == 4 and set(mm_nodes) <= set(first.measured)
        assert sorted(clock.calls) == ["aten.mm.default", "aten.relu.default"]
        assert first.new_measurements == 2 and len(cache) == 2
        second = op_timing.time_graph(copy.deepcopy(gm), CPU, "measure", TIMEOUT_S)
    assert second.new_measurements == 0 and len(clock.calls) == 2
    for name, seconds in first.measured.items():
        assert seconds == pytest.approx(2.0 * first.modelled[name])
        assert first.times[name] == seconds == second.times[name]


def test_model_and_auto_on_cpu_keep_the_roofline_without_timing():
    gm = fake_graph(_two_equal_layers, (64, 32), (32, 32), (32, 32))
    clock = ScaledRoofline(5.0)
    with op_timing.use_timer(clock):
        for flag in ("model", "auto"):
            timing = op_timing.time_graph(gm, CPU, flag, TIMEOUT_S)
            assert timing.mode == "model" and not timing.measured
            assert timing.times == timing.modelled == cost_model.graph_times(gm, CPU)
    assert clock.calls == []
    assert "cpu" in op_timing.resolve_mode(config.snapshot().op_timing, torch.device("cpu"))[1]


def test_auto_with_several_ranks_measures_only_graphs_that_name_their_ranks(monkeypatch):
    monkeypatch.setattr(op_timing, "_world_size", lambda: 4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    cuda, auto = torch.device("cuda", 0), "auto"
    mode, why = op_timing.resolve_mode(auto, cuda, ranks=())
    assert mode == "model" and "names no process group" in why
    assert op_timing.resolve_mode(auto, cuda, ranks=(0, 1)) == ("measure", "op_timing='auto' on a GPU")
    assert op_timing.resolve_mode("measure", cuda, ranks=())[0] == "measure"


def test_a_rank_that_gets_no_agreed_times_plans_alone_and_says_so(monkeypatch):
    """Several ranks, and the leading rank publishes nothing in time: under 'auto' this rank keeps
    the roofline, under 'measure' it measures for itself; both say that ranks may now differ."""
    from graphopt.measure import agreement
    monkeypatch.setattr(op_timing, "_world_size", lambda: 2)
    monkeypatch.setattr(agreement, "graph_group_ranks", lambda gm: (0, 1))
    monkeypatch.setattr(op_timing, "resolve_mode", lambda flag, device, ranks: ("measure", "forced"))
    nothing = agreement.Agreement(None, 0, "rank 0 published nothing")
    monkeypatch.setattr(agreement, "agree", lambda *args: nothing)
    gm = fake_graph(_two_equal_layers, (64, 32), (32, 32), (32, 32))
    with op_timing.use_timer(ScaledRoofline(3.0)):
        auto = op_timing.time_graph(gm, CPU, "auto", TIMEOUT_S)
        measured = op_timing.time_graph(gm, CPU, "measure", TIMEOUT_S)
    assert auto.mode == "model" and not auto.measured and auto.times == auto.modelled
    assert measured.mode == "measure" and measured.measured
    for timing in (auto, measured):
        assert "rank 0 published nothing" in timing.why and "planned alone" in timing.why

def _unsafe_ops(x, w):
    a = x @ w
    noise = torch.rand_like(a)                  # random: would advance the generator
    b = a + noise
    b.add_(1.0)                                  # mutates its input
    _ = torch.ops.graphopt.offload(b, "test_op_timing", 1 << 16, 0, 0, 0, [32, 1])  # graphopt op
    return torch.tanh(b) @ w.t()


def test_unsafe_ops_keep_the_roofline_and_say_why():
    gm = fake_graph(_unsafe_ops, (64, 32), (32, 32))
    clock = ScaledRoofline(3.0)
    with op_timing.use_timer(clock):
        timing = op_timing.time_graph(gm, CPU, "measure", TIMEOUT_S)
    by_target = {str(n.target): n.name for n in gm.graph.nodes if n.op == "call_function"}
    reasons = {target: timing.refused.get(name) for target, name in by_target.items()}
    assert "random" in reasons["aten.rand_like.default"]
    assert "mutates" in reasons["aten.add_.Tensor"]
    assert "graphopt::" in reasons["graphopt.offload.default"]
    for target in ("aten.rand_like.default", "aten.add_.Tensor", "graphopt.offload.default"):
        name = by_target[target]
        assert target not in clock.calls
        assert timing.times[name] == timing.modelled[name]
    assert {"aten.mm.default", "aten.tanh.default", "aten.add.Tensor"} <= set(clock.calls)
    report = timing.report()
    assert report["refused_nodes"] == 3 and sum(report["refusals"].values()) == 3


def test_ops_that_fail_run_out_of_memory_or_do_not_fit_keep_the_roofline():
    gm = fake_graph(_two_equal_layers, (64, 32), (32, 32), (32, 32))
    clock = ScaledRoofline(2.0, fail={aten.mm.default: torch.OutOfMemoryError("CUDA out of memory"),
                                      aten.relu.default: RuntimeError("no kernel for this dtype")})
    with op_timing.use_timer(clock) as cache:
        timing = op_timing.time_graph(gm, CPU, "measure", TIMEOUT_S)
        reasons = set(timing.refused.values())
        assert reasons == {"out of memory when run alone", "failed when run alone: RuntimeError: no "
                           "kernel for this dtype"}
        assert timing.times == timing.modelled and not timing.measured
        # a failure is remembered; running out of memory is not (a later compile may fit)
        assert [m.reason for m in cache.values()] == ["failed when run alone: RuntimeError: no kernel "
                                                      "for this dtype"]
        op_timing.time_graph(gm, CPU, "measure", TIMEOUT_S)
    assert clock.calls == ["aten.mm.default", "aten.relu.default", "aten.mm.default"]


def test_ops_larger_than_the_free_memory_are_not_built(monkeypatch):
    gm = fake_graph(_two_equal_layers, (64, 32), (32, 32), (32, 32))
    monkeypatch.setattr(op_timing, "_free_bytes", lambda device: 4096)  # 4 KiB free
    clock = ScaledRoofline(2.0)
    with op_timing.use_timer(clock):
        timing = op_timing.time_graph(gm, CPU, "measure", TIMEOUT_S)
    assert clock.calls == [] and all("GiB free" in r for r in timing.refused.values())
    assert len(timing.refused) == 6


def test_inputs_have_the_meta_layout_and_the_user_rng_is_untouched():
    seen = []

    def layout(x, w):  # a transposed, offset view as an op input
        view = x.t()[1:]
        return view @ w

    gm = fake_graph(layout, (16, 8), (16, 4))

    class Recorder(ScaledRoofline):
        def __call__(self, node, run):
            if node.target is aten.mm.default:
                seen.append(node)
                run()
            return 1e-3

    state = torch.get_rng_state()
    with op_timing.use_timer(Recorder()):
        timing = op_timing.time_graph(gm, CPU, "measure", TIMEOUT_S)
    assert torch.equal(torch.get_rng_state(), state)
    (mm,) = seen
    key = timing.signatures[mm.name]
    (_, shape, stride, offset, dtype, _), _ = key[1]
    assert (shape, stride, offset, dtype) == ((7, 16), (1, 8), 1, "torch.float32")


# --- the planners use the measured times -------------------------------------------------------------

class Compiled:
    """AOTAutograd with graphopt's joint planner as the partitioner (eager graphs)."""

    def __init__(self, model, **flags):
        self.plan = None
        cfg = config.snapshot(codegen="eager", **flags)

        def partition(joint, inputs, **kwargs):
            ctx = PassContext("partition", cfg, "test_op_timing", list(inputs),
                              joint=JointSignature.of(kwargs))
            run_stage("partition", [PLAN_REMATERIALIZATION], joint, ctx)
            self.plan = ctx.plans.partition.report
            return ctx.plans.partition.forward, ctx.plans.partition.backward

        def nop(gm, _inputs):
            return _compat.make_boxed_func(gm.forward)

        backend = _compat.aot_autograd(fw_compiler=nop, bw_compiler=nop, partition_fn=partition,
                                       decompositions=_compat.core_aten_decompositions())
        torch._dynamo.reset()
        self.module = torch.compile(model, backend=backend)


@pytest.fixture(scope="module")
def slow_link(tmp_path_factory):
    """CPU figures with a host link slow enough that the forward window limits the offload."""
    path = tmp_path_factory.mktemp("profile") / "slow_link.json"
    profile = DeviceProfile("slow link", matmul_tflops=0.2, matmul_tflops_fp32=0.1, hbm_gbps=20.0,
                            allreduce_bus_gbps=5.0, p2p_gbps=5.0, host_link_gbps=0.5,
                            kernel_launch_s=2e-6)
    path.write_text(json.dumps(profile.to_json()))
    return str(path), profile


def _llama_plan(scale, profile_path, profile, **flags):
    torch.manual_seed(0)
    cfg = LlamaConfig.tiny(n_layers=2)
    model = Llama(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (1, 64))
    compiled = Compiled(model, device_profile=profile_path, **flags)
    clock = ScaledRoofline(scale, profile)
    with op_timing.use_timer(clock):
        compiled.module(tokens).float().pow(2).mean().backward()
    return compiled.plan, model


def test_a_longer_measured_forward_lets_the_planner_offload_more(slow_link):
    path, profile = slow_link
    modelled, _ = _llama_plan(1.0, path, profile, offload_activations=True, op_timing="model")
    measured, model = _llama_plan(4.0, path, profile, offload_activations=True, op_timing="measure")
    assert modelled["op_timing"]["mode"] == "model" and measured["op_timing"]["mode"] == "measure"
    # every op of the tiny Llama's joint graph was built and run (embedding indices included)
    assert measured["op_timing"]["refused_nodes"] == 0 and measured["op_timing"]["measured_nodes"] > 100
    assert measured["op_sum_forward_s"] == pytest.approx(4.0 * measured["roofline_forward_s"])
    assert modelled["op_sum_forward_s"] == pytest.approx(modelled["roofline_forward_s"])
    for plan in (modelled, measured):  # eager code: the ops one by one, plus the kept parts' copies
        assert plan["op_sum_forward_s"] <= plan["model_forward_s"] <= 1.01 * plan["op_sum_forward_s"]

    def offloaded(plan):
        return sum(row["bytes"] * row["alpha"] for row in plan["table"] if row["action"] == "offload")

    assert 0 < offloaded(modelled) < offloaded(measured)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_recompute_costs_are_the_measured_times():
    # ReLU: its backward reads the gradient, so no function of forward values alone (GELU's
    # derivative terms) joins the nodes the cut may place in either pass
    model = nn.Sequential(*[nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 32))
                            for _ in range(2)])
    x = torch.randn(256, 32, requires_grad=True)
    plans = {}
    op_timing.clear_cache()  # earlier tests measured ops of these shapes with other clocks
    for flag, scale in (("model", 1.0), ("measure", 3.0)):
        compiled = Compiled(copy.deepcopy(model), memory_budget=0.3, op_timing=flag)
        with op_timing.use_timer(ScaledRoofline(scale)):
            compiled.module(x).sum().backward()
        plans[flag] = compiled.plan
    assert plans["model"]["recomputed"] == plans["measure"]["recomputed"]
    assert plans["model"]["recompute_time_s"] > 0
    costs = {flag: {row["tensor"]: row["recompute_s"] for row in plans[flag]["table"]
                    if row["recompute_s"] is not None} for flag in plans}
    assert costs["model"].keys() == costs["measure"].keys() == set(plans["model"]["recomputed"])
    for name, modelled in costs["model"].items():
        # views (the weights' permutes) launch no kernel: they keep the roofline
        expected = modelled if name.startswith("permute") else 3.0 * modelled
        assert costs["measure"][name] == pytest.approx(expected), name
    assert plans["measure"]["recompute_time_s"] == pytest.approx(sum(costs["measure"].values()))


def test_dump_shows_measured_and_modelled_times(tmp_path):
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    with op_timing.use_timer(ScaledRoofline(2.0)), config.patch(dump_dir=str(tmp_path)):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=graphopt.backend(codegen="eager", memory_budget=0.5,
                                                                 op_timing="measure"))
        compiled(torch.randn(64, 32, requires_grad=True)).sum().backward()
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    table = (folder / "op_times.md").read_text()
    assert "| op | inputs | nodes | measured ms | roofline ms | measured / roofline |" in table
    assert "| aten.mm.default | float32[64, 32], float32[32, 64] |" in table and "| 2.00 |" in table
    note = compile_summaries()[-1]["notes"]["op_timing"]
    assert note["mode"] == "measure" and note["measured_nodes"] > 0 and note["table"]
