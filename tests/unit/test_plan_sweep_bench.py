"""bench/plan_sweep.py: rows measured on one card never share a table with another card's."""
import json

import pytest
from conftest import load_bench


def _bench():
    return load_bench("plan_sweep")


def _rows(device, *names):
    return {"device": device, "rows": [{"group": "hf-8k", "layout_name": n, "step_s": 0.4} for n in names]}


def test_resumed_rows_of_another_card_are_dropped_with_a_note():
    bench = _bench()
    kept = _rows("NVIDIA H100 80GB HBM3", "a", "b")
    assert bench.same_machine_rows(kept, "NVIDIA H100 80GB HBM3") is kept
    dropped = bench.same_machine_rows(kept, "NVIDIA H200")
    assert dropped["rows"] == []
    assert dropped["notes"] == ["2 earlier rows not kept: measured on NVIDIA H100 80GB HBM3, "
                                "this run is on NVIDIA H200"]


def test_merging_a_sweep_of_another_card_is_refused(tmp_path):
    bench = _bench()
    out = tmp_path / "out"
    out.mkdir()
    (out / "plan_sweep.json").write_text(json.dumps(_rows("NVIDIA H100 80GB HBM3", "a")))
    other = tmp_path / "other.json"
    other.write_text(json.dumps(_rows("NVIDIA H200", "b")))
    with pytest.raises(SystemExit, match="measured on NVIDIA H200, the rows in --out on NVIDIA H100"):
        bench.main(["--out", str(out), "--predict-only", "--merge", str(other)])
