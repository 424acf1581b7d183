"""The overlap cost model: its choices, its guards, and its agreement with the measured bench."""

from __future__ import annotations

import json
import os

import pytest
import sympy
from conftest import load_bench
from hypothesis import given, settings, strategies as st

from graphopt.analysis import overlap_cost
from graphopt.analysis.device_profile import CPU, H100, H200
from graphopt.analysis.overlap_schedule import copy_engine_blocks

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "results")


def _choose(kind="all_reduce", m=16384, n=8192, k=4096, world=2, profile=H100, **kwargs):
    kwargs.setdefault("is_cuda", True)
    kwargs.setdefault("symmetric_memory", True)
    return overlap_cost.choose_overlap(kind, m, n, k, 2, world, profile, **kwargs)


def test_comm_heavy_all_reduce_overlaps_and_gemm_bound_one_stays_sequential():
    # NCCL chunks only: worth it where the all-reduce is ~65% of the GEMM time, not at ~15%.
    assert _choose(k=4096, symmetric_memory=False).mode == "chunked"
    gemm_bound = _choose(m=4096, k=28672 // 2, symmetric_memory=False)
    assert gemm_bound.mode == "sequential" and "gain below" in gemm_bound.reason


def test_copy_engine_is_preferred_where_symmetric_memory_is_available():
    for kind in ("all_reduce", "reduce_scatter"):
        choice = _choose(kind=kind, m=8192, k=4096)
        assert choice.mode == "copy_engine"
        assert (choice.chunks, choice.taper) in overlap_cost.CE_SCHEDULES
        times = choice.estimates_s
        key = overlap_cost.plan_key(choice)
        assert times[key] < times["chunked:4"]
        assert times[key] <= times["sequential"] * (1 - overlap_cost.MARGINS["copy_engine"])
        if kind == "reduce_scatter":  # most of the reduce-scatter hides under the GEMM
            host = overlap_cost.ce_host_time(kind, 2, choice.chunks)
            assert (times[key] - times["gemm"]
                    < 0.5 * times["comm"] + overlap_cost.CE_HOST_INTERFERENCE * host)


def test_copy_engine_timeline_follows_the_schedule():
    """Sub-chunks let the pulls run under the GEMMs, until the per-chunk costs dominate; a slower
    link makes the timeline communication-bound."""
    import dataclasses
    times = overlap_cost.estimate("reduce_scatter", 16384, 8192, 4096, 2, 2, H100, tile_ok=False,
                                  copy_engine_ok=True)
    comm_bound = dataclasses.replace(H100, p2p_gbps=20.0)
    slow = overlap_cost.estimate("reduce_scatter", 16384, 8192, 4096, 2, 2, comm_bound, tile_ok=False,
                                 copy_engine_ok=True)
    pulled = 16384 // 2 * 8192 * 2 / 20e9
    assert slow["copy_engine:4"] >= pulled > times["copy_engine:4"]
    by_count = {count: overlap_cost.estimate("reduce_scatter", 16384, 8192, 4096, 2, 2, H100,
                                             tile_ok=False, copy_engine_ok=True, chunks=count)
                [f"copy_engine:{count}"] for count in (1, 2, 64)}
    # One sub-chunk: the own block's GEMM waits for the whole pull (no overlap in phase 2).
    assert by_count[1] > by_count[2] < by_count[64]


def test_tapered_sub_chunks_shorten_the_all_reduce_tail():
    """All-reduce: the last sub-chunk's barrier + pull-back runs after the last GEMM; shrinking the
    trailing sub-chunks shortens it (the walk uses the runtime's own bounds). Reduce-scatter has no
    pull-back after its last GEMM, so tapering cannot gain there."""
    def times(kind, m=16384, k=4096):
        return overlap_cost.estimate(kind, m, 8192, k, 2, 2, H200, tile_ok=False, copy_engine_ok=True,
                                     chunks=3)
    all_reduce = times("all_reduce")
    assert all_reduce["copy_engine:3x0.5"] < all_reduce["copy_engine:3"] * 0.97
    tail_rows = {key: 16384 // 2 - start for key, (start, _) in (
        ("copy_engine:3", copy_engine_blocks(16384, 2, 3)[0][-1]),
        ("copy_engine:3x0.5", copy_engine_blocks(16384, 2, 3, 0.5)[0][-1]))}
    saved = (tail_rows["copy_engine:3"] - tail_rows["copy_engine:3x0.5"]) * 8192 * 2 / (H200.p2p_gbps * 1e9)
    gained = all_reduce["copy_engine:3"] - all_reduce["copy_engine:3x0.5"]
    assert gained <= saved + 1e-9       # no more than the shorter pull-back (the GEMMs cost the same)
    scatter = times("reduce_scatter")
    assert scatter["copy_engine:3x0.5"] >= scatter["copy_engine:3"] - 1e-9
    # Where the blocks are too short to taper, the walk is the equal-sub-chunk one.
    tiny = times("all_reduce", m=4, k=64)
    assert tiny["copy_engine:3x0.5"] == tiny["copy_engine:3"]


