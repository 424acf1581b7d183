"""The backend with every pass off: same numbers as eager, graphs recorded, entry point works."""

import importlib.metadata
import json

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.debug.dump import compile_summaries
from graphopt.models.llama import Llama, LlamaConfig, llama_loss

EAGER = dict(codegen="eager")


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))


def _check_forward_backward(model, compiled, *inputs, rtol=1e-5, atol=1e-6):
    expected = model(*inputs)
    expected.float().pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    actual = compiled(*inputs)
    actual.float().pow(2).sum().backward()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], rtol=rtol, atol=atol, msg=name)


def test_registered_name_and_entry_point():
    assert "graphopt" in torch._dynamo.list_backends()
    names = [ep.name for ep in importlib.metadata.entry_points(group="torch_dynamo_backends")]
    assert "graphopt" in names


def test_mlp_eager_codegen_matches_eager():
    model = _mlp()
    compiled = torch.compile(model, backend=graphopt.backend(**EAGER))
    _check_forward_backward(model, compiled, torch.randn(8, 16))
    stages = [s["stage"] for s in compile_summaries()[0]["stages"]]
    assert stages == ["pre_grad", "joint", "forward", "backward"]


def test_string_backend_reads_config_patch():
    model = _mlp()
    with graphopt.config.patch(codegen="eager"):
        compiled = torch.compile(model, backend="graphopt")
        _check_forward_backward(model, compiled, torch.randn(8, 16))
    assert compile_summaries()[0]["config"]["codegen"] == "eager"


def test_inference_graph_runs_the_inference_stage():
    model = _mlp()
    compiled = torch.compile(model, backend=graphopt.backend(**EAGER))
    with torch.no_grad():
        torch.testing.assert_close(compiled(torch.ones(2, 16)), model(torch.ones(2, 16)))
    assert [s["stage"] for s in compile_summaries()[0]["stages"]] == ["pre_grad", "inference"]


def test_reference_llama_matches_eager():
    torch.manual_seed(0)
    model = Llama(LlamaConfig.tiny())
    tokens = torch.randint(0, 128, (2, 24))
    compiled = torch.compile(model, backend=graphopt.backend(**EAGER))
    _check_forward_backward(model, compiled, tokens, rtol=1e-4, atol=1e-5)


def test_graph_break_compiles_two_graphs():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            x = torch.relu(self.a(x))
            torch._dynamo.graph_break()
            return self.b(x).sin()

    model = Broken()
    compiled = torch.compile(model, backend=graphopt.backend(**EAGER))
    _check_forward_backward(model, compiled, torch.randn(4, 8))
    assert len(compile_summaries()) == 2


def test_dynamic_shapes_one_graph_many_sizes():
    model = _mlp()
    compiled = torch.compile(model, backend=graphopt.backend(**EAGER), dynamic=True)
    for batch in (3, 7, 12):
        _check_forward_backward(model, compiled, torch.randn(batch, 16))
        model.zero_grad(set_to_none=True)
    assert len(compile_summaries()) == 1


def test_dump_has_every_stage_summary_and_html(tmp_path):
    model = _mlp()
    compiled = torch.compile(model, backend=graphopt.backend(codegen="eager", dump_dir=str(tmp_path)))
    compiled(torch.randn(4, 16)).sum().backward()
    graph_dirs = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(graph_dirs) == 1
    files = sorted(p.name for p in graph_dirs[0].iterdir())
    for stage in ("pre_grad", "joint", "forward", "backward"):
        assert any(f.endswith(f"_{stage}.py") for f in files), (stage, files)
    summary = json.loads((graph_dirs[0] / "summary.json").read_text())
    assert summary["config"]["dump_dir"] == str(tmp_path)
    code = next(graph_dirs[0].glob("*_forward.py")).read_text()
    assert "f32[4, 32]" in code  # shapes and dtypes are annotated
    index = (tmp_path / "index.html").read_text()
    assert graph_dirs[0].name in index


def test_env_dump_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_DUMP_DIR", str(tmp_path))
    compiled = torch.compile(_mlp(), backend=graphopt.backend(**EAGER))
    compiled(torch.randn(2, 16))
    assert (tmp_path / "index.html").exists()


@pytest.mark.slow
def test_inductor_codegen_with_every_pass_off_equals_inductor():
    model = _mlp()
    x = torch.randn(8, 16)
    ours = torch.compile(model, backend="graphopt")(x)
    torch._dynamo.reset()
    inductor = torch.compile(model, backend="inductor")(x)
    torch.testing.assert_close(ours, inductor, rtol=0, atol=0)
    _check_forward_backward(model, torch.compile(model, backend="graphopt"), x)


def test_torch_logs_shows_graphopt_and_structured_trace_has_the_graphs(tmp_path):
    import subprocess
    import sys

    script = ("import torch, graphopt\n"
              "m = torch.nn.Linear(4, 4)\n"
              "torch.compile(m, backend=graphopt.backend(codegen='eager'))(torch.randn(2, 4)).sum().backward()\n")
    env = dict(__import__("os").environ, TORCH_LOGS="+graphopt", TORCH_TRACE=str(tmp_path))
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert "compiling" in run.stderr
    assert "stage backward" in run.stderr
    trace = "".join(p.read_text() for p in tmp_path.iterdir())
    assert "graphopt_graph_000_0_0_forward" in trace


def _checkpointed_with_a_side_effect():
    """A function whose torch.utils.checkpoint region Dynamo cannot trace (it appends to a list
    outside the region: "HOP: Unsafe side effect", as transformers' gradient checkpointing does under
    torch.compile), so the region runs eager between two graphs."""
    import torch.utils.checkpoint as checkpoint
    calls = []
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 8)

    def layer(x):
        calls.append(1)
        return linear(x).relu()

    def step(x):
        return (checkpoint.checkpoint(layer, x * 2, use_reentrant=False) * 3).sum()
    return step


@pytest.mark.parametrize("flags, warns", [(dict(memory_budget=0.5), True),
                                          (dict(memory_budget=0.5, codegen="inductor"), True),
                                          (dict(offload_activations=True), True), ({}, False)])
def test_a_graph_break_that_leaves_layers_outside_the_memory_plan_warns_at_the_users_line(
        monkeypatch, flags, warns):
    import warnings as warnings_module
    from graphopt.backends import compile_notices
    monkeypatch.setattr(compile_notices, "_BREAKS_WARNED", set())
    step = _checkpointed_with_a_side_effect()
    compiled = torch.compile(step, backend=graphopt.backend(**{"codegen": "eager", **flags}))
    x = torch.randn(4, 8, requires_grad=True)
    with warnings_module.catch_warnings(record=True) as caught:
        warnings_module.simplefilter("always")
        compiled(x).backward()
    found = [w for w in caught if issubclass(w.category, compile_notices.GraphBreakWarning)]
    if not warns:
        assert found == []
        return
    (warning,) = found
    assert warning.filename == __file__
    assert "HOP: Unsafe side effect" in str(warning.message)
    assert "model.gradient_checkpointing_disable()" in str(warning.message)
    assert any(s["notes"].get("graph_breaks") for s in compile_summaries())
