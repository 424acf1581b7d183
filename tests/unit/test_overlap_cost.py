"""The overlap cost model: its choices, its guards, and its agreement with the measured bench."""

from __future__ import annotations

import json
import os

import pytest
import sympy
from hypothesis import given, settings, strategies as st

from graphopt.analysis import overlap_cost
from graphopt.analysis.device_profile import CPU, H100, H200

RESULTS = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "results", "matmul_allreduce.json")


def _choose(kind="all_reduce", m=16384, n=8192, k=4096, world=2, profile=H100, **kwargs):
    kwargs.setdefault("is_cuda", True)
    kwargs.setdefault("symmetric_memory", True)
    return overlap_cost.choose_overlap(kind, m, n, k, 2, world, profile, **kwargs)


def test_comm_heavy_all_reduce_overlaps_and_gemm_bound_one_stays_sequential():
    assert _choose(k=4096).mode == "chunked"               # all-reduce ~65% of the GEMM time
    gemm_bound = _choose(k=28672 // 2)
    assert gemm_bound.mode == "sequential" and "gain below" in gemm_bound.reason


def test_tile_runtime_is_never_chosen_without_cuda_or_symmetric_memory():
    for kwargs in ({"is_cuda": False}, {"symmetric_memory": False}):
        choice = _choose(**kwargs)
        assert not any(key.startswith("tile:") for key in choice.estimates_s)
        assert choice.mode != "tile"
    refused = _choose(mode="tile", is_cuda=False)
    assert refused.mode == "sequential" and "needs CUDA" in refused.reason


def test_tile_needs_rows_in_whole_tiles_per_rank():
    why = overlap_cost.tile_supported("reduce_scatter", 100, 64, 64, 2, 2, True, True)
    assert why is not None and "multiple of" in why
    assert overlap_cost.tile_supported("all_reduce", 256, 64, 64, 2, 2, True, True) is None
    assert "all-reduce / reduce-scatter" in overlap_cost.tile_supported("all_gather", 256, 64, 64, 2, 2,
                                                                        True, True)


def test_forced_modes_and_chunk_count():
    assert _choose(k=14336, mode="chunked", chunks=3).chunks == 3
    assert _choose(mode="sequential").mode == "sequential"
    forced = _choose(mode="tile")
    assert forced.mode == "tile" and forced.comm_sms in overlap_cost.COMM_SM_CHOICES
    assert _choose(chunks=6).estimates_s.keys() >= {"chunked:6"}


def test_symbolic_sizes_use_hints():
    s = sympy.Symbol("s")
    with_symbol = _choose(m=2 * s, hints={s: 8192})
    assert with_symbol.estimates_s == _choose(m=16384).estimates_s
    assert overlap_cost.concrete(sympy.Integer(7)) == 7


def test_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match="not one of"):
        _choose(kind="broadcast")


@settings(max_examples=20, deadline=None)
@given(kind=st.sampled_from(overlap_cost.KINDS), m=st.integers(1, 1 << 16), n=st.integers(1, 1 << 15),
       k=st.integers(1, 1 << 15), world=st.integers(2, 8),
       profile=st.sampled_from([H100, H200, CPU]), cuda=st.booleans())
def test_auto_choice_is_estimated_faster_than_sequential_by_the_margin(kind, m, n, k, world, profile, cuda):
    choice = overlap_cost.choose_overlap(kind, m, n, k, 2, world, profile, is_cuda=cuda,
                                         symmetric_memory=cuda)
    sequential = choice.estimates_s["sequential"]
    if choice.mode == "sequential":
        return
    key = f"chunked:{choice.chunks}" if choice.mode == "chunked" else f"tile:{choice.comm_sms}"
    assert choice.estimates_s[key] <= sequential * (1 - overlap_cost.MARGIN)
    assert choice.mode != "tile" or cuda


def test_choices_never_lose_to_sequential_on_the_measured_bench():
    """Replay the model on the committed 2-GPU measurements: what it picks must not be slower."""
    if not os.path.exists(RESULTS):
        pytest.skip("bench/results/matmul_allreduce.json not committed")
    with open(RESULTS) as handle:
        results = json.load(handle)
    profile = H200 if "H200" in results["device"] else H100
    for row in results["rows"]:
        choice = overlap_cost.choose_overlap(row["kind"], row["M"], row["N"], row["K"], 2,
                                             results["gpus"], profile, is_cuda=True,
                                             symmetric_memory=True)
        key = {"sequential": "sequential", "chunked": f"chunked:{choice.chunks}",
               "tile": f"tile:{choice.comm_sms}"}[choice.mode]
        measured = row["ms"]
        assert key in measured, (row["shape"], key, "was not measured: re-run the bench")
        assert measured[key] <= measured["sequential"] * 1.02, (row["kind"], row["shape"], key)
