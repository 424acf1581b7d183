"""bench/matmul_allreduce.py's summary from measured rows (no GPU needed)."""

from __future__ import annotations

import pytest
from conftest import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("matmul_allreduce")


def _row(kind, ms, best_copy_engine=None):
    row = {"kind": kind, "ms": {"ideal": 1.0, "sequential": 1.5, "graphopt_auto": 1.2, **ms}}
    if best_copy_engine:
        row["best_copy_engine"] = best_copy_engine
    return row


def test_summary_compares_handoffs_with_barriers_where_both_were_timed(bench):
    assert bench.barrier_key("copy_engine:2x0.5") == "ce_barriers:2x0.5"
    rows = [_row("all_reduce", {"copy_engine:2": 1.1, "ce_barriers:2": 1.21}, "copy_engine:2"),
            _row("reduce_scatter", {"copy_engine:1": 0.9, "ce_barriers:1": 1.0, "torch_fused_rs": 1.0},
                 "copy_engine:1")]
    summary = bench.summarize(rows)
    assert summary["copy_engine_handoff_vs_barriers_geomean"] == pytest.approx((1.1 / 1.21 * 0.9) ** 0.5)
    assert summary["worst_vs_sequential"] == pytest.approx(0.8)
    assert summary["rs_vs_torch_fused_geomean"] == pytest.approx(1.2)
    # P = 2 runs time no barrier variant: no such key
    two = bench.summarize([_row("all_reduce", {"copy_engine:2": 1.1}, "copy_engine:2")])
    assert "copy_engine_handoff_vs_barriers_geomean" not in two
