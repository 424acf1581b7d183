"""Replay the current overlap cost model on measured runs of bench/matmul_allreduce.py.

    python bench/replay_overlap_cost.py bench/results/matmul_allreduce_4gpu.json [more.json ...]
    git show REV:bench/results/matmul_allreduce.json > old.json   # an older run
    (--json OUT: the whole report, with estimate / measured of every variant of every row)

For every row of a run, the model as the code stands now recomputes its estimates and choice with
the profile the bench would use on the run's device (``gpus`` ranks), and the choice's *measured*
time is looked up. Printed per run: each row's recorded and replayed choice, the measured time of
the replayed one over sequential and ideal, the best measured variant the model could have picked
(the oracle); estimate / measured per variant over the run's rows; and the bench's summary keys
(geomean_over_ideal, worst_vs_sequential, rs_vs_torch_fused_geomean) as recorded, as replayed and
for the oracle, each over the rows whose pick was measured. A replayed choice the run did not
measure is listed as unmeasured and left out of the replayed summary, never guessed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import matmul_allreduce as bench  # noqa: E402  (bench/matmul_allreduce.py: summarize)

from graphopt.analysis import overlap_cost  # noqa: E402
from graphopt.analysis.device_profile import H100, H200, DeviceProfile  # noqa: E402

SUMMARY_KEYS = ("geomean_over_ideal", "worst_vs_sequential", "rs_vs_torch_fused_geomean")
PLAN_PREFIXES = ("sequential", "chunked:", "copy_engine:", "tile:")


def replay_row(row: dict, world: int, profile, symmetric_memory: bool, graph_replay: bool = False
               ) -> dict:
    """The current model's choice for one measured row, its measured time (None: not measured) and
    estimate / measured of every variant that has both."""
    choice = overlap_cost.choose_overlap(row["kind"], row["M"], row["N"], row["K"], 2, world, profile,
                                         is_cuda=True, symmetric_memory=symmetric_memory,
                                         replay=graph_replay)
    key = overlap_cost.plan_key(choice)
    measured = row["ms"]
    plans = {label: ms for label, ms in measured.items() if label.startswith(PLAN_PREFIXES)}
    oracle = min(plans, key=plans.get)
    taken = measured.get(key)
    return {"kind": row["kind"], "shape": row["shape"], "recorded": row.get("cost_model_choice"),
            "choice": key, "reason": choice.reason, "estimate_ms": choice.estimates_s[key] * 1e3,
            "measured_ms": taken,
            "vs_sequential": None if taken is None else taken / measured["sequential"],
            "over_ideal": None if taken is None else taken / measured["ideal"],
            "oracle": oracle, "oracle_vs_sequential": plans[oracle] / measured["sequential"],
            "est_over_measured": {label: choice.estimates_s[label] * 1e3 / ms
                                  for label, ms in measured.items() if label in choice.estimates_s}}


def replay(results: dict) -> dict:
    """Every row replayed (``replay_row``) and the summary keys recorded, replayed and oracle."""
    if "profile" in results:      # the profile the run's own choices used (bench --profile)
        profile = DeviceProfile(**results["profile"])
    else:
        profile = H200 if "H200" in results["device"] else H100   # what current_profile() gives there
    symmetric_memory = bool(results.get("api", {}).get("symmetric_memory_module"))
    # Runs before CUDA-graph replay existed timed copy-engine calls issued op by op.
    graph_replay = bool(results.get("copy_engine_replay", False))
    rows = [replay_row(row, results["gpus"], profile, symmetric_memory, graph_replay)
            for row in results["rows"]]

    def summary(pick) -> dict:
        taken = [{**row, "ms": {**row["ms"], "graphopt_auto": row["ms"][label]}}
                 for row, label in zip(results["rows"], pick) if label in row["ms"]]
        summarized = bench.summarize(taken)
        return {"rows": len(taken), **{key: summarized[key] for key in SUMMARY_KEYS}}

    ratios: dict[str, list[float]] = {}
    for row in rows:
        for label, ratio in row["est_over_measured"].items():
            ratios.setdefault(label, []).append(ratio)
    return {
        "device": results["device"], "gpus": results["gpus"], "torch": results.get("torch"),
        "rows": rows,
        "unmeasured": [f"{row['kind']} {row['shape']}: {row['choice']}" for row in rows
                       if row["measured_ms"] is None],
        "summary": {"recorded": {key: results.get("summary", {}).get(key) for key in SUMMARY_KEYS},
                    "replayed": summary([row["choice"] for row in rows]),
                    "oracle": summary([row["oracle"] for row in rows])},
        "est_over_measured": {label: (bench.geomean(values), min(values), max(values))
                              for label, values in sorted(ratios.items())},
    }


def to_text(report: dict) -> str:
    fmt = lambda value: "-" if value is None else f"{value:.3f}"  # noqa: E731
    lines = [f"## {report['gpus']} x {report['device']}, torch {report['torch']}", "",
             "| kind | shape | recorded | replayed | est ms | measured ms | /seq | /ideal | est/meas "
             "| oracle |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in report["rows"]:
        ms = row["measured_ms"]
        lines.append(
            f"| {row['kind']} | {row['shape']} | {row['recorded']} | {row['choice']} "
            f"| {fmt(row['estimate_ms'])} | {'unmeasured' if ms is None else fmt(ms)} "
            f"| {fmt(row['vs_sequential'])} | {fmt(row['over_ideal'])} "
            f"| {fmt(row['est_over_measured'].get(row['choice']))} "
            f"| {row['oracle']} {fmt(row['oracle_vs_sequential'])} |")
    lines += ["", "estimate / measured over the rows (geomean [min, max]):"]
    lines += [f"  {label}: {geo:.3f} [{low:.3f}, {high:.3f}]"
              for label, (geo, low, high) in report["est_over_measured"].items()]
    lines += ["", "summary:"]
    lines += [f"  {name}: " + ", ".join(f"{key} {value if key == 'rows' else fmt(value)}"
                                        for key, value in values.items())
              for name, values in report["summary"].items()]
    if report["unmeasured"]:
        lines += ["", "replayed choices not measured (left out of the replayed summary):"]
        lines += [f"  {line}" for line in report["unmeasured"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+", help="matmul_allreduce.json files")
    parser.add_argument("--json", help="write every run's report here")
    args = parser.parse_args()
    reports = {}
    for path in args.results:
        with open(path) as handle:
            reports[path] = replay(json.load(handle))
        print(f"# {os.path.basename(path)}")
        print(to_text(reports[path]))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(reports, handle, indent=1)


if __name__ == "__main__":
    main()
