"""bench/profile_offload.py's tables from profiler spans (no GPU needed)."""

from __future__ import annotations

import pytest
from conftest import load_bench


@pytest.fixture(scope="module")
def profile_offload():
    return load_bench("profile_offload")


def test_gaps_are_idle_stretches_of_one_stream_longest_first(profile_offload):
    spans = [(0.0, 10.0, "a", 1), (5.0, 30.0, "b", 2), (35.0, 40.0, "c", 3), (100.0, 110.0, "d", 4)]
    gaps = profile_offload._gaps(spans, gap_us=4.0)
    # b ends at 30 (overlapping a), c starts at 35: 5 us; d starts 60 us after c ends.
    assert gaps == [{"us": 60.0, "start": 40.0, "end": 100.0, "after": "c", "before": "d", "correlation": 4},
                    {"us": 5.0, "start": 30.0, "end": 35.0, "after": "b", "before": "c", "correlation": 3}]
    assert profile_offload._gaps(spans, gap_us=10.0) == gaps[:1]


def test_gaps_are_attributed_to_the_host_or_the_copy_they_waited_for(profile_offload):
    def gap(start, end, correlation):
        return {"us": end - start, "start": start, "end": end, "correlation": correlation}
    gaps = [gap(100.0, 300.0, 1), gap(400.0, 500.0, 2), gap(600.0, 700.0, 3), gap(800.0, 900.0, 4)]
    events = [{"cat": "cuda_runtime", "ts": 250.0, "dur": 10.0, "args": {"correlation": 1}},  # launched late
              {"cat": "cuda_runtime", "ts": 350.0, "dur": 10.0, "args": {"correlation": 2}},
              {"cat": "cuda_runtime", "ts": 550.0, "dur": 10.0, "args": {"correlation": 3}},
              {"cat": "cuda_runtime", "ts": 750.0, "dur": 10.0, "args": {"correlation": 4}}]
    copies = {"d2h": [(200.0, 495.0)], "h2d": [(450.0, 699.0)], "d2d": []}
    profile_offload._attribute_gaps(gaps, events, copies)
    assert [g["cause"] for g in gaps] == ["host", "d2h", "h2d", "other"]
    assert all("correlation" not in g for g in gaps)
    assert profile_offload._gap_causes(gaps) == {"host": 0.2, "d2h": 0.1, "h2d": 0.1, "other": 0.1}


def test_comparison_splits_kernel_time_into_shared_and_new_kernels(profile_offload):
    def profile(kernels, gaps, span):
        return {"kernels_us": kernels, "kernel_ms": sum(kernels.values()) / 1e3, "span_ms": span,
                "gaps": [{"us": g} for g in gaps]}
    planned = profile({"gemm": 1000.0, "norm": 200.0}, [50.0], 1.3)
    offload = profile({"gemm": 1100.0, "norm": 200.0, "clone": 30.0}, [50.0, 400.0], 1.8)
    c = profile_offload.compare(planned, offload, top=2)
    assert c["kernel_ms_delta"] == pytest.approx(0.13)
    assert c["shared_kernels_ms_delta"] == pytest.approx(0.1)
    assert c["new_kernels_ms"] == pytest.approx(0.03)
    assert c["busiest_stream_gaps_ms"] == {"base": pytest.approx(0.05), "other": pytest.approx(0.45)}
    assert c["span_ms_delta"] == pytest.approx(0.5)
    assert c["largest_kernel_deltas_us"] == [("gemm", 100.0), ("clone", 30.0)]
