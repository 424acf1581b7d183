"""What every compile did, for a person to read: code per stage and pass, summary.json, HTML.

Layout of ``dump_dir`` (one sub-folder per rank when several processes compile)::

    index.html                       every graph, and which passes fired in it
    <graph_id>/00_pre_grad.py        the graph entering each stage, as annotated Python
    <graph_id>/01_pre_grad.shard_attention.py   the graph after each pass that ran
    <graph_id>/summary.json          per pass: matched, modified, stats, refusals, time, node diff
    <graph_id>/index.html            summary, plans as tables, memory picture, then the diffs

The pages are rendered by ``graphopt.debug.pages`` from the summary and, for the model source line
and shape of a tensor a plan or a site names, from each node's ``stack_trace`` / module path / fake
value (``node_facts``, kept in memory while the graph compiles). Stats are also kept in memory (``compile_summaries()``) so the demo can print them, and every
snapshot is emitted as a ``trace_structured`` artifact so tlparse shows the rewritten graphs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from typing import Any

import torch.fx as fx

from graphopt import _compat
from graphopt.debug import pages

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
    """A graph as a pass saw it: its nodes, and where a dump or a structured trace reads them, its
    code and per-node facts (without either, making the code took most of a small graph's compile:
    0.05 s a stage)."""

    def __init__(self, gm: fx.GraphModule, with_facts: bool = False):
        shown = with_facts or _compat.structured_trace_enabled()
        self.code = _compat.readable_code(gm) if shown else ""
        self.nodes = {n.name: str(n.target) for n in gm.graph.nodes}
        self.facts = node_facts(gm) if with_facts else {}


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')
_MODULE_ROOT = re.compile(r"^L\[['\"]self['\"]\]\.?|^L__self___?")


def node_facts(gm: fx.GraphModule) -> dict[str, dict[str, Any]]:
    """Per node what a person needs to find it in the model: the innermost user source line, the
    module path, the output's shape and dtype, and the input nodes (for GEMM shapes)."""
    facts = {}
    for node in gm.graph.nodes:
        value = node.meta.get("val", node.meta.get("example_value"))
        shape = getattr(value, "shape", None)
        entry: dict[str, Any] = {
            "target": getattr(node.target, "__name__", str(node.target)),
            "shape": [int(d) if str(d).lstrip("-").isdigit() else str(d) for d in shape]
            if shape is not None else None,
            "dtype": str(value.dtype).replace("torch.", "") if hasattr(value, "dtype") else None,
            "inputs": [i.name for i in node.all_input_nodes],
        }
        tag = node.meta.get("partitioner_tag")  # joint graphs: which side of autograd
        if tag in ("is_forward", "is_backward"):
            entry["role"] = tag[3:]
        frames = _FRAME.findall(node.meta.get("stack_trace") or "")
        if frames:
            path, line, function, code = frames[-1]
            short = "/".join(path.replace("\\", "/").split("/")[-2:])
            entry["source"] = f"{short}:{line} in {function}: {code.strip()}"
        stack = node.meta.get("nn_module_stack") or node.meta.get("fwd_nn_module_stack")
        if stack:
            innermost = list(stack.values())[-1]
            path = innermost[0] if isinstance(innermost, (tuple, list)) else str(innermost)
            entry["module"] = _MODULE_ROOT.sub("", str(path))
        facts[node.name] = entry
    return facts


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
        # Only while a dump is written: the nodes of the graph each pass saw (sites are named by
        # the node they matched) and of each stage's latest graph (plans name its tensors).
        self._pass_facts: dict[int, dict[str, dict]] = {}
        self._stage_facts: dict[str, dict[str, dict]] = {}
        if self.folder:
            os.makedirs(self.folder, exist_ok=True)
        with _lock:
            _summaries.append(self.summary)

    def snapshot(self, gm: fx.GraphModule) -> Snapshot:
        return Snapshot(gm, with_facts=self.folder is not None)

    def _write(self, label: str, code: str) -> str:
        name = f"{self._step:02d}_{label}.py"
        self._step += 1
        _compat.trace_structured(f"graphopt_{self.graph_id}_{label}", lambda: code)
        if self.folder:
            with open(os.path.join(self.folder, name), "w") as handle:
                handle.write(code)
        return name

    def stage(self, stage: str, gm: fx.GraphModule) -> None:
        shown = self.folder is not None or _compat.structured_trace_enabled()
        file = self._write(stage, _compat.readable_code(gm) if shown else "")
        if self.folder:
            self._stage_facts[stage] = node_facts(gm)
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

    def off(self, stage: str, name: str, flags: str) -> None:
        """A pass of ``stage`` that this graph's flags leave off (the page lists it as off)."""
        self.summary.setdefault("off", []).append({"stage": stage, "pass": name, "flags": flags})

    def skipped(self, stage: str, name: str, reason: str) -> None:
        self.summary["passes"].append({"stage": stage, "pass": name, "ran": False, "reason": reason})

    def pass_done(self, stage: str, name: str, before: Snapshot, gm: fx.GraphModule, result,
                  elapsed_ms: float) -> None:
        after = Snapshot(gm, with_facts=self.folder is not None)
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
        if self.folder:
            self._pass_facts[len(self.summary["passes"]) - 1] = before.facts
            self._stage_facts[stage] = after.facts

    def finish(self) -> None:
        """Write summary.json and the HTML pages (no-op without a dump folder).

        Called after each stage, since AOTAutograd compiles the backward lazily."""
        if not self.folder:
            return
        page = pages.graph_page(self.summary, self._code, self._pass_facts, self._stage_facts,
                                files=set(os.listdir(self.folder)))
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


def write_index(dump_dir: str) -> None:
    """The top page: every graph below ``dump_dir`` (rank folders included), every stage and pass.
    Written atomically, since several ranks may finish at once."""
    summaries = []
    for folder, _, files in sorted(os.walk(dump_dir)):
        if "summary.json" not in files:
            continue
        with open(os.path.join(folder, "summary.json")) as handle:
            summaries.append((os.path.relpath(folder, dump_dir), json.load(handle)))
    tmp = os.path.join(dump_dir, f".index.html.{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(pages.index_page(summaries))
    os.replace(tmp, os.path.join(dump_dir, "index.html"))


def describe_compiles() -> str:
    """What graphopt did to every graph this process compiled, a line per stage and pass (the
    demo and the examples print it; the dump's pages say the same with tables and diffs)."""
    blocks = []
    for summary in compile_summaries():
        stages = ", ".join(stage["stage"] for stage in summary["stages"])
        lines = pages.summary_lines(summary) or [f"no pass applies to this graph (stages: {stages})"]
        blocks.append(f"{summary['graph']}:\n" + "\n".join(f"  {line}" for line in lines))
    return "\n".join(blocks)
