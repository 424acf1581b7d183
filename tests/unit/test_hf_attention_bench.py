"""bench/hf_attention.py's CPU smoke run: every mode runs, losses agree, the JSON has its keys."""

import json

import pytest

from conftest import load_bench

pytest.importorskip("transformers")


@pytest.mark.slow
def test_smoke_run_writes_the_summary_keys(tmp_path):
    """Four compiles of a tiny model."""
    bench = load_bench("hf_attention")
    result = bench.main(["--smoke", "--out", str(tmp_path)])
    assert {"speedup_vs_inductor_16k", "speedup_vs_eager_16k",
            "packed_over_causal_16k"} <= set(result["summary"])
    assert all(row.get("loss_diff_vs_eager", 0.0) < 1e-4 for row in result["rows"])
    # One compile for both lengths (the sequence dim is dynamic), one for the packed batch.
    assert result["mask_pass"] == [{"sdpa is_causal": 2},
                                   {"graphopt.flash_attention (causal + documents)": 2}]
    saved = json.loads((tmp_path / "hf_attention.json").read_text())
    assert saved["summary"] == result["summary"] and (tmp_path / "hf_attention.md").exists()
