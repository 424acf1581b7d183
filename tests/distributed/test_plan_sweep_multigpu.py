"""bench/plan_sweep_multigpu.py's smoke path: the driver plans on the CPU, torchrun starts 2 gloo
workers that apply each layout with graphopt.parallelize (tiny HF Llama, eager codegen) and measure
it; the JSON holds a prediction and a measurement for every layout, tensor- and sequence-parallel
ones included. torchtitan (not installed here): its variants, command and log parsing."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from conftest import load_bench

REPO = pathlib.Path(__file__).resolve().parents[2]


def _titan():
    return load_bench("torchtitan_llama")


def test_smoke_measures_and_predicts_every_layout(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "bench/plan_sweep_multigpu.py", "--smoke", "--profile", "h100",
                           "--repeats", "1", "--out", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "plan_sweep_multigpu.json").read_text())
    summary = result["summary"]
    for key in ("chosen_vs_best_measured", "median_abs_time_error", "rank_correlation", "mfu_chosen",
                "speedup_vs_torchtitan", "world_sizes"):
        assert key in summary, key
    assert summary["world_sizes"] == [2]
    rows = result["rows"]
    assert len(rows) >= 5
    for row in rows:
        assert row["step_s"] > 0 and row["predicted_step_s"] > 0 and row["world_size"] == 2, row
        assert row["tokens_per_s_per_gpu"] > 0 and row["mfu"] > 0, row
    layouts = {(r["layout"]["tp"], r["layout"]["sp"]) for r in rows}
    assert {(1, 1), (2, 1), (1, 2)} <= layouts
    assert sum(r["chosen"] for r in rows) == 1
    assert summary["chosen_vs_best_measured"] >= 1.0
    assert (tmp_path / "plan_sweep_multigpu.md").read_text().startswith("# Layout planner vs measured multi-GPU")


def test_torchtitan_variants_command_and_log(tmp_path):
    titan = _titan()
    variants = titan.stock_variants(world=4, seq=8192, sequences=8)
    names = [v.describe(4) for v in variants]
    assert "fsdp4 selective AC" in names and "fsdp2 tp2 async selective AC" in names
    assert "fsdp2 cp2 selective AC" in names and "fsdp1 tp2 async cp2 selective AC" in names
    # 2 sequences cannot split over 4 data-parallel ranks: FSDP alone is left out
    assert all(v.dp_shard(4) <= 2 for v in titan.stock_variants(world=4, seq=32768, sequences=2))
    argv, env = titan.command(variants[1], 4, 8192, 2, 8, 6, tmp_path)
    assert argv[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "-m",
                        "torchtitan.train", "--module", "torchtitan_llama", "--config", "graphopt_baseline"]
    run = json.loads(env[titan.RUN_ENV])
    assert run["seq"] == 8192 and run["layers"] == 2 and run["sequences"] == 8
    assert env["NCCL_NVLS_ENABLE"] == "0" and str(REPO / "bench") in env["PYTHONPATH"]
    log = "".join(
        f"[rank0]:\x1b[31mstep: {s:2}  \x1b[32mloss: 11.0  \x1b[33mgrad_norm:  1.0  \x1b[36mmemory: "
        f"{40 + s:5.2f}GiB(50.00%)  \x1b[34mtps: {tps:,}  \x1b[36mtflops: 300.00  \x1b[35mmfu: {mfu}%\x1b[39m\n"
        for s, tps, mfu in ((1, 100, "1.00"), (2, 5000, "30.00"), (3, 6000, "40.00"), (4, 6200, "41.00"),
                            (5, 6100, "40.50")))
    parsed = titan.parse_log(log)
    assert parsed["tokens_per_s_per_gpu"] == 6100 and parsed["peak_reserved_gib"] == 45.0
    assert abs(parsed["torchtitan_mfu"] - 0.405) < 1e-9 and "oom" not in parsed
    assert titan.parse_log("torch.OutOfMemoryError: CUDA out of memory")["oom"]
    rows = [{"variant": "a", "rc": 0, "tokens_per_s_per_gpu": 5.0}, {"variant": "b", "rc": 1, "oom": True},
            {"variant": "c", "rc": 0, "tokens_per_s_per_gpu": 7.0}]
    assert titan.fastest(rows)["variant"] == "c"
    assets, data = titan.write_assets(tmp_path, seq=16, sequences=2)
    assert (assets / "tokenizer.json").exists() and len((data / "train.jsonl").read_text().splitlines()) == 16
