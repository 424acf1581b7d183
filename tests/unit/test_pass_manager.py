import logging

import pytest
import torch
import torch.fx as fx

from graphopt import config
from graphopt.debug.dump import GraphRecorder
from graphopt.passes.manager import GraphPass, PassContext, PassFailedLint, PassResult, run_stage


def _module():
    class M(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x) + 1

    gm = fx.symbolic_trace(M())
    for node in gm.graph.nodes:
        node.meta["val"] = torch.empty(2)
    return gm


def _relu_to_sigmoid(gm, ctx):
    matched = 0
    for node in gm.graph.nodes:
        if node.target is torch.relu:
            node.target = torch.sigmoid
            matched += 1
    return PassResult(gm, modified=matched > 0, matched=matched, stats={"rewritten": matched},
                      refusals=["example refusal"])


def _add_node_without_meta(gm, ctx):
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        extra = gm.graph.call_function(torch.neg, (out.args[0],))
    out.args = (extra,)
    return PassResult(gm, modified=True, matched=1)


def _ctx(tmp_path=None, disabled=(), **flags):
    # disabled_passes takes graphopt's pass names only: switch this file's test pass off directly
    cfg = config.ConfigSnapshot({**config.snapshot(**flags).as_dict(), "disabled_passes": disabled})
    recorder = GraphRecorder("g", str(tmp_path) if tmp_path else None, cfg.describe())
    return PassContext("pre_grad", cfg, "g", [], recorder)


RELU = GraphPass("relu_to_sigmoid", _relu_to_sigmoid, enabled=lambda c: True)


def test_pass_runs_is_recorded_and_dumped(tmp_path, caplog):
    ctx = _ctx(tmp_path, codegen="eager")
    with caplog.at_level(logging.INFO, logger="graphopt"):
        gm = run_stage("pre_grad", [RELU], _module(), ctx)
    ctx.recorder.finish()
    assert "torch.sigmoid(" in gm.code and "torch.relu(" not in gm.code
    entry = ctx.recorder.summary["passes"][0]
    assert entry["matched"] == 1 and entry["modified"] and entry["ms"] >= 0
    assert entry["stats"] == {"rewritten": 1}
    assert entry["refusals"] == ["example refusal"]
    assert any("relu_to_sigmoid" in r.message for r in caplog.records)
    files = sorted(p.name for p in (tmp_path / "g").iterdir())
    assert "00_pre_grad.py" in files and "01_pre_grad.relu_to_sigmoid.py" in files
    assert "summary.json" in files and "index.html" in files
    page = (tmp_path / "g" / "index.html").read_text()
    assert "diff_chg" in page or "diff_add" in page  # the changed line is highlighted


def test_disabled_pass_is_skipped_and_says_so():
    ctx = _ctx(disabled=("relu_to_sigmoid",))
    gm = run_stage("pre_grad", [RELU], _module(), ctx)
    assert "torch.relu(" in gm.code
    assert ctx.recorder.summary["passes"][0]["ran"] is False


def test_pass_not_enabled_by_its_flag_does_not_run():
    off = GraphPass("relu_to_sigmoid", _relu_to_sigmoid, enabled=lambda c: c.overlap_matmul_collectives)
    gm = run_stage("pre_grad", [off], _module(), _ctx())
    assert "torch.relu(" in gm.code


def test_debug_lint_names_the_pass_that_dropped_meta():
    broken = GraphPass("add_neg", _add_node_without_meta, enabled=lambda c: True)
    with pytest.raises(PassFailedLint, match="add_neg.*meta"):
        run_stage("pre_grad", [broken], _module(), _ctx(debug=True))
    run_stage("pre_grad", [broken], _module(), _ctx(debug=False))


def test_a_pass_notes_and_files_go_into_the_dump(tmp_path):
    rendered = []

    def noting(gm, ctx):
        def page():
            rendered.append(ctx.graph_id)
            return "# page\n"
        return PassResult(gm, False, notes={"facts": {"n": 1}}, files={"page.md": page})

    noting_pass = GraphPass("noting", noting, enabled=lambda c: True)
    ctx = _ctx(tmp_path)
    run_stage("pre_grad", [noting_pass], _module(), ctx)
    assert ctx.recorder.summary["notes"]["facts"] == {"n": 1}
    assert (tmp_path / "g" / "page.md").read_text() == "# page\n"
    assert ctx.recorder.summary["files"] == ["page.md"]
    without_folder = _ctx()
    run_stage("pre_grad", [noting_pass], _module(), without_folder)
    assert without_folder.recorder.summary["notes"]["facts"] == {"n": 1}
    assert rendered == ["g"]  # no dump folder: the file is never rendered
