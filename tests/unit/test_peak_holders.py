"""graphopt.debug.peak_holders: the allocator's record of a step read back to its peak."""

import os

from graphopt.debug import peak_holders

HERE = os.path.abspath(__file__)
TORCH_FILE = os.path.join(os.sep, "site-packages", "torch", "_ops.py")


def _frames(line: int, name: str = "call", phase: str = "forward") -> list[dict]:
    """Innermost first: a torch frame, the allocating line of this file, then the caller."""
    return [{"filename": TORCH_FILE, "line": 10, "name": "__call__"},
            {"filename": HERE, "line": line, "name": name},
            {"filename": TORCH_FILE, "line": 20, "name": phase}]


def _alloc(addr, size, line, phase="forward"):
    return {"action": "alloc", "addr": addr, "size": size, "frames": _frames(line, phase=phase)}


def _free(addr, size):
    return {"action": "free_completed", "addr": addr, "size": size}


# the line "TORCH_FILE = ..." above stands for a generated module's "buf1 = empty_strided(...)"
BUFFER_LINE = next(n for n, text in enumerate(open(HERE), 1) if text.startswith("TORCH_FILE"))


def test_the_peak_is_the_highest_point_and_its_holders_are_grouped_by_allocating_line():
    trace = [
        _alloc(1, 100, BUFFER_LINE), _alloc(2, 300, 1), _free(1, 100),   # 400 at most so far
        _alloc(3, 50, BUFFER_LINE, "backward"), _alloc(4, 70, BUFFER_LINE, "backward"),   # 420: peak
        {"action": "free_requested", "addr": 3, "size": 50},   # not yet reusable: still counted
        _free(3, 50), _free(4, 70), _alloc(5, 10, 1, "backward"),
        _free(999, 5),   # a block from before the record: ignored
    ]
    report = peak_holders.holders_at_peak(trace)
    assert report["peak_over_start_bytes"] == 420
    assert report["live_blocks_at_peak"] == 3
    assert report["phase_at_peak"] == "backward"
    assert [(h["phase"], h["bytes"], h["blocks"]) for h in report["holders"]] == [
        ("forward", 300, 1), ("backward", 120, 2)]
    where = report["holders"][1]["where"]
    assert where.startswith(f"test_peak_holders.py:{BUFFER_LINE} call: TORCH_FILE = ")
    assert "torch" not in where.split(":")[0]   # the torch frames are passed over
    text = peak_holders.format_report(report)
    assert "in the backward" in text and "test_peak_holders.py:1 call" in text


def test_holders_past_top_are_summed_and_an_empty_record_reads_as_nothing():
    trace = [_alloc(i, 10 * (i + 1), i + 1) for i in range(5)]
    report = peak_holders.holders_at_peak(trace, top=2)
    assert [h["bytes"] for h in report["holders"]] == [50, 40]
    assert report["other_bytes"] == 10 + 20 + 30
    empty = peak_holders.holders_at_peak([])
    assert empty["peak_over_start_bytes"] == 0 and empty["holders"] == [] and empty["phase_at_peak"] == "-"
    assert peak_holders.record_step(lambda: None) is None or peak_holders.format_report(None)


def test_plans_inductor_names_the_holders_where_a_peak_misses_its_plan():
    from test_plans_inductor import _bench
    bench = _bench()
    holders = peak_holders.holders_at_peak([_alloc(1, 2**29, BUFFER_LINE, "backward")])
    row = {"model": "hf", "seq": 16384, "row": "offload", "peak_bytes": 9 * 2**30,
           "planned_peak_bytes": 8 * 2**30, "peak_over_planned": 9 / 8, "plan_peak_at": "f:exp_3",
           "peak_holders": holders}
    notes = bench.notes_for({"rows": [row, {**row, "row": "offload:0.5", "peak_over_planned": 1.01}]})
    (note,) = [n for n in notes if "held by" in n]
    assert note.startswith("hf S=16384 offload: measured peak 9.00 GiB over planned 8.00")
    assert f"in the backward, held by: 512 MiB backward `test_peak_holders.py:{BUFFER_LINE}" in note