def _gpu_and_host(monkeypatch, kind, m, n, k, world, chunks, taper=1.0, profile=H100):
    """The copy-engine estimate, its GPU walk alone and its host issue time."""
    estimate = overlap_cost._copy_engine_time(kind, m, n, k, 2, world, chunks, taper, profile)
    host = overlap_cost.ce_host_time(kind, world, chunks)
    with monkeypatch.context() as patch:
        patch.setattr(overlap_cost, "ce_host_time", lambda *args: 0.0)
        gpu = overlap_cost._copy_engine_time(kind, m, n, k, 2, world, chunks, taper, profile)
    return estimate, gpu, host


@pytest.mark.parametrize("world", [2, 3, 4])
def test_copy_engine_estimate_is_never_below_the_host_issue_time(world, monkeypatch):
    """Host-bound calls: the slower of host and GPU plus a share of the faster on 2 ranks; beyond
    2 ranks, with the host above CE_HOST_OVERLAP_LIMIT of the GPU, their sum."""
    for chunks, taper in overlap_cost.CE_SCHEDULES:
        estimate, gpu, host = _gpu_and_host(monkeypatch, "all_reduce", 256 * world, 256, 256, world,
                                            chunks, taper, H200)
        assert gpu < host
        if world == 2:
            assert host <= estimate <= host * (1 + overlap_cost.CE_HOST_INTERFERENCE)
        else:
            assert estimate == pytest.approx(gpu + host)
    assert _choose(m=256 * world, n=256, k=256, world=world, profile=H200).mode == "sequential"


@pytest.mark.parametrize("world", [2, 4])
def test_replayed_calls_are_priced_at_the_graph_launch(world):
    """With CUDA-graph replay the host's part is the op's dispatch and the graph's launch (about
    0.1-0.2 ms, growing with the synchronisations' graph nodes), not the op-by-op issue; the GPU
    walk is unchanged."""
    oc = overlap_cost
    for kind in ("all_reduce", "reduce_scatter"):
        for count in (1, 2, 4):
            replayed = oc.ce_host_time(kind, world, count, replay=True)
            assert 50e-6 < replayed < 0.5 * oc.ce_host_time(kind, world, count)
        assert oc.ce_host_time(kind, world, 4, True) > oc.ce_host_time(kind, world, 1, True)
    # A host-bound call (tiny GEMMs): op by op it costs at least its issue time; replayed, its GPU
    # walk plus a small share of the launch.
    for chunks, taper in oc.CE_SCHEDULES:
        args = ("all_reduce", 256 * world, 256, 256, 2, world, chunks, taper, H200)
        eager, replayed = oc._copy_engine_time(*args), oc._copy_engine_time(*args, replay=True)
        assert replayed < 0.5 * eager
        assert eager >= oc.ce_host_time("all_reduce", world, chunks)


