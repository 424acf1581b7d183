"""bench/attention_selection.py's GPU part, run on the CPU with tiny layers, and its merge into the
committed results: the command the lead runs on the GPU writes what --merge reads."""

from __future__ import annotations

import json

import pytest

from conftest import load_bench

pytest.importorskip("transformers")


def test_gpu_part_runs_small_on_cpu_and_merges_into_the_results(tmp_path):
    bench = load_bench("attention_selection")
    bench.main(["--gpu", "--gpu-device", "cpu", "--gpu-codegen", "eager", "--gpu-hidden", "32",
                "--gpu-ffn", "64", "--gpu-heads", "4", "--gpu-seq", "8", "--gpu-iters", "2",
                "--out", str(tmp_path)])
    gpu = json.loads((tmp_path / "attention_selection_gpu.json").read_text())
    assert set(gpu["rows"]) == {"inductor", "selected", "no_attention"}
    assert gpu["capacity"] == 5 and gpu["attention_flops_saved"] == pytest.approx(0.375)
    cpu_result = {"summary": {"attention_flops_saved": 0.4, "accuracy_drop_points": 1.0,
                              "step_time_saved_gpu": None, "rank_work_imbalance": 1.0,
                              "targets": {}},
                  "rows": [], "device": "cpu", "torch": "x", "codegen": "eager", "seeds": [0],
                  "wall_s": 1.0, "model": "m", "epochs": 1,
                  "pretrain": {"task": "t", "epochs": 1, "test_accuracy": 90.0},
                  "finetune": {"task": "t", "train": 1, "test": 1}}
    (tmp_path / "attention_selection.json").write_text(json.dumps(cpu_result))
    bench.main(["--merge", str(tmp_path / "attention_selection_gpu.json"), "--out", str(tmp_path)])
    merged = json.loads((tmp_path / "attention_selection.json").read_text())
    assert merged["summary"]["step_time_saved_gpu"] == gpu["step_time_saved_gpu"]
    assert "Attention share of the step" in (tmp_path / "attention_selection.md").read_text()
