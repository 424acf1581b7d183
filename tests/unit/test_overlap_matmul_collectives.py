"""Graph tests of overlap_matmul_collectives under a fake process group (no peers, no numerics)."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import graphopt
from graphopt import _compat
from graphopt.config import snapshot
from graphopt.debug.dump import compile_summaries
from graphopt.passes.manager import PassContext
from graphopt.passes.overlap_matmul_collectives import overlap_matmul_collectives

WORLD = 2


@pytest.fixture(scope="module", autouse=True)
def fake_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    _compat.fake_process_group(0, WORLD)
    yield
    dist.destroy_process_group()


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 32, bias=False)
        self.down = nn.Linear(32, 16, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _tensor_parallel(sequence_parallel: bool) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    mesh = init_device_mesh("cpu", (WORLD,))
    plan = ({"up": ColwiseParallel(input_layouts=Shard(1)), "down": RowwiseParallel(output_layouts=Shard(1))}
            if sequence_parallel else {"up": ColwiseParallel(), "down": RowwiseParallel()})
    return parallelize_module(TwoLinears(), mesh, plan)


def _stage_code(dump: str, stage: str) -> str:
    files = sorted(glob.glob(os.path.join(dump, "**", f"*_{stage}.py"), recursive=True))
    assert files, f"no {stage} graph dumped under {dump}"
    return "".join(open(path).read() for path in files)


def _compile_and_run(module, dump, mode="chunked", grad=True, **flags):
    torch._dynamo.reset()
    compiled = torch.compile(module, backend=graphopt.backend(
        codegen="eager", overlap_matmul_collectives=True, overlap_mode=mode, dump_dir=str(dump),
        debug=True, **flags))
    x = torch.randn(2, 8, 16, requires_grad=grad)
    out = compiled(x)
    if grad:
        out.sum().backward()
    return out


def test_row_parallel_forward_and_backward_sites_are_fused(tmp_path):
    _compile_and_run(_tensor_parallel(sequence_parallel=False), tmp_path)
    joint = _stage_code(tmp_path, "joint.overlap_matmul_collectives")
    # forward: row-parallel down projection; backward: input grad of the column-parallel up projection
    assert joint.count("graphopt.matmul_all_reduce.default(") == 2
    assert "_c10d_functional.all_reduce" not in joint
    forward, backward = _stage_code(tmp_path, "forward"), _stage_code(tmp_path, "backward")
    assert forward.count("graphopt.matmul_all_reduce.default(") == 1
    assert backward.count("graphopt.matmul_all_reduce.default(") == 1  # not recomputed, not moved
    assert "_c10d_functional" not in forward + backward


def test_sequence_parallel_gather_and_scatter_sites_are_fused(tmp_path):
    _compile_and_run(_tensor_parallel(sequence_parallel=True), tmp_path)
    joint = _stage_code(tmp_path, "joint.overlap_matmul_collectives")
    assert joint.count("graphopt.all_gather_matmul.default(") == 2       # fw input, bw grad_output
    assert joint.count("graphopt.matmul_reduce_scatter.default(") == 2   # fw output, bw input grad
    for collective in ("all_gather_into_tensor", "reduce_scatter_tensor", "aten.cat"):
        assert collective not in joint, collective
    forward, backward = _stage_code(tmp_path, "forward"), _stage_code(tmp_path, "backward")
    assert forward.count("graphopt.all_gather_matmul.default(") == 1
    assert forward.count("graphopt.matmul_reduce_scatter.default(") == 1
    assert backward.count("graphopt.all_gather_matmul.default(") == 1
    assert backward.count("graphopt.matmul_reduce_scatter.default(") == 1


def _last_pass_summary():
    for summary in reversed(compile_summaries()):
        for entry in summary["passes"]:
            if entry["pass"] == "overlap_matmul_collectives" and entry.get("ran"):
                return entry
    raise AssertionError("overlap_matmul_collectives did not run")


def _functional(fn):
    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(16, 12))

        def forward(self, x):
            return fn(x.flatten(0, 1), self.w)
    return Wrapped()


def _group():
    return _compat.group_name(None)


class InPlaceAllReduce(nn.Module):
    """A row-parallel linear whose output a user reduces in place: ``dist.all_reduce(y)``.

    form: "2d" (the input flattened to rows first), "3d" ([B, S, D] straight into the linear:
    the mm's output is viewed back to 3-D, and that view is read by the all-reduce and by the
    copy Dynamo writes the result back with), "4d"; "+bias" adds the linear's bias (addmm)."""

    def __init__(self, form: str):
        super().__init__()
        self.rank_of_input = {"2d": 2, "3d": 3, "4d": 4}[form.split("+")[0]]
        self.linear = nn.Linear(16, 12, bias=form.endswith("+bias"))

    def forward(self, x):
        x = x.flatten(0, 1) if self.rank_of_input == 2 else x
        x = x.unflatten(1, (2, 4)) if self.rank_of_input == 4 else x
        y = self.linear(x)
        dist.all_reduce(y)
        return y.relu()


