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
    # One compile per length (static, as a user training at one length compiles), one for the
    # packed batch; the defaults are the user's, so no non-default line
    assert result["mask_pass"] == [{"sdpa is_causal": 2}, {"sdpa is_causal": 2},
                                   {"graphopt.flash_attention (causal + documents)": 2}]
    assert result["static"] and result["autotune"]
    assert "Non-default" not in (tmp_path / "hf_attention.md").read_text()
    assert all(row["step_ms_spread"] >= 0 for row in result["rows"])
    quick = bench.markdown({**result, "static": False, "autotune": False})
    assert ("Non-default settings in this run: the sequence dim marked dynamic (--dynamic); "
            "graphopt's Triton kernels untuned, first config (--no-autotune).") in quick
    saved = json.loads((tmp_path / "hf_attention.json").read_text())
    assert saved["summary"] == result["summary"] and (tmp_path / "hf_attention.md").exists()
