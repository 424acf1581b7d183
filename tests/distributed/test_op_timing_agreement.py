"""Every rank plans with the same op times: the graph's leading rank measures, the others adopt.

Four gloo processes, each with a clock of its own (``RankClock``), so a rank that measured for
itself would hold other times than rank 0. Cases:
- a graph over WORLD: ranks 1-3 adopt rank 0's times and never run their clock;
- a 2 x 2 mesh graph (tensor-parallel groups {0, 1}, {2, 3}; data-parallel {0, 2}, {1, 3}): rank 3's
  leader is rank 1, which hands on rank 0's times;
- ranks that compile different graphs: rank 0 decides for its own, the others wait out the
  timeout and plan alone, and say so;
- ranks 1-3 compile the WORLD graph again (a recompile on some ranks only): they use the times
  they adopted, at once, with no leader to answer;
- a model compiled with the remat planner: every rank makes the same plan.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.fx.experimental.proxy_tensor import make_fx

from graphopt.distributed.launch import spawn

WORLD = 4


class RankClock:
    """Reports the op's roofline on the CPU profile, matmuls (rank + 1) x slower and other ops
    (rank + 1) x faster, so each rank alone would price recomputation differently; counts calls."""

    def __init__(self, rank: int):
        self.rank = rank
        self.calls = 0

    def __call__(self, node, run):
        from graphopt.analysis import cost_model
        from graphopt.analysis.device_profile import CPU
        self.calls += 1
        run()
        scale = self.rank + 1.0
        matmul = "mm" in str(node.target)
        return (scale if matmul else 1 / scale) * cost_model.node_time(node, CPU)


def _reduced_mlp(group_names: list[str]):
    funcol = torch.ops._c10d_functional

    def fn(x, w1, w2):
        h = torch.relu(x @ w1) @ w2
        for name in group_names:
            h = funcol.wait_tensor(funcol.all_reduce(h, "sum", name))
        return torch.tanh(h)
    return fn


def _times(group_names, rows, timeout_s, rank):
    from graphopt import config
    from graphopt.measure import op_timing
    from graphopt.analysis.device_profile import CPU
    gm = make_fx(_reduced_mlp(group_names), tracing_mode="fake")(
        torch.randn(rows, 16), torch.randn(16, 16), torch.randn(16, 16))
    clock = RankClock(rank)
    with op_timing.use_timer(clock):
        timing = op_timing.time_graph(gm, CPU, "measure", timeout_s)
    nodes = [n.name for n in gm.graph.nodes]
    return {"times": [timing.times[n] for n in nodes], "measured": len(timing.measured),
            "calls": clock.calls, "why": timing.why}


class _Model(nn.Module):
    def __init__(self, group_name: str):
        super().__init__()
        self.group_name = group_name
        self.layers = nn.ModuleList(nn.Linear(32, 32) for _ in range(3))

    def forward(self, x):
        import torch.distributed._functional_collectives as funcol
        for layer in self.layers:
            x = torch.tanh(layer(x)) * torch.sigmoid(x)
        return funcol.all_reduce(x, "sum", self.group_name).square().sum()


def _plan(rank: int):
    import graphopt
    from graphopt import _compat
    from graphopt.measure import op_timing
    from graphopt.debug.dump import clear_compile_summaries, compile_summaries
    torch.manual_seed(0)
    model = _Model(_compat.group_name(dist.group.WORLD))
    clear_compile_summaries()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=graphopt.backend(
        codegen="eager", memory_budget=0.6, op_timing="measure", op_timing_agreement_timeout_s=60))
    with op_timing.use_timer(RankClock(rank)):
        compiled(torch.randn(512, 32, requires_grad=True)).backward()
    notes = [s["notes"] for s in compile_summaries() if "remat_plan" in s.get("notes", {})]
    assert len(notes) == 1, [sorted(s) for s in compile_summaries()]
    table = notes[0]["remat_plan"]["table"]
    return {"actions": [(row["tensor"], row["action"]) for row in table],
            "why": notes[0]["op_timing"]["why"], "mode": notes[0]["op_timing"]["mode"]}


def _cases(rank: int, world_size: int):
    from graphopt import _compat
    tp = [dist.new_group([0, 1]), dist.new_group([2, 3])][rank // 2]
    dp = [dist.new_group([0, 2]), dist.new_group([1, 3])][rank % 2]
    world = _compat.group_name(dist.group.WORLD)
    results = {
        "world": _times([world], 8, 60, rank),
        "mesh": _times([_compat.group_name(tp), _compat.group_name(dp)], 8, 60, rank),
        "different": _times([world], 8 + rank, 2, rank),  # other shapes on every rank
        "again": _times([world], 8, 2, rank) if rank else None,
        "plan": _plan(rank),
    }
    dist.barrier()
    return results


def test_every_rank_plans_with_the_leading_ranks_times():
    results = spawn(_cases, WORLD)
    for case in ("world", "mesh"):
        leader = results[0][case]
        assert leader["calls"] > 0 and leader["measured"] > 0, case
        assert "decided on rank 0" in leader["why"]
        for rank in range(1, WORLD):
            got = results[rank][case]
            assert got["times"] == leader["times"], (case, rank)
            assert got["calls"] == 0, (case, rank)  # nothing measured on followers
            assert got["measured"] == leader["measured"]
    assert "adopted from rank 1" in results[3]["mesh"]["why"]  # rank 1 handed rank 0's times on
    assert "adopted from rank 0" in results[1]["mesh"]["why"]

    different = [r["different"] for r in results]
    assert "decided on rank 0" in different[0]["why"]
    for rank in range(1, WORLD):
        assert "published nothing" in different[rank]["why"] and "planned alone" in different[rank]["why"]
        assert different[rank]["calls"] > 0  # 'measure': it measured for itself

    for rank in range(1, WORLD):
        again = results[rank]["again"]
        assert again["times"] == results[0]["world"]["times"] and again["calls"] == 0, rank
        assert "adopted from rank 0" in again["why"]

    plans = [r["plan"] for r in results]
    assert all(p["mode"] == "measure" for p in plans)
    for rank in range(1, WORLD):
        assert plans[rank]["actions"] == plans[0]["actions"]
        assert "adopted from rank 0" in plans[rank]["why"]