def test_replay_takes_the_gain_of_a_host_bound_shape():
    """70B o_proj all-reduce, M = 4096, P = 2: issued op by op every copy-engine schedule ran at
    1.01-1.48x sequential on 2 x H200 (matmul_allreduce.json: 0.32-1.14 ms of host issue per call
    against a 0.36 ms GEMM); replayed from CUDA graphs, the schedule the model now picks ran at
    0.825x sequential on 2 x H100 (matmul_allreduce_2xh100.json). The model keeps sequential
    without replay and takes the copy engine with it."""
    assert _choose(m=4096, k=4096).mode == "sequential"
    choice = _choose(m=4096, k=4096, replay=True)
    assert choice.mode == "copy_engine" and choice.replay
    assert not _choose(m=4096, k=4096, replay=True, symmetric_memory=False).replay


def test_host_share_fades_where_the_gpu_is_the_slower(monkeypatch):
    """Nothing syncs the host, so a GPU-bound call is its GPU walk plus a share of the host time
    scaled by host / GPU: 70B down_proj M = 8192 all-reduce, 4 x H100, measured 1.762 ms with a GPU
    walk of 1.76 (the constant share gave 1.965)."""
    estimate, gpu, host = _gpu_and_host(monkeypatch, "all_reduce", 8192, 8192, 28672 // 4, 4, 2)
    assert host < overlap_cost.CE_HOST_OVERLAP_LIMIT * gpu
    assert estimate == pytest.approx(gpu + overlap_cost.CE_HOST_INTERFERENCE * host * host / gpu)
    assert estimate < gpu + 0.5 * overlap_cost.CE_HOST_INTERFERENCE * host


def test_beyond_two_ranks_a_call_near_host_bound_is_priced_without_overlap(monkeypatch):
    """RS o_proj M = 8192 c = 1 at P = 4 (host 0.69 of the GPU) ran 0.808 ms on 4 x H100 and 0.622 on
    4 x H200 against 0.739 / 0.726 sequential: priced at host + GPU, it is not chosen; the same call
    on 2 ranks keeps the overlapped pricing."""
    estimate, gpu, host = _gpu_and_host(monkeypatch, "reduce_scatter", 8192, 8192, 2048, 4, 1)
    assert overlap_cost.CE_HOST_OVERLAP_LIMIT * gpu < host < gpu
    assert estimate == pytest.approx(gpu + host)
    two, gpu2, host2 = _gpu_and_host(monkeypatch, "reduce_scatter", 8192, 8192, 2048, 2, 1)
    assert two < gpu2 + host2
    assert _choose("reduce_scatter", m=8192, k=2048, world=4).mode == "sequential"


@pytest.mark.parametrize("kind, m, k, plan, measured_vs_sequential", [
    # 4 x H100, hand-off runtime (bench/results/matmul_allreduce_4gpu.json)
    ("reduce_scatter", 16384, 2048, "copy_engine:1", 0.784),      # 70B o_proj: c = 2 ran 0.924
    ("reduce_scatter", 16384, 4096, "copy_engine:2", 0.812),
    ("reduce_scatter", 16384, 7168, "copy_engine:2", 0.902),      # 70B down_proj
    ("reduce_scatter", 4096, 2048, "sequential", 2.01),           # 70B o_proj, c = 1 host-bound
    ("all_reduce", 4096, 7168, "sequential", 0.968),              # 70B down_proj: gain within noise
    ("all_reduce", 16384, 2048, "sequential", 1.085),             # 70B o_proj: every copy engine lost
])
def test_four_rank_choices_follow_the_4xh100_run(kind, m, k, plan, measured_vs_sequential):
    choice = _choose(kind, m=m, k=k, world=4, profile=H100)
    assert overlap_cost.plan_key(choice) == plan, choice.reason


def test_copy_engine_host_and_barrier_costs_count_what_the_runtime_issues():
    """Per sub-chunk, the runtime issues P GEMMs, P - 2 staging adds, P - 1 barriers-and-pulls in
    phase 1 (all-reduce: one more barrier, a local copy and P - 1 pull-backs), each barrier 3 (P - 1)
    driver calls: the host cost per sub-chunk grows with P, and a barrier waits for every peer."""
    oc = overlap_cost
    host = oc.ce_host_time
    for kind in ("all_reduce", "reduce_scatter"):
        per_chunk = [host(kind, world, 3) - host(kind, world, 2) for world in (2, 3, 4, 5)]
        assert all(b > a for a, b in zip(per_chunk, per_chunk[1:]))
    # Reduce-scatter, P = 2, one sub-chunk: 2 GEMMs, 2 barriers (3 driver calls each), 1 pull.
    single = host("reduce_scatter", 2, 1) - oc.CE_HOST_CALL_S
    assert single == pytest.approx(2 * oc.CE_HOST_LAUNCH_S + 2 * (oc.CE_HOST_STEP_S + 3 * oc.CE_HOST_MEMOP_S)
                                   + oc.CE_HOST_PULL_S)
    assert overlap_cost.ce_barrier_time(4) > overlap_cost.ce_barrier_time(2)


def test_copy_engine_keys_round_trip_through_the_choice():
    for chunks, taper in overlap_cost.CE_SCHEDULES:
        forced = _choose(mode="copy_engine", chunks=chunks, profile=H200)
        assert forced.chunks == chunks and forced.taper in {q for _, q in overlap_cost.CE_SCHEDULES}
        assert overlap_cost.plan_key(forced) in forced.estimates_s
        assert forced.estimates_s[overlap_cost.plan_key(forced)] == min(
            v for key, v in forced.estimates_s.items() if key.startswith("copy_engine:"))
    assert overlap_cost.copy_engine_key(3, 0.5) == "copy_engine:3x0.5"
    assert overlap_cost.copy_engine_key(2) == "copy_engine:2"


def test_copy_engine_refusals():
    for kwargs, why in (({"is_cuda": False}, "needs CUDA"), ({"symmetric_memory": False}, "unavailable")):
        choice = _choose(mode="copy_engine", **kwargs)
        assert choice.mode == "sequential" and why in choice.reason
        assert not any(key.startswith("copy_engine:") for key in choice.estimates_s)
    uneven = _choose(kind="reduce_scatter", m=1001, mode="copy_engine")
    assert uneven.mode == "sequential" and "equal rank blocks" in uneven.reason
    forced = _choose(mode="copy_engine", chunks=3)
    assert (forced.mode, forced.chunks) == ("copy_engine", 3)
    assert overlap_cost.copy_engine_supported("all_gather", 64, 2, True, True) is not None
    # The tile kernel also needs triton; the copy engine does not.
    no_triton = _choose(triton=False)
    assert not any(key.startswith("tile:") for key in no_triton.estimates_s)
    assert any(key.startswith("copy_engine:") for key in no_triton.estimates_s)


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
    key = overlap_cost.plan_key(choice)
    assert choice.estimates_s[key] <= sequential * (1 - overlap_cost.MARGINS[choice.mode])
    assert choice.mode in ("chunked", "sequential") or cuda


@pytest.mark.parametrize("name", ["matmul_allreduce.json", "matmul_allreduce_4gpu.json",
                                  "matmul_allreduce_2xh100.json"])
def test_choices_never_lose_to_sequential_on_the_measured_bench(name):
    """Replay the model on the committed 2- and 4-GPU measurements (bench/replay_overlap_cost.py):
    every choice was measured and none is slower than sequential; runs of the current runtime
    (CUDA-graph replay) record exactly the choices the model in this tree makes. At P = 2 the
    reduce-scatters beat torch's fused_matmul_reduce_scatter on every committed run; at P = 4 the
    latest host's fused op is 0.99x our best schedule (a miss the 4-GPU results explain), so the
    target is the benchmark's to report there, not this test's."""
    path = os.path.join(RESULTS_DIR, name)
    if not os.path.exists(path):
        pytest.skip(f"bench/results/{name} not committed")
    with open(path) as handle:
        report = load_bench("replay_overlap_cost").replay(json.load(handle))
    assert not report["unmeasured"], "re-run the bench for these choices"
    replayed = report["summary"]["replayed"]
    assert replayed["worst_vs_sequential"] <= 1.0, [
        (row["kind"], row["shape"], row["choice"]) for row in report["rows"] if row["vs_sequential"] > 1]
    with open(path) as handle:
        results = json.load(handle)
    if results.get("copy_engine_replay"):
        assert [row["choice"] for row in report["rows"]] == [row["recorded"] for row in report["rows"]]
    if results["gpus"] == 2:
        assert replayed["rs_vs_torch_fused_geomean"] < 1.0
