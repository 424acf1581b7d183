"""bench/remat.py's comparison with torch's budgets from measured rows (no GPU needed)."""

from __future__ import annotations

import pytest
from conftest import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("remat")


def _row(variant, peak, ms, **extra):
    return {"variant": variant, "seq": 8, "fraction": extra.pop("fraction", None), "peak_bytes": peak,
            "step_ms": ms, **extra}


def test_torch_is_compared_at_equal_peak_over_the_points_no_other_beats(bench):
    """torch's 30 % point holds more and runs slower than its 50 % point: a user would never pick
    it, so our plan between 50 % and 100 % is compared on the line from 50 % to 100 %."""
    torch_rows = [_row("torch_budget", 100, 600.0, fraction=0.5), _row("torch_budget", 110, 700.0, fraction=0.3),
                  _row("torch_budget", 200, 500.0, fraction=1.0)]
    ours = _row("graphopt", 150, 495.0, fraction=0.7, budget_bytes=150, planned_peak_bytes=150, plan_feasible=True)
    assert bench.frontier([(r["peak_bytes"], r["step_ms"]) for r in torch_rows]) == [(100, 600.0), (200, 500.0)]
    summary = bench.summarize([*torch_rows, ours])
    assert ours["torch_comparison"] == "interpolated" and ours["torch_ms_at_equal_peak"] == pytest.approx(550.0)
    assert summary["step_vs_torch_budget_max"] == pytest.approx(0.9)
    below = _row("graphopt", 50, 540.0, fraction=0.3, budget_bytes=40, planned_peak_bytes=50, plan_feasible=False)
    summary = bench.summarize([*torch_rows, below])
    assert below["torch_comparison"] == "bound" and below["step_vs_torch_budget"] == pytest.approx(0.9)
    assert summary["peak_over_budget_max"] == pytest.approx(1.25) and summary["peak_over_budget_max_feasible"] is None
