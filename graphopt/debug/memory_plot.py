"""Pictures and tables of memory plans for the dump: an SVG of bytes live over the schedule.

Written by hand (no plotting library): one polyline per timeline, the forward/backward boundary
as a dashed vertical line, the budget as a red horizontal line, each peak marked.
"""

from __future__ import annotations

import html
from typing import Sequence

from graphopt.analysis.liveness import Timeline

_COLORS = ("#888888", "#1f77b4", "#2ca02c", "#d62728", "#9467bd")
_WIDTH, _HEIGHT, _MARGIN = 900, 360, 60


def _gib(nbytes: float) -> str:
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:.2f} GiB"
    if nbytes >= 2**20:
        return f"{nbytes / 2**20:.1f} MiB"
    return f"{nbytes / 2**10:.1f} KiB"


def timeline_svg(series: Sequence[tuple[str, Timeline]], budget: int | None = None, title: str = "") -> str:
    """An SVG line chart of bytes live per step; x is the fraction of each schedule done, so
    plans with different numbers of steps (recomputation adds steps) line up at both ends."""
    top = max([t.peak for _, t in series] + [budget or 0, 1])
    plot_w, plot_h = _WIDTH - 2 * _MARGIN, _HEIGHT - 2 * _MARGIN

    def x_of(index: int, count: int) -> float:
        return _MARGIN + plot_w * (index / max(count - 1, 1))

    def y_of(nbytes: float) -> float:
        return _HEIGHT - _MARGIN - plot_h * (nbytes / top)

    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{_WIDTH}' height='{_HEIGHT}' "
             "font-family='sans-serif' font-size='11'>",
             f"<rect width='{_WIDTH}' height='{_HEIGHT}' fill='white'/>",
             f"<text x='{_MARGIN}' y='20' font-size='13'>{html.escape(title)}</text>"]
    for tick in range(5):
        value = top * tick / 4
        y = y_of(value)
        parts.append(f"<line x1='{_MARGIN}' x2='{_WIDTH - _MARGIN}' y1='{y:.1f}' y2='{y:.1f}' "
                     "stroke='#eee'/>")
        parts.append(f"<text x='4' y='{y + 4:.1f}'>{_gib(value)}</text>")
    parts.append(f"<text x='{_WIDTH / 2 - 60:.0f}' y='{_HEIGHT - 15}'>schedule (forward | backward)</text>")
    if budget:
        y = y_of(budget)
        parts.append(f"<line x1='{_MARGIN}' x2='{_WIDTH - _MARGIN}' y1='{y:.1f}' y2='{y:.1f}' "
                     "stroke='red' stroke-width='1.5'/>")
        parts.append(f"<text x='{_WIDTH - _MARGIN - 120}' y='{y - 4:.1f}' fill='red'>budget "
                     f"{_gib(budget)}</text>")
    for index, (label, timeline) in enumerate(series):
        color = _COLORS[index % len(_COLORS)]
        count = len(timeline.live_bytes)
        points = " ".join(f"{x_of(i, count):.1f},{y_of(b):.1f}" for i, b in enumerate(timeline.live_bytes))
        parts.append(f"<polyline fill='none' stroke='{color}' stroke-width='1.5' points='{points}'/>")
        boundary = x_of(timeline.boundary, count)
        parts.append(f"<line x1='{boundary:.1f}' x2='{boundary:.1f}' y1='{_MARGIN}' "
                     f"y2='{_HEIGHT - _MARGIN}' stroke='{color}' stroke-dasharray='4,3'/>")
        peak_x, peak_y = x_of(timeline.peak_index, count), y_of(timeline.peak)
        parts.append(f"<circle cx='{peak_x:.1f}' cy='{peak_y:.1f}' r='3' fill='{color}'/>")
        parts.append(f"<text x='{_MARGIN + 10}' y='{40 + 14 * index}' fill='{color}'>"
                     f"{html.escape(label)}: peak {_gib(timeline.peak)} at "
                     f"{html.escape(timeline.peak_label)}</text>")
    parts.append("</svg>")
    return "\n".join(parts)


def plan_table_markdown(summary: dict) -> str:
    """The saved / recomputed / offloaded tensors of a plan, largest first."""
    offloaded = sum(row["action"] == "offload" for row in summary["table"])
    # The realized graphs are simulated as partitioned, before the offload pass inserts its copies:
    # with offloaded tensors their peak still holds them on the device.
    realized = "realized graphs" + (f", before the offload pass moves {offloaded} "
                                    f"tensor{'s' if offloaded > 1 else ''} off the device"
                                    if offloaded else "")
    budget = summary.get("memory_budget")
    if summary.get("saved_budget_bytes") is not None:
        budget_line = (f"{budget}: keep at most {_gib(summary['saved_budget_bytes'])} of saved activations "
                       f"(kept: {_gib(summary.get('kept_saved_bytes'))})")
    elif summary.get("budget_bytes") is not None:
        step = summary.get("planned_step_peak_bytes")
        budget_line = (f"{_gib(budget if isinstance(budget, int) else summary['budget_bytes'])} for the "
                       "step with the graph's inputs" + (f" (planned: {_gib(step)})" if step else ""))
    else:
        budget_line = "none"
    lines = ["# Rematerialization plan", "",
             f"- budget: {budget_line}",
             *([f"- counts: {summary['counts']}"] if summary.get("counts") else []),
             f"- planned peak: {_gib(summary['planned_peak_bytes'])} (min-cut plan: "
             f"{_gib(summary['min_cut_peak_bytes'])}; {realized}: "
             f"{_gib(summary['realized_peak_bytes'])})",
             f"- recompute time (model): {summary['recompute_time_s'] * 1e3:.3f} ms "
             f"({summary['extra_recompute_time_s'] * 1e3:+.3f} ms over the min-cut plan)",
             "", "![memory timeline](remat_memory.svg)", "",
             "| tensor | action | size | offload alpha | recompute cost |", "| --- | --- | --- | --- | --- |"]
    for row in sorted(summary["table"], key=lambda r: (-r["bytes"], r["tensor"])):
        cost = "-" if row["recompute_s"] is None else f"{row['recompute_s'] * 1e6:.1f} us"
        alpha = f"{row['alpha']:.2f}" if row["action"] == "offload" else "-"
        lines.append(f"| {row['tensor']} | {row['action']} | {_gib(row['bytes'])} | {alpha} | {cost} |")
    return "\n".join(lines) + "\n"
