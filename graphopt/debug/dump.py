"""What every compile did, for a person to read: code per stage and pass, summary.json, HTML.

Layout of ``dump_dir`` (one sub-folder per rank when several processes compile)::

    index.html                       every graph, and which passes fired in it
    <graph_id>/00_pre_grad.py        the graph entering each stage, as annotated Python
    <graph_id>/01_pre_grad.shard_attention.py   the graph after each pass that ran
    <graph_id>/summary.json          per pass: matched, modified, stats, refusals, time, node diff
    <graph_id>/index.html            per pass: before/after with the changed lines highlighted

Stats are also kept in memory (``compile_summaries()``) so the demo can print them, and every
snapshot is emitted as a ``trace_structured`` artifact so tlparse shows the rewritten graphs.
"""

from __future__ import annotations

import difflib
import html
import json
import logging
import os
import threading
from typing import Any

import torch.fx as fx

from graphopt import _compat

log = logging.getLogger("graphopt.debug")

_lock = threading.Lock()
_summaries: list[dict[str, Any]] = []


def compile_summaries() -> list[dict[str, Any]]:
    """The summaries of every graph compiled in this process, oldest first."""
    with _lock:
        return list(_summaries)


def clear_compile_summaries() -> None:
    with _lock:
        _summaries.clear()


class Snapshot:
    def __init__(self, gm: fx.GraphModule):
        self.code = _compat.readable_code(gm)
        self.nodes = {n.name: str(n.target) for n in gm.graph.nodes}


class GraphRecorder:
    """Records the stages and passes of one compiled graph; writes files when a folder is given."""

    def __init__(self, graph_id: str, dump_dir: str | None, config_description: dict[str, Any],
                 index_root: str | None = None):
        self.graph_id = graph_id
        self.folder = os.path.join(dump_dir, graph_id) if dump_dir else None
        self.index_root = index_root or dump_dir  # where the top index.html goes
        self.summary: dict[str, Any] = {"graph": graph_id, "config": config_description,
                                        "stages": [], "passes": []}
        self._step = 0
        self._code: dict[int, tuple[str, str]] = {}  # pass index -> (before, after) code
        if self.folder:
            os.makedirs(self.folder, exist_ok=True)
        with _lock:
            _summaries.append(self.summary)

    def snapshot(self, gm: fx.GraphModule) -> Snapshot:
        return Snapshot(gm)

    def _write(self, label: str, code: str) -> str:
        name = f"{self._step:02d}_{label}.py"
        self._step += 1
        _compat.trace_structured(f"graphopt_{self.graph_id}_{label}", lambda: code)
        if self.folder:
            with open(os.path.join(self.folder, name), "w") as handle:
                handle.write(code)
        return name

    def stage(self, stage: str, gm: fx.GraphModule) -> None:
        file = self._write(stage, _compat.readable_code(gm))
        self.summary["stages"].append({"stage": stage, "file": file,
                                       "nodes": len(gm.graph.nodes)})

    def note(self, key: str, value: Any) -> None:
        """Extra facts about this graph (for example the partitioner's plan)."""
        self.summary.setdefault("notes", {})[key] = value

    def attach(self, name: str, text: str) -> None:
        """Write a file a pass made for this graph (a picture, a table) into its dump folder."""
        if self.folder:
            with open(os.path.join(self.folder, name), "w") as handle:
                handle.write(text)
            self.summary.setdefault("files", []).append(name)

    def skipped(self, stage: str, name: str, reason: str) -> None:
        self.summary["passes"].append({"stage": stage, "pass": name, "ran": False, "reason": reason})

    def pass_done(self, stage: str, name: str, before: Snapshot, gm: fx.GraphModule, result,
                  elapsed_ms: float) -> None:
        after = Snapshot(gm)
        file = self._write(f"{stage}.{name}", after.code)
        entry = {
            "stage": stage, "pass": name, "ran": True, "matched": result.matched,
            "modified": result.modified, "ms": round(elapsed_ms, 3), "stats": _jsonable(result.stats),
            "refusals": list(result.refusals), "file": file,
            "added_nodes": sorted(set(after.nodes) - set(before.nodes)),
            "removed_nodes": sorted(set(before.nodes) - set(after.nodes)),
        }
        self.summary["passes"].append(entry)
        self._code[len(self.summary["passes"]) - 1] = (before.code, after.code)

    def finish(self) -> None:
        """Write summary.json and the HTML pages (no-op without a dump folder).

        Called after each stage, since AOTAutograd compiles the backward lazily."""
        if not self.folder:
            return
        page = _graph_page(self.summary, self._code)
        with open(os.path.join(self.folder, "index.html"), "w") as handle:
            handle.write(page)
        # Atomic: another rank's write_index may be reading it right now.
        tmp = os.path.join(self.folder, f".summary.json.{os.getpid()}")
        with open(tmp, "w") as handle:
            json.dump(self.summary, handle, indent=1, default=repr)
        os.replace(tmp, os.path.join(self.folder, "summary.json"))
        write_index(self.index_root)
        log.info("graphopt dump of %s written to %s", self.graph_id, self.folder)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=repr))


