"""The one wrapper every pass runs through: timing, stats, lint, dump, and switching it off.

A pass is a function ``fn(gm, ctx) -> PassResult``. It rewrites ``gm`` in place (or returns a new
module), and says what it matched, what it changed and, for every candidate it left alone, why.
The pipeline (``pipeline.py``) lists the passes of each stage in order; ``run_stage`` runs them.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

import torch.fx as fx

from graphopt.config import ConfigSnapshot
from graphopt.passes.plans import CompilePlans, JointSignature

log = logging.getLogger("graphopt.passes")


@dataclasses.dataclass
class PassResult:
    """What a pass did: the module, whether it changed, how many sites it matched, and why not.

    ``notes`` (JSON facts) and ``files`` (name -> a function writing the file's text, called only
    when a dump folder is set) go into the graph's dump beside the pass's own entry."""

    graph_module: fx.GraphModule
    modified: bool
    matched: int = 0
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    refusals: list[str] = dataclasses.field(default_factory=list)
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)
    files: dict[str, Callable[[], str]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PassContext:
    """What a pass may know about the graph it rewrites.

    stage: "pre_grad" (Dynamo's torch IR), "joint" (AOTAutograd joint graph), "partition" (the
    joint graph, planned and cut into forward and backward), "forward", "backward" or "inference"
    (aten graphs after partitioning).
    """

    stage: str
    config: ConfigSnapshot
    graph_id: str
    example_inputs: list[Any] = dataclasses.field(default_factory=list)
    recorder: Any = None  # graphopt.debug.dump.GraphRecorder
    # One object per compiled graph, shared by all its stages: how a decision made at one stage
    # (the partition's plan, the forward's offload slots) reaches a later one.
    plans: CompilePlans = dataclasses.field(default_factory=CompilePlans)
    joint: JointSignature | None = None  # partition stage: how the joint graph's outputs divide
    # A digest of what the graph computes (Dynamo's graph after pre_grad, and the flags): the same
    # in every process and on every rank, so runtime resources that compiled code names (offload
    # pools) are found again by code from Inductor's cache; "" outside the backend.
    content_key: str = ""


@dataclasses.dataclass(frozen=True)
class GraphPass:
    """A named pass of one stage, enabled by a predicate over the config snapshot."""

    name: str
    fn: Callable[[fx.GraphModule, PassContext], PassResult]
    enabled: Callable[[ConfigSnapshot], bool]
    doc: str = ""

    @property
    def flags(self) -> str:
        """The flag(s) the predicate reads, e.g. 'sequence_parallel_attention' (for the dump)."""
        names = getattr(self.enabled, "__code__", None)
        return " / ".join(names.co_names) if names is not None and names.co_names else "its flag"


class PassFailedLint(RuntimeError):
    pass


def lint(gm: fx.GraphModule, pass_name: str) -> None:
    """Invariants every pass keeps (see passes/README.md); run between passes in debug mode."""
    try:
        gm.graph.lint()
    except Exception as err:
        raise PassFailedLint(f"pass {pass_name!r} left an ill-formed graph: {err}") from err
    for node in gm.graph.nodes:
        has_meta = "val" in node.meta or "example_value" in node.meta  # Dynamo graphs: example_value
        if node.op == "call_function" and not has_meta and node.users:
            raise PassFailedLint(
                f"pass {pass_name!r} created node {node.name} ({node.target}) without meta['val']; "
                "set it (e.g. from the op's fake implementation) so later passes see shapes")


def run_stage(stage: str, passes: list[GraphPass], gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Run the passes of one stage in order; every pass is timed, recorded and dumped."""
    recorder = ctx.recorder
    log.debug("[%s] stage %s: %d nodes", ctx.graph_id, stage, len(gm.graph.nodes))
    if recorder is not None:
        recorder.stage(stage, gm)
    for graph_pass in passes:
        if not graph_pass.enabled(ctx.config):
            if recorder is not None:
                recorder.off(stage, graph_pass.name, graph_pass.flags)
            continue
        if graph_pass.name in ctx.config.disabled_passes:
            log.info("[%s] %s switched off by disabled_passes", ctx.graph_id, graph_pass.name)
            if recorder is not None:
                recorder.skipped(stage, graph_pass.name, "switched off by config.disabled_passes")
            continue
        before = recorder.snapshot(gm) if recorder is not None else None
        start = time.perf_counter()
        result = graph_pass.fn(gm, ctx)
        elapsed_ms = (time.perf_counter() - start) * 1e3
        gm = result.graph_module
        if result.modified:
            gm.recompile()
        if ctx.config.debug:
            lint(gm, graph_pass.name)
        log.info("[%s] %s/%s: matched %d, modified %s, %.1f ms %s", ctx.graph_id, stage,
                 graph_pass.name, result.matched, result.modified, elapsed_ms, result.stats or "")
        for reason in result.refusals:
            log.info("[%s] %s left a site unchanged: %s", ctx.graph_id, graph_pass.name, reason)
        if recorder is not None:
            recorder.pass_done(stage, graph_pass.name, before, gm, result, elapsed_ms)
            for key, value in result.notes.items():
                recorder.note(key, value)
            if recorder.folder is not None:
                for name, render in result.files.items():
                    recorder.attach(name, render())
    return gm