IN_PLACE_FORMS = ("2d", "2d+bias", "3d", "3d+bias", "4d+bias")


@pytest.mark.parametrize("form", IN_PLACE_FORMS)
def test_in_place_dist_all_reduce_of_a_linear_of_any_rank_is_fused(tmp_path, form):
    _compile_and_run(InPlaceAllReduce(form), tmp_path)
    joint = _stage_code(tmp_path, "joint.overlap_matmul_collectives")
    assert joint.count("graphopt.matmul_all_reduce.default(") == 1, joint
    assert "aten.copy.default" not in joint.split("def forward")[-1].split("threshold_backward")[0]
    # the backward all-reduce of relu's gradient has no GEMM producer and stays as it is
    entry = _last_pass_summary()
    assert entry["matched"] == 1
    assert any("has other users" in refusal for refusal in entry["refusals"]), entry["refusals"]


def test_inference_graph_is_rewritten(tmp_path):
    import torch.distributed._functional_collectives as funcol
    module = _functional(lambda x, w: funcol.wait_tensor(funcol.all_reduce(x @ w, "sum", _group())))
    with torch.no_grad():
        _compile_and_run(module, tmp_path, grad=False)
    entry = _last_pass_summary()
    assert entry["stage"] == "inference" and entry["modified"] and entry["matched"] == 1


@pytest.mark.parametrize("case, reason", [
    ("max", "is not 'sum'"),
    ("partial_used", "has other users"),
])
def test_unsafe_sites_are_refused_and_left_unchanged(tmp_path, case, reason):
    import torch.distributed._functional_collectives as funcol

    def max_reduce(x, w):
        return funcol.wait_tensor(funcol.all_reduce(x @ w, "max", _group()))

    def partial_used(x, w):
        partial = x @ w
        return funcol.wait_tensor(funcol.all_reduce(partial, "sum", _group())) + partial

    module = _functional(max_reduce if case == "max" else partial_used)
    with torch.set_grad_enabled(case != "max"):  # torch has no backward for a max all-reduce
        _compile_and_run(module, tmp_path, grad=case != "max")
    entry = _last_pass_summary()
    assert not entry["modified"]
    assert any(reason in refusal for refusal in entry["refusals"]), entry["refusals"]
    stage = "joint" if case != "max" else "inference"
    assert "graphopt.matmul_all_reduce" not in _stage_code(tmp_path, f"{stage}.overlap_matmul_collectives")


def test_auto_mode_keeps_small_sites_sequential_and_says_why(tmp_path):
    import torch.distributed._functional_collectives as funcol
    module = _functional(lambda x, w: funcol.wait_tensor(funcol.all_reduce(x @ w, "sum", _group())))
    _compile_and_run(module, tmp_path, mode="auto")
    entry = _last_pass_summary()
    assert not entry["modified"] and entry["matched"] == 1
    assert any("sequential kept" in refusal and "gain below" in refusal for refusal in entry["refusals"])
    assert entry["stats"]["sites"][0]["mode"] == "sequential"


def test_tile_mode_is_refused_on_cpu(tmp_path):
    import torch.distributed._functional_collectives as funcol
    module = _functional(lambda x, w: funcol.wait_tensor(funcol.all_reduce(x @ w, "sum", _group())))
    _compile_and_run(module, tmp_path, mode="tile")
    entry = _last_pass_summary()
    assert not entry["modified"]
    assert any("tile kernel needs CUDA" in refusal for refusal in entry["refusals"])


def test_copy_engine_mode_is_refused_on_cpu(tmp_path):
    import torch.distributed._functional_collectives as funcol
    module = _functional(lambda x, w: funcol.wait_tensor(funcol.all_reduce(x @ w, "sum", _group())))
    _compile_and_run(module, tmp_path, mode="copy_engine")
    entry = _last_pass_summary()
    assert not entry["modified"] and entry["stats"]["sites"][0]["mode"] == "sequential"
    assert any("copy-engine runtime needs CUDA" in refusal for refusal in entry["refusals"])


def test_backend_flags_reach_the_op_the_runtime_runs_over_a_patch_and_under_the_environment(
        tmp_path, monkeypatch):
    """Precedence down to a runtime consumer: the chunk count the chunked runtime runs is an
    argument of the fused op, fixed from the compile's snapshot (environment > backend(...) >
    patch)."""
    import re
    import torch.distributed._functional_collectives as funcol

    def module():
        return _functional(lambda x, w: funcol.wait_tensor(funcol.all_reduce(x @ w, "sum", _group())))

    def chunks_run(dump):
        (call,) = re.findall(r"graphopt\.matmul_all_reduce\.default\(([^)]*)\)",
                             _stage_code(dump, "forward"))
        return int(call.split(",")[5])

    with graphopt.config.patch(overlap_chunks=2):
        _compile_and_run(module(), tmp_path / "patch")
        assert chunks_run(tmp_path / "patch") == 2
        _compile_and_run(module(), tmp_path / "backend", overlap_chunks=3)
        assert chunks_run(tmp_path / "backend") == 3
        monkeypatch.setenv("GRAPHOPT_OVERLAP_CHUNKS", "4")
        _compile_and_run(module(), tmp_path / "environment", overlap_chunks=3)
        assert chunks_run(tmp_path / "environment") == 4


