"""How the planner explains itself: the best layouts with their time split and peak, and for the
chosen one why each alternative lost -- the best layout that differs from it in one choice (tensor,
sequence or data-parallel degree, micro-batch, memory plan, FSDP resharding, code generator), with
the part of the step that decided it, and the faster layouts that do not fit."""

from __future__ import annotations

from typing import Any, Callable

from graphopt.planning.predict import Prediction
from graphopt.planning.world import GIB

# ``report`` below is the planner's PlanReport (graphopt/planning/planner.py), which imports this
# module to explain itself; reading it by attribute keeps the two modules out of an import cycle.
PlanReport = Any

PARTS = ("compute", "recompute", "tp_comm", "sp_comm", "fsdp_comm", "copies", "optimizer")

# The choices an alternative can differ in, and how each is named in a reason.
CHOICES: tuple[tuple[str, Callable], ...] = (
    ("tensor-parallel degree", lambda l: l.tp),
    ("sequence-parallel degree", lambda l: l.sp),
    ("micro-batch", lambda l: l.micro_batch),
    ("memory plan", lambda l: l.memory),
    ("FSDP resharding", lambda l: l.reshard_after_forward),
    ("code generator", lambda l: l.codegen),
)


def reasons(report: "PlanReport") -> list[dict[str, Any]]:
    """For the chosen layout: per choice, the best fitting layout that differs in it and why it
    lost; then the fastest layouts that would beat it but do not fit."""
    chosen = report.chosen
    if chosen is None:
        return []
    result = []
    for choice, value in CHOICES:
        rivals = [p for p in report.ranked if value(p.layout) != value(chosen.layout)]
        if rivals:
            rival = rivals[0]
            result.append({"choice": choice, "alternative": rival.layout.describe(),
                           "step_s": rival.step_s, "reason": lost_because(chosen, rival)})
    for rival in report.unfit:
        if rival.step_s >= chosen.step_s:
            break
        result.append({"choice": "does not fit", "alternative": rival.layout.describe(),
                       "step_s": rival.step_s,
                       "reason": f"{rival.layout.describe()} would be "
                                 f"{(1 - rival.step_s / chosen.step_s) * 100:.1f} % faster but does "
                                 f"not fit: {rival.why_not_fit()}"})
        if len(result) >= len(CHOICES) + 3:
            break
    return result


def lost_because(chosen: Prediction, rival: Prediction) -> str:
    """'<chosen> beats <rival>: 6 % less step time (recompute +12.3 ms, tp_comm -5.1 ms)'."""
    slower = rival.step_s / chosen.step_s - 1
    deltas = {part: rival.parts_s[part] - chosen.parts_s[part] for part in PARTS}
    worse = sorted((d, p) for p, d in deltas.items() if d > 0)[::-1]
    better = sorted((d, p) for p, d in deltas.items() if d < 0)
    detail = ", ".join(f"{p} {d * 1e3:+.1f} ms" for d, p in (worse[:2] + better[:1])
                       if abs(d) >= 1e-3 * chosen.step_s)
    if slower >= 0.0005:
        verdict = f"{slower * 100:.1f} % less step time"
    elif rival.peak_bytes > chosen.peak_bytes:
        verdict = (f"the same predicted step time in {(rival.peak_bytes - chosen.peak_bytes) / GIB:.1f} "
                   "GiB less memory")
    else:
        verdict = (f"the same predicted step time (the alternative holds "
                   f"{(chosen.peak_bytes - rival.peak_bytes) / GIB:.1f} GiB less; the simpler layout "
                   "is kept)")
    return f"{_short(chosen)} beats {_short(rival)}: {verdict}" + (f" ({detail})" if detail else "")


def _short(prediction: Prediction) -> str:
    return prediction.layout.describe()


def _row(rank: Any, p: Prediction) -> list[str]:
    return [str(rank), p.layout.describe(), f"{p.step_s * 1e3:.1f}",
            *[f"{p.parts_s[part] * 1e3:.1f}" for part in PARTS],
            f"{p.peak_bytes / GIB:.1f}", f"{p.mfu * 100:.1f}", f"{p.tokens_per_s_per_gpu:.0f}"]


HEADER = ["#", "layout", "step ms", *[f"{part} ms" for part in PARTS], "peak GiB", "MFU %",
          "tok/s/GPU"]


def _table(rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _heading(report: "PlanReport") -> list[str]:
    model, world = report.model, report.world
    return [f"{model['model']} ({model['family']}, {model['blocks']} blocks, "
            f"{model['total_params'] / 1e9:.2f} B parameters) on {world['nodes']} x "
            f"{world['gpus_per_node']} GPUs ({world['profile']['name']}, "
            f"{world['usable_memory_gib']} GiB usable each): sequence {report.seq_len}, "
            f"{report.global_batch_tokens} tokens per step",
            f"{len(report.ranked)} layouts fit, {len(report.unfit)} do not, "
            f"{len(report.refused)} degree combinations refused by the rules"]


def report_markdown(report: "PlanReport", top_k: int = 5) -> str:
    lines = ["# Layout plan", "", *_heading(report), ""]
    if report.chosen is not None:
        p = report.chosen
        lines += [f"Chosen: **{p.layout.describe()}**: step {p.step_s * 1e3:.1f} ms, peak "
                  f"{p.peak_bytes / GIB:.1f} GiB, MFU {p.mfu * 100:.1f} %; flags "
                  f"`{report.flags()}`", ""]
        if p.overlap:
            lines += [f"Tensor-parallel sites: {p.overlap}", ""]
    lines += ["## Best layouts that fit", "",
              *_table([_row(i + 1, p) for i, p in enumerate(report.ranked[:top_k])]), ""]
    why = reasons(report)
    if why:
        lines += ["## Why the alternatives lost", ""]
        lines += [f"- {entry['choice']}: {entry['reason']}" for entry in why]
        lines.append("")
    if report.unfit:
        lines += ["## Fastest layouts that do not fit", "",
                  *_table([_row("-", p) for p in report.unfit[:top_k]]), ""]
    if report.refused:
        lines += ["## Refused by the rules", ""]
        lines += [f"- {r.what}: {r.reason}" for r in report.refused[:12]]
        if len(report.refused) > 12:
            lines.append(f"- ... and {len(report.refused) - 12} more")
    return "\n".join(lines) + "\n"