_STYLE = """
body{font-family:sans-serif;margin:1.5em;color:#222}
table.diff{font-family:monospace;font-size:12px;border-collapse:collapse}
.diff_header{background:#eee}.diff_next{background:#ddd}
.diff_add{background:#b7f0b7}.diff_chg{background:#ffe48a}.diff_sub{background:#f7b3b3}
table.stats td,table.stats th{border:1px solid #ccc;padding:2px 8px;text-align:left}
.fired{background:#b7f0b7}.idle{color:#888}
pre{background:#f6f6f6;padding:8px;font-size:12px;overflow-x:auto}
details{margin:6px 0}
"""


def _graph_page(summary: dict[str, Any], code: dict[int, tuple[str, str]]) -> str:
    esc = html.escape
    parts = [f"<html><head><meta charset='utf-8'><title>{esc(summary['graph'])}</title>",
             f"<style>{_STYLE}</style></head><body>",
             f"<h1>graphopt: {esc(summary['graph'])}</h1>",
             "<p><a href='summary.json'>summary.json</a></p>",
             "<h2>Passes</h2><table class='stats'><tr><th>stage</th><th>pass</th><th>matched</th>"
             "<th>modified</th><th>ms</th><th>stats</th></tr>"]
    for i, entry in enumerate(summary["passes"]):
        if not entry["ran"]:
            parts.append(f"<tr class='idle'><td>{esc(entry['stage'])}</td><td>{esc(entry['pass'])}</td>"
                         f"<td colspan=4>{esc(entry['reason'])}</td></tr>")
            continue
        cls = "fired" if entry["modified"] else "idle"
        parts.append(f"<tr class='{cls}'><td>{esc(entry['stage'])}</td><td><a href='#p{i}'>"
                     f"{esc(entry['pass'])}</a></td><td>{entry['matched']}</td><td>{entry['modified']}</td>"
                     f"<td>{entry['ms']}</td><td>{esc(json.dumps(entry['stats']))}</td></tr>")
    parts.append("</table>")
    if summary.get("notes"):
        parts.append("<h2>Notes</h2><pre>" + esc(json.dumps(summary["notes"], indent=1, default=repr))
                     + "</pre>")
    parts.append("<h2>Stages</h2><ul>")
    for stage in summary["stages"]:
        parts.append(f"<li><a href='{esc(stage['file'])}'>{esc(stage['stage'])}</a> "
                     f"({stage['nodes']} nodes)</li>")
    parts.append("</ul>")
    differ = difflib.HtmlDiff(wrapcolumn=110)
    for i, entry in enumerate(summary["passes"]):
        if not entry["ran"]:
            continue
        parts.append(f"<h2 id='p{i}'>{esc(entry['stage'])} / {esc(entry['pass'])}</h2>")
        parts.append(f"<p>matched {entry['matched']}, modified {entry['modified']}, {entry['ms']} ms; "
                     f"added nodes: {esc(', '.join(entry['added_nodes'][:40]) or '-')}; removed: "
                     f"{esc(', '.join(entry['removed_nodes'][:40]) or '-')}</p>")
        if entry["refusals"]:
            parts.append("<p>left unchanged:</p><ul>" + "".join(
                f"<li>{esc(r)}</li>" for r in entry["refusals"]) + "</ul>")
        before, after = code[i]
        if entry["modified"]:
            table = differ.make_table(before.splitlines(), after.splitlines(),
                                      "before", "after", context=True, numlines=2)
            parts.append(table)
        parts.append(f"<details><summary>graph after {esc(entry['pass'])}</summary><pre>"
                     f"{esc(after)}</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_index(dump_dir: str) -> None:
    """The top page: every graph below ``dump_dir`` (rank folders included), and which passes
    fired in each. Written atomically, since several ranks may finish at once."""
    rows = []
    for folder, _, files in sorted(os.walk(dump_dir)):
        if "summary.json" not in files:
            continue
        with open(os.path.join(folder, "summary.json")) as handle:
            summary = json.load(handle)
        name = os.path.relpath(folder, dump_dir)
        fired = [f"{p['pass']} ({p['matched']})" for p in summary["passes"] if p.get("modified")]
        idle = [p["pass"] for p in summary["passes"] if p.get("ran") and not p.get("modified")]
        stages = ", ".join(s["stage"] for s in summary["stages"])
        rows.append(
            f"<tr><td><a href='{html.escape(name)}/index.html'>{html.escape(name)}</a></td>"
            f"<td class='{'fired' if fired else 'idle'}'>{html.escape(', '.join(fired) or 'none')}</td>"
            f"<td class='idle'>{html.escape(', '.join(idle))}</td><td>{html.escape(stages)}</td></tr>")
    page = (f"<html><head><meta charset='utf-8'><title>graphopt dump</title><style>{_STYLE}</style>"
            "</head><body><h1>graphopt dump</h1><table class='stats'><tr><th>graph</th>"
            "<th>passes that rewrote it (sites)</th><th>passes that ran and changed nothing</th>"
            "<th>stages</th></tr>" + "".join(rows) + "</table></body></html>")
    tmp = os.path.join(dump_dir, f".index.html.{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(page)
    os.replace(tmp, os.path.join(dump_dir, "index.html"))
