"""bench/attention.py's control flow on the CPU (tiny sizes, Triton interpreter): every phase runs,
each Triton variant is checked against float32, results and the summary keys are written."""

import json

import pytest
from conftest import load_bench


@pytest.mark.triton_interpreter
def test_benchmark_smoke_run_writes_checked_results(tmp_path):
    bench = load_bench("attention")
    result = bench.main(["--smoke", "--out", str(tmp_path), "--masks", "docs", "--hkv", "2",
                         "--columns", "triton,triton_v1,auto"])
    written = json.loads((tmp_path / "attention.json").read_text())
    assert written["summary"] == json.loads(json.dumps(result["summary"]))
    for key in ("triton_fwd_bwd_vs_cudnn_causal_min", "docs_fwd_bwd_vs_flex_min",
                "window_fwd_bwd_vs_flex_min"):
        assert key in written["summary"]
    kernels = {row["kernel"] for row in written["correctness"]}
    assert {f"forward:{v}" for v in bench.FORWARD_VARIANTS} <= kernels
    assert {f"backward:{v}" for v in bench.BACKWARD_VARIANTS} <= kernels
    assert written["summary"]["correctness_all_ok"] is True
    variant_row, = written["variants"]
    assert all(f"bwd_{v}_ms" in variant_row for v in bench.BACKWARD_VARIANTS)
    case, = written["cases"]
    assert case["documents"]["count"] >= 2 and 0 < case["tiles_computed"] < 1
    assert "| docs | 80 | 2 |" in (tmp_path / "attention.md").read_text()


def test_document_lengths_are_long_tailed_and_fill_the_sequence():
    bench = load_bench("attention")
    lengths = bench.document_lengths(65536)
    assert sum(lengths) == 65536 and min(lengths[:-1]) >= bench.DOC_MIN_LEN
    ordered = sorted(lengths)
    assert ordered[len(ordered) // 2] < 1024 < ordered[-1]  # short median, a long tail
    assert lengths == bench.document_lengths(65536)  # the same documents every run


def test_summary_takes_the_worst_case_per_mask():
    bench = load_bench("attention")
    cases = [dict(mask="causal", sdpa_cudnn_fwd_bwd_ms=9.0, triton_fwd_bwd_ms=10.0),
             dict(mask="causal", sdpa_cudnn_fwd_bwd_ms=8.0, triton_fwd_bwd_ms=10.0),
             dict(mask="docs", flex_fwd_bwd_ms=13.0, triton_fwd_bwd_ms=10.0),
             dict(mask="window", flex_fwd_bwd_ms=11.0)]  # triton failed: no ratio
    summary = bench.summarize({"cases": cases, "correctness": [{"ok": True}]})
    assert summary["triton_fwd_bwd_vs_cudnn_causal_min"] == pytest.approx(0.8)
    assert summary["triton_fwd_bwd_vs_cudnn_causal_min_meets_target"] is False
    assert summary["docs_fwd_bwd_vs_flex_min"] == pytest.approx(1.3)
    assert summary["docs_fwd_bwd_vs_flex_min_meets_target"] is True
    assert summary["window_fwd_bwd_vs_flex_min"] is None
