"""The dump's pages, for a person to read in a minute: an index of every graph, stage and pass, and
one page per graph (summary, plans as tables, memory picture, then the diffs; raw JSON behind a link).

Rendered from what ``GraphRecorder`` recorded -- each pass's entry (matched, modified, stats,
refusals) and the notes of the partition (the rematerialization plan) -- plus the node facts of the
graphs (model source line, module path, shape). Every field is read with a default, so a summary
written by an older or newer graphopt still renders.
"""

from __future__ import annotations

import difflib
import html
import json
import re
from typing import Any, Iterable

esc = html.escape

STAGES = ("pre_grad", "joint", "partition", "forward", "backward", "inference")
_STAGE_TITLES = {"pre_grad": "pre-grad (torch IR)", "joint": "joint (fw + bw)",
                 "partition": "partition", "forward": "forward", "backward": "backward",
                 "inference": "inference"}
_REMAT_PASS = "plan_rematerialization"
_TABLE_ROWS = 40  # rows of a plan shown before the rest folds away
_ESTIMATE_TITLES = {"gemm": "GEMM alone", "comm": "collective alone"}
_DECISIONS = {"save": "keep", "recompute": "recompute", "recompute (min-cut)": "recompute (min-cut)"}

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.2em 1.5em;color:#222;font-size:14px}
h1{font-size:20px;margin:0 0 .3em}h2{font-size:16px;margin:1.2em 0 .4em;border-bottom:1px solid #ddd}
.meta{color:#555;margin:.2em 0 .8em}
table.grid{border-collapse:collapse;margin:.3em 0}
table.grid td,table.grid th{border:1px solid #d0d0d0;padding:3px 7px;text-align:left;vertical-align:top}
table.grid th{background:#f2f2f2}td.num{text-align:right;font-variant-numeric:tabular-nums}
.fired{background:#d9f5d9;border-radius:3px;padding:1px 4px;margin:1px 0}
.idle{background:#f3f3f3;border-radius:3px;padding:1px 4px;margin:1px 0}
.off{color:#999;margin:1px 0}.warn{color:#b00020;font-weight:bold}
.why{color:#7a5200;font-size:12px;margin:0 0 3px 8px}
.chosen{font-weight:bold;background:#d9f5d9}
.src{font-family:monospace;font-size:12px;color:#333}
ul.summary li{margin:2px 0}
table.diff{font-family:monospace;font-size:12px;border-collapse:collapse}
.diff_header{background:#eee}.diff_next{background:#ddd}
.diff_add{background:#b7f0b7}.diff_chg{background:#ffe48a}.diff_sub{background:#f7b3b3}
pre{background:#f6f6f6;padding:8px;font-size:12px;overflow-x:auto}details{margin:4px 0}
"""


def _page(title: str, body: Iterable[str]) -> str:
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def fmt_bytes(nbytes: Any) -> str:
    if not isinstance(nbytes, (int, float)):
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{int(nbytes)} B"


def _fmt_ms(seconds: Any) -> str:
    return f"{seconds * 1e3:.3f} ms" if isinstance(seconds, (int, float)) else "-"


def _shape(fact: dict | None) -> str:
    shape = (fact or {}).get("shape")
    return "[" + ", ".join(str(d) for d in shape) + "]" if shape is not None else "-"


def _clip(text: str, limit: int = 150) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


# --- reading a summary ----------------------------------------------------------------------------

def remat_plan(summary: dict) -> dict | None:
    """The rematerialization plan of a graph: the partition's note, or the stats of the planner's
    own entry where the pipeline records it as a pass."""
    plan = summary.get("notes", {}).get("remat_plan")
    if isinstance(plan, dict):
        return plan
    for entry in summary.get("passes", []):
        stats = entry.get("stats")
        if entry.get("pass") == _REMAT_PASS and isinstance(stats, dict):
            nested = stats.get("plan")
            return nested if isinstance(nested, dict) else stats
    return None


def _has_remat_entry(summary: dict) -> bool:
    return any(e.get("pass") == _REMAT_PASS for e in summary.get("passes", []))


def overlap_sites(summary: dict) -> list[tuple[int, dict]]:
    """(pass index, site) of every GEMM + collective site a pass priced (stats["sites"])."""
    found = []
    for index, entry in enumerate(summary.get("passes", [])):
        sites = entry.get("stats", {}).get("sites") if isinstance(entry.get("stats"), dict) else None
        if isinstance(sites, list):
            found.extend((index, site) for site in sites if isinstance(site, dict))
    return found


def chosen_estimate_key(site: dict) -> str | None:
    """Which of a site's estimates is the mode it runs: 'chunked:4' for mode chunked, 4 chunks."""
    estimates = site.get("estimates_ms") or {}
    mode, chunks = site.get("mode"), site.get("chunks")
    for key in (f"{mode}:{chunks}", str(mode)):
        if key in estimates:
            return key
    same_mode = [k for k in estimates if k.split(":")[0] == mode]
    return min(same_mode, key=estimates.get) if same_mode else None


def _stages_reached(summary: dict) -> list[str]:
    reached = [s.get("stage") for s in summary.get("stages", [])]
    if "joint" in reached and ("forward" in reached or remat_plan(summary) or _has_remat_entry(summary)):
        reached.insert(reached.index("joint") + 1, "partition")
    return reached


def _off_passes(summary: dict, stage: str) -> list[tuple[str, str]]:
    """(pass, flag) for passes of ``stage`` that this graph's flags left off."""
    recorded = {e.get("pass") for e in summary.get("passes", []) if e.get("stage") == stage}
    return [(e.get("pass", "?"), e.get("flags", "its flag")) for e in summary.get("off", [])
            if e.get("stage") == stage and e.get("pass") not in recorded]


def pass_outcome(entry: dict) -> str:
    if not entry.get("ran", True):
        return f"switched off: {entry.get('reason', '')}"
    refusals = len(entry.get("refusals", []))
    head = "rewrote the graph" if entry.get("modified") else "changed nothing"
    return f"{head}; matched {entry.get('matched', 0)}" + (f", left {refusals} alone" if refusals else "")


def _plan_counts(plan: dict) -> dict[str, int]:
    """Tensors per decision: kept, recomputed for the budget, offloaded, and recomputed by the
    min-cut plan already (cheap ops whose recompute torch's partitioner also chooses)."""
    table = plan.get("table") or []
    return {"kept": sum(r.get("action") == "save" for r in table),
            "recomputed": sum(r.get("action") == "recompute" for r in table),
            "offloaded": len(plan.get("offloaded") or {}) or sum(r.get("action") == "offload" for r in table),
            "min-cut recomputed": sum(r.get("action") == "recompute (min-cut)" for r in table)}


def _counts_text(plan: dict) -> str:
    counts = _plan_counts(plan)
    return (f"{counts['kept']} kept, {counts['recomputed']} recomputed, {counts['offloaded']} "
            f"offloaded (+{counts['min-cut recomputed']} cheap recomputes, as in torch's plan)")


def budget_text(plan: dict) -> str:
    """What the budget bounded and whether the plan met it: bytes bound the step's peak (the
    graph's inputs counted), a fraction the saved activations' device bytes."""
    value, fits = plan.get("memory_budget"), plan.get("feasible", True)
    if plan.get("saved_budget_bytes") is not None:
        kept, bound = plan.get("kept_saved_bytes"), plan["saved_budget_bytes"]
        return (f"keeps {fmt_bytes(kept)} of saved activations, budget {value} of torch's plan: at most "
                f"{fmt_bytes(bound)}" + ("" if fits else " -- MISSED (no plan reaches it; the lowest-peak "
                                                          "plan is used)"))
    if plan.get("budget_bytes") is not None and isinstance(value, (int, float)):
        step = plan.get("planned_step_peak_bytes")
        return (f"step peak {fmt_bytes(step)} with the graph's inputs, budget {fmt_bytes(value)}"
                + ("" if fits else f" -- MISSED by {fmt_bytes(step - value)} (no plan reaches it; the "
                                   "lowest-peak plan is used)"))
    return "no budget"


def plan_headline(plan: dict) -> str:
    """One line: planned peak, the budget, torch's min-cut plan; what is kept/recomputed/offloaded."""
    peak, base = plan.get("planned_peak_bytes"), plan.get("min_cut_peak_bytes")
    parts = [f"planned peak {fmt_bytes(peak)}", budget_text(plan)]
    if isinstance(base, (int, float)) and isinstance(peak, (int, float)) and base:
        parts.append(f"torch's min-cut plan {fmt_bytes(base)} ({(peak - base) / base:+.0%})")
    parts.append(f"{_counts_text(plan)}; recompute time +{_fmt_ms(plan.get('extra_recompute_time_s'))} "
                 "over the min-cut plan")
    return "; ".join(parts)


def overlap_headline(sites: list[dict]) -> str:
    rewritten = [s for s in sites if s.get("mode") != "sequential"]
    modes = {}
    for site in rewritten:
        modes[site.get("mode")] = modes.get(site.get("mode"), 0) + 1
    chosen = sum((s.get("estimates_ms") or {}).get(chosen_estimate_key(s) or "", 0.0) for s in sites)
    sequential = sum((s.get("estimates_ms") or {}).get("sequential", 0.0) for s in sites)
    text = (f"{len(rewritten)} of {len(sites)} GEMM + collective sites overlapped"
            + (f" ({', '.join(f'{m} x{n}' for m, n in sorted(modes.items()))})" if modes else ""))
    if sequential:
        text += f"; predicted {chosen:.3f} ms against {sequential:.3f} ms sequential"
    return text


def summary_lines(summary: dict) -> list[str]:
    """What changed in one graph and the predicted effect, a line per stage and pass (plain text;
    the demo prints these, the graph page lists them)."""
    lines = []
    plan = remat_plan(summary)
    sites_by_pass: dict[int, list[dict]] = {}
    for index, site in overlap_sites(summary):
        sites_by_pass.setdefault(index, []).append(site)
    for index, entry in enumerate(summary.get("passes", [])):
        stage, name = entry.get("stage", "?"), entry.get("pass", "?")
        if name == _REMAT_PASS and plan:
            continue  # the plan's own line below says more
        line = f"{stage} / {name}: {pass_outcome(entry)}"
        if index in sites_by_pass:
            line += f" -- {overlap_headline(sites_by_pass[index])}"
        else:
            facts = _scalar_stats(entry.get("stats"))
            if facts:
                line += f" -- {_clip(facts, 120)}"
        lines.append(line)
        if entry.get("refusals"):
            lines.append(f"    left alone: {_clip(entry['refusals'][0], 200)}"
                         + (f" (+{len(entry['refusals']) - 1} more)" if len(entry["refusals"]) > 1 else ""))
    if plan:
        lines.append(f"partition / {_REMAT_PASS}: {plan_headline(plan)}")
        for reason in plan.get("refusals", [])[:1]:
            lines.append(f"    {_clip(str(reason), 200)}")
    elif "forward" in _stages_reached(summary):
        lines.append("partition: torch's min-cut partitioner (no memory_budget, offload off)")
    return _in_stage_order(lines)


def _in_stage_order(lines: list[str]) -> list[str]:
    """Stable sort of 'stage / pass' lines (and their indented follow-ups) by pipeline stage."""
    groups: list[list[str]] = []
    for line in lines:
        if line.startswith("    ") and groups:
            groups[-1].append(line)
        else:
            groups.append([line])
    rank = {stage: i for i, stage in enumerate(STAGES)}
    groups.sort(key=lambda g: rank.get(re.split(r"[ /:]", g[0], maxsplit=1)[0], len(STAGES)))
    return [line for group in groups for line in group]


def _scalar_stats(stats: Any) -> str:
    if not isinstance(stats, dict):
        return ""
    return ", ".join(f"{k}={fmt_bytes(v) if k.endswith('bytes') else v}" for k, v in stats.items()
                     if isinstance(v, (int, float, str, bool)) or v is None)


# --- the graph page ----------------------------------------------------------------------------

def _stats_cell(stats: Any) -> str:
    if not isinstance(stats, dict):
        return esc(str(stats))
    parts = [esc(_scalar_stats(stats))] if _scalar_stats(stats) else []
    for key, value in stats.items():
        if isinstance(value, (dict, list)):
            if key == "sites":
                parts.append(f"<a href='#overlap'>{len(value)} sites: see the overlap table</a>")
                continue
            items = value.items() if isinstance(value, dict) else enumerate(value)
            rows = "".join(f"<tr><td>{esc(str(k))}</td><td>{esc(_clip(json.dumps(v, default=repr), 200))}"
                           f"</td></tr>" for k, v in items)
            parts.append(f"<details><summary>{esc(key)} ({len(value)})</summary>"
                         f"<table class='grid'>{rows}</table></details>")
    return "<br>".join(parts)


def _facts_lookup(stage_facts: dict[str, dict], stages: Iterable[str]) -> dict[str, dict]:
    merged: dict[str, dict] = {}
    for stage in stages:
        for name, fact in stage_facts.get(stage, {}).items():
            merged.setdefault(name, fact)
    return merged


def _plan_section(plan: dict, facts: dict[str, dict], files: set[str]) -> list[str]:
    out = ["<h2 id='remat'>Rematerialization plan (partition)</h2>",
           f"<p>{esc(plan_headline(plan))}.</p>"]
    for reason in plan.get("refusals", []):
        out.append(f"<p class='why'>{esc(str(reason))}</p>")
    if plan.get("peak_at"):
        out.append(f"<p class='meta'>peak at node {esc(str(plan['peak_at']))}; "
                   f"{esc(str(plan.get('plans_scored', '?')))} plans scored</p>")
    if "remat_memory.svg" in files:
        out.append("<p><img src='remat_memory.svg' alt='bytes live over forward and backward' "
                   "style='max-width:100%'></p>")
    rows = sorted(plan.get("table") or [], key=lambda r: (-(r.get("bytes") or 0), str(r.get("tensor"))))
    if not rows:
        return out
    decided = [r for r in rows if r.get("action") != "recompute (min-cut)"]
    free = [r for r in rows if r.get("action") == "recompute (min-cut)"]
    out.append(_plan_table(decided[:_TABLE_ROWS], facts))
    if len(decided) > _TABLE_ROWS:
        out.append(f"<details><summary>{len(decided) - _TABLE_ROWS} smaller tensors</summary>"
                   f"{_plan_table(decided[_TABLE_ROWS:], facts)}</details>")
    if free:
        out.append(f"<details><summary>{len(free)} cheap tensors the min-cut plan recomputes as well "
                   f"(torch's partitioner makes the same choice)</summary>{_plan_table(free, facts)}"
                   "</details>")
    return out


def _plan_table(rows: list[dict], facts: dict[str, dict]) -> str:
    body = []
    for row in rows:
        name = str(row.get("tensor"))
        fact = facts.get(name, {})
        action = str(row.get("action", "?"))
        decision = (f"offload &alpha;={row.get('alpha', 0):.2f}" if action == "offload"
                    else esc(_DECISIONS.get(action, action)))
        cost = row.get("recompute_s")
        size = fmt_bytes(row.get("bytes")) if row.get("bytes") else (
            f"view of {esc(str(row['view_of']))}" if row.get("view_of") else "0")
        body.append(
            f"<tr><td>{esc(name)}</td><td>{decision}</td><td class='num'>{size}</td>"
            f"<td>{esc(_shape(fact))}</td><td class='src'>{esc(_clip(fact.get('source', '-'), 110))}</td>"
            f"<td class='src'>{esc(fact.get('module', '-'))}</td>"
            f"<td class='num'>{f'{cost * 1e6:.1f} us' if isinstance(cost, (int, float)) else '-'}"
            f"</td></tr>")
    return ("<table class='grid'><tr><th>tensor</th><th>decision</th><th>bytes</th><th>shape</th>"
            "<th>model source line</th><th>module</th><th>recompute cost</th></tr>"
            + "".join(body) + "</table>")


def _overlap_section(summary: dict, pass_facts: dict[int, dict]) -> list[str]:
    sites = overlap_sites(summary)
    if not sites:
        return []
    keys: list[str] = []
    for _, site in sites:
        keys.extend(k for k in (site.get("estimates_ms") or {}) if k not in keys)
    out = ["<h2 id='overlap'>Overlap decisions</h2>",
           f"<p>{esc(overlap_headline([s for _, s in sites]))}. Predicted times in ms; the mode "
           "chosen is highlighted.</p>",
           "<table class='grid'><tr><th>stage</th><th>site</th><th>model source line</th>"
           "<th>GEMM operands &rarr; output</th><th>mode chosen</th>"
           + "".join(f"<th>{esc(_ESTIMATE_TITLES.get(k, k))}</th>" for k in keys) + "<th>why</th></tr>"]
    for index, site in sites:
        facts = pass_facts.get(index, {})
        gemm = facts.get(str(site.get("gemm")), {})
        operands = " @ ".join(_shape(facts.get(i)) for i in gemm.get("inputs", []))
        chosen = chosen_estimate_key(site)
        mode = str(site.get("mode"))
        if mode not in ("sequential",) and site.get("chunks"):
            mode += f" ({site['chunks']} chunks)"
        estimates = site.get("estimates_ms") or {}
        stage = summary["passes"][index].get("stage", "")
        if gemm.get("role"):
            stage += f" ({gemm['role']})"
        out.append(
            f"<tr><td>{esc(stage)}</td><td>{esc(str(site.get('pattern')))} at {esc(str(site.get('gemm')))}"
            f"</td><td class='src'>{esc(_clip(gemm.get('source', '-'), 90))}</td>"
            f"<td>{esc(operands or '-')} &rarr; {esc(_shape(gemm))}</td><td>{esc(mode)}</td>"
            + "".join(f"<td class='num{' chosen' if k == chosen else ''}'>"
                      f"{estimates[k]:.4f}</td>" if k in estimates else "<td></td>" for k in keys)
            + f"<td>{esc(_clip(str(site.get('reason', '')), 120))}</td></tr>")
    out.append("</table>")
    return out


def _non_default_flags(config: dict) -> str:
    try:
        from graphopt.config import flags
        defaults = {name: flag.default for name, flag in flags().items()}
    except Exception:
        defaults = {}
    # summary.json holds objects and tuples as their repr (ConfigSnapshot.describe)
    shown = [f"{k}={v!r}" for k, v in sorted(config.items())
             if k != "dump_dir" and k in defaults and v not in (defaults[k], repr(defaults[k]))]
    return ", ".join(shown) or "all defaults"


def graph_page(summary: dict, code: dict[int, tuple[str, str]], pass_facts: dict[int, dict],
               stage_facts: dict[str, dict], files: set[str]) -> str:
    """One graph: summary, passes, plan table + memory picture, overlap table, then the diffs."""
    graph = str(summary.get("graph", "graph"))
    stages = summary.get("stages", [])
    flow = " &rarr; ".join(f"<a href='{esc(s.get('file', ''))}'>{esc(s.get('stage', '?'))}</a> "
                           f"({s.get('nodes', '?')} nodes)" for s in stages)
    links = " &middot; ".join(f"<a href='{name}'>{label}</a>" for name, label in (
        ("summary.json", "raw JSON (summary.json)"), ("remat_plan.md", "plan as Markdown"),
        ("op_times.md", "op times the planners used")) if name in files or name == "summary.json")
    out = [f"<h1>graphopt: {esc(graph)}</h1>",
           f"<p class='meta'><a href='../index.html'>&larr; every graph</a> &middot; {links}</p>",
           f"<p class='meta'>stages: {flow}<br>flags: {esc(_non_default_flags(summary.get('config', {})))}</p>",
           "<h2>Summary</h2><ul class='summary'>"]
    out.extend(f"<li>{esc(line.strip())}</li>" if not line.startswith("    ") else
               f"<li class='why' style='list-style:none'>{esc(line.strip())}</li>"
               for line in summary_lines(summary))
    out.append("</ul><h2>Passes</h2><table class='grid'><tr><th>stage</th><th>pass</th><th>result"
               "</th><th>ms</th><th>left alone (why)</th><th>stats</th></tr>")
    for index, entry in enumerate(summary.get("passes", [])):
        ran = entry.get("ran", True)
        cls = "fired" if entry.get("modified") else "idle" if ran else "off"
        refusals = entry.get("refusals", [])
        why = "<br>".join(esc(_clip(r, 220)) for r in refusals[:5]) + (
            f"<br>(+{len(refusals) - 5} more)" if len(refusals) > 5 else "")
        name = (f"<a href='#p{index}'>{esc(entry.get('pass', '?'))}</a>" if index in code and ran
                else esc(entry.get("pass", "?")))
        out.append(f"<tr><td>{esc(entry.get('stage', '?'))}</td><td class='{cls}'>{name}</td>"
                   f"<td>{esc(pass_outcome(entry))}</td><td class='num'>{entry.get('ms', '-')}</td>"
                   f"<td class='why'>{why}</td><td>{_stats_cell(entry.get('stats', {}))}</td></tr>")
    plan = remat_plan(summary)
    if plan and not _has_remat_entry(summary):
        out.append(f"<tr><td>partition</td><td class='fired'><a href='#remat'>{_REMAT_PASS}</a></td>"
                   f"<td colspan=4>{esc(plan_headline(plan))}</td></tr>")
    out.append("</table>")
    if plan:
        out.extend(_plan_section(plan, _facts_lookup(stage_facts, ("joint", "forward", "backward")),
                                 files))
    out.extend(_overlap_section(summary, pass_facts))
    out.append("<h2>Diffs</h2>")
    differ = difflib.HtmlDiff(wrapcolumn=110)
    for index, entry in enumerate(summary.get("passes", [])):
        if index not in code:
            continue
        before, after = code[index]
        out.append(f"<h3 id='p{index}'>{esc(entry.get('stage', '?'))} / {esc(entry.get('pass', '?'))}"
                   f"</h3><p class='meta'>{esc(pass_outcome(entry))}; added nodes: "
                   f"{esc(', '.join(entry.get('added_nodes', [])[:40]) or '-')}; removed: "
                   f"{esc(', '.join(entry.get('removed_nodes', [])[:40]) or '-')}</p>")
        if entry.get("modified"):
            out.append(differ.make_table(before.splitlines(), after.splitlines(), "before", "after",
                                         context=True, numlines=2))
        out.append(f"<details><summary>graph after {esc(entry.get('pass', '?'))}</summary><pre>"
                   f"{esc(after)}</pre></details>")
    return _page(graph, out)


# --- the index -----------------------------------------------------------------------------------

_RANK_FOLDER = re.compile(r"(^|/)rank(\d+)(?=/|$)")


def _decisions(summary: dict) -> str:
    """What a rank decided for a graph; ranks whose decisions match share one row of the index."""
    plan = remat_plan(summary) or {}
    return json.dumps([[(e.get("stage"), e.get("pass"), e.get("ran"), e.get("matched"),
                         e.get("modified"), e.get("refusals")) for e in summary.get("passes", [])],
                       [plan.get("planned_peak_bytes"), sorted(plan.get("offloaded") or {}),
                        _plan_counts(plan) if plan else None]], default=repr)


def _cell(summary: dict, stage: str) -> str:
    if stage not in _stages_reached(summary):
        return "<td class='off'>&mdash;</td>"
    parts = []
    if stage == "partition":
        plan = remat_plan(summary)
        if plan:
            fits = plan.get("feasible", True)
            parts.append(f"<div class='fired'><b>{_REMAT_PASS}</b>: peak {fmt_bytes(plan.get('planned_peak_bytes'))}"
                         f"; {html.escape(budget_text(plan))}"
                         f"{'' if fits else ' <span class=warn>(misses)</span>'}; "
                         f"{_counts_text(plan)}</div>")
        elif not _has_remat_entry(summary):
            parts.append("<div class='off'>torch min-cut (no memory_budget, offload off)</div>")
    for entry in summary.get("passes", []):
        if entry.get("stage") != stage or (entry.get("pass") == _REMAT_PASS and remat_plan(summary)):
            continue
        name = esc(entry.get("pass", "?"))
        if not entry.get("ran", True):
            parts.append(f"<div class='off'>{name}: switched off ({esc(entry.get('reason', ''))})</div>")
            continue
        refusals = entry.get("refusals", [])
        if entry.get("modified"):
            parts.append(f"<div class='fired'><b>{name}</b>: rewrote {entry.get('matched', 0)} "
                         f"site{'s' if entry.get('matched', 0) != 1 else ''}</div>")
        else:
            parts.append(f"<div class='idle'>{name}: changed nothing (matched {entry.get('matched', 0)})</div>")
        if refusals:
            more = f" (+{len(refusals) - 1} more)" if len(refusals) > 1 else ""
            parts.append(f"<div class='why' title='{esc(chr(10).join(refusals))}'>left alone: "
                         f"{esc(_clip(refusals[0], 160))}{more}</div>")
    for name, flag in _off_passes(summary, stage):
        parts.append(f"<div class='off'>{esc(name)}: off (flag {esc(flag)})</div>")
    return f"<td>{''.join(parts) or '<span class=off>no pass</span>'}</td>"


def index_page(summaries: list[tuple[str, dict]]) -> str:
    """Every graph below the dump folder: a row per graph (ranks that decided alike share it), a
    column per stage, each pass's outcome in its stage and the first reason it left a site alone."""
    rows: dict[tuple[str, str], list[tuple[str, str, dict]]] = {}
    for path, summary in summaries:
        rank = _RANK_FOLDER.search(path)
        key = (_RANK_FOLDER.sub(r"\1rank*", path), _decisions(summary))
        rows.setdefault(key, []).append((f"rank{rank.group(2)}" if rank else "", path, summary))
    used = [s for s in STAGES if any(s in _stages_reached(summary) for _, summary in summaries)]
    graphs_per_name: dict[str, int] = {}
    for name, _ in rows:
        graphs_per_name[name] = graphs_per_name.get(name, 0) + 1
    out = ["<h1>graphopt dump</h1>",
           f"<p class='meta'>{len(summaries)} compiled graph{'s' if len(summaries) != 1 else ''}. "
           "Green: the pass rewrote the graph; grey: it ran and changed nothing; "
           "<span class='why'>brown</span>: why it left a site alone (hover for every reason). "
           "Each graph's page has the plans as tables, the memory picture and the diffs.</p>",
           "<table class='grid'><tr><th>graph</th><th>ranks</th>"
           + "".join(f"<th>{_STAGE_TITLES[s]}</th>" for s in used) + "</tr>"]
    for (name, _), members in sorted(rows.items()):
        ranks, path, summary = members[0][0], members[0][1], members[0][2]
        rank_text = ", ".join(m[0] for m in members if m[0]) or "-"
        if graphs_per_name[name] > 1:
            rank_text += " <span class='warn'>(ranks decided differently)</span>"
        nodes = {s.get("stage"): s.get("nodes") for s in summary.get("stages", [])}
        shape = " / ".join(f"{'fw' if s == 'forward' else 'bw' if s == 'backward' else s} "
                           f"{nodes[s]}" for s in ("forward", "backward", "inference") if s in nodes)
        out.append(f"<tr><td><a href='{esc(path)}/index.html'>{esc(name)}</a><br>"
                   f"<span class='meta'>{esc(shape + ' nodes' if shape else '')}</span></td>"
                   f"<td>{rank_text}</td>" + "".join(_cell(summary, s) for s in used) + "</tr>")
    out.append("</table>")
    return _page("graphopt dump", out)
