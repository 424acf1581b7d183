"""Inductor's caches stay correct under graphopt: equal flags hit, a changed flag never does."""

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.backends.graphopt_backend import GraphoptPartitioner, _CompileState
from graphopt.debug.dump import clear_compile_summaries, compile_summaries


def _uuid(**flags):
    state = _CompileState(graphopt.config.snapshot(**flags), "g", None, [])
    return GraphoptPartitioner(state).uuid()


def test_partitioner_uuid_covers_every_flag_and_the_profile(tmp_path):
    base = _uuid()
    assert base == _uuid()
    assert base != _uuid(overlap_chunks=3)
    assert base != _uuid(memory_budget="1GiB")
    import dataclasses
    import json
    from graphopt.analysis.device_profile import H100
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(H100.to_json()))
    with_profile = _uuid(device_profile=str(profile))
    assert with_profile != base
    profile.write_text(json.dumps(dataclasses.replace(H100, hbm_gbps=2000.0).to_json()))
    assert with_profile != _uuid(device_profile=str(profile))


@pytest.mark.slow
def test_equal_flags_hit_the_cache_and_a_changed_flag_recompiles(tmp_path, monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
    x = torch.randn(8, 16)

    def compile_and_run(**flags):
        torch._dynamo.reset()
        clear_compile_summaries()
        counters.clear()
        out = torch.compile(model, backend=graphopt.backend(**flags))(x)
        out.sum().backward()
        stages = [s["stage"] for s in compile_summaries()[0]["stages"]]
        return out.detach(), stages, counters["inductor"]["fxgraph_cache_hit"]

    first, stages, _ = compile_and_run(overlap_chunks=2)
    assert stages == ["pre_grad", "joint", "forward", "backward"]
    again, stages, hits = compile_and_run(overlap_chunks=2)
    assert stages == ["pre_grad"] and hits == 2  # served from the cache, same answer
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    _, stages, hits = compile_and_run(overlap_chunks=3)
    assert stages == ["pre_grad", "joint", "forward", "backward"]  # no stale hit
    # graphs graphopt's planner partitions compile with the planned-order scheduler pass, whose
    # uuid keys the cache: they are served from it too
    planned, stages, _ = compile_and_run(memory_budget=0.5)
    assert stages == ["pre_grad", "joint", "partition", "forward", "backward"]
    again, stages, hits = compile_and_run(memory_budget=0.5)
    assert stages == ["pre_grad"] and hits == 2
    torch.testing.assert_close(again, planned, rtol=0, atol=0)