def test_pass_ignores_other_stages():
    graph = torch.fx.symbolic_trace(nn.Linear(2, 2))
    result = overlap_matmul_collectives(graph, PassContext("forward", snapshot(), "g"))
    assert not result.modified and "not one of" in result.refusals[0]


_INTERPRETER_CHECK = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from graphopt.kernels import matmul_tile_signal as kernel
    from graphopt.distributed.symm_mem import TileWorkspace

    class NoBarrier:
        def barrier(self, channel=0):
            pass

    def workspace(m, n, world, rank):
        tiles = kernel.flag_count(m, n, 1)
        partial = torch.empty(m, n)
        flags = torch.zeros(world * tiles, dtype=torch.int32)
        # this process plays one rank: the absent peers' flags read "ready" and their partial
        # tiles are this rank's own buffer, so the reduction is world * (a @ b)
        flags.view(world, tiles)[[r for r in range(world) if r != rank]] = 2 ** 30
        pointers = lambda t: torch.tensor([t.data_ptr()] * world)
        return TileWorkspace(partial, flags, torch.zeros(1, dtype=torch.int32), pointers(partial),
                             pointers(flags), NoBarrier(), rank, world)

    torch.manual_seed(0)
    for scatter, world, rank in [(False, 1, 0), (False, 2, 0), (True, 2, 1)]:
        a = torch.randn(512, 96)
        b = torch.randn(300, 96).t()
        ws = workspace(512, 300, world, rank)
        for call in range(2):  # the second call reuses the flags through the epoch
            out = kernel._launch(a, b, ws, 2, scatter=scatter, group_m=2)
        ref = (a @ b) * world
        if scatter:
            ref = ref.chunk(world)[rank]
        assert out.shape == ref.shape, (out.shape, ref.shape)
        assert torch.allclose(out, ref, atol=1e-3, rtol=1e-4), (scatter, world, (out - ref).abs().max())
        mine = ws.flags.view(world, -1)[rank]
        assert bool((mine == 2).all()), mine  # every tile published with the current epoch
    print("ok")
""")


def test_tile_kernel_gemm_and_flags_under_triton_interpreter():
    pytest.importorskip("triton")
    done = subprocess.run([sys.executable, "-c", _INTERPRETER_CHECK], capture_output=True, text=True,
                          timeout=240, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


@pytest.mark.slow
def test_fused_op_compiles_through_inductor_and_keeps_one_call_per_graph(tmp_path):
    torch._dynamo.reset()
    module = _tensor_parallel(sequence_parallel=False)
    compiled = torch.compile(module, backend=graphopt.backend(
        codegen="inductor", overlap_matmul_collectives=True, overlap_mode="chunked",
        dump_dir=str(tmp_path)))
    x = torch.randn(2, 8, 16, requires_grad=True)
    compiled(x).sum().backward()
    forward, backward = _stage_code(tmp_path, "forward"), _stage_code(tmp_path, "backward")
    assert forward.count("graphopt.matmul_all_reduce.default(") == 1
    assert backward.count("graphopt.matmul_all_reduce.default(") == 1


@pytest.mark.slow
def test_in_place_dist_all_reduce_of_every_form_is_fused_under_inductor(tmp_path):
    """One Inductor compile of every form of ``InPlaceAllReduce`` in a row."""
    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.forms = nn.ModuleList(InPlaceAllReduce(form) for form in IN_PLACE_FORMS)
            self.back = nn.ModuleList(nn.Linear(12, 16) for _ in IN_PLACE_FORMS)

        def forward(self, x):
            for form, back in zip(self.forms, self.back):
                y = form(x)
                x = back(y if form.rank_of_input != 2 else y.unflatten(0, x.shape[:2]))
                x = x.flatten(2) if x.dim() == 4 else x
            return x

    torch._dynamo.reset()
    compiled = torch.compile(Chain(), backend=graphopt.backend(
        codegen="inductor", overlap_matmul_collectives=True, overlap_mode="chunked",
        dump_dir=str(tmp_path)))
    compiled(torch.randn(2, 8, 16, requires_grad=True)).sum().backward()
    forward = _stage_code(tmp_path, "forward")
    assert forward.count("graphopt.matmul_all_reduce.default(") == len(IN_PLACE_FORMS), forward
