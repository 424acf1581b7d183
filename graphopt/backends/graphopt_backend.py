"""The backend: runs the pipeline of ``graphopt.passes.pipeline`` around AOTAutograd and codegen.

``torch.compile(model, backend="graphopt")`` and ``torch.compile(model, backend=graphopt.backend(
codegen="eager"))`` both land in :func:`compile_graph`. With codegen "inductor" the graph goes
through ``compile_fx``: graphopt's partitioner is installed as Inductor's ``custom_partitioner_fn``
(its ``uuid()`` covers graphopt's config and source, so Inductor's caches stay correct) and the
forward/backward passes run in front of ``compile_fx_inner``. With codegen "eager" the same stages
run around ``aot_autograd`` and the graphs execute as plain FX code.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import os
import sys
import weakref
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from graphopt import _compat, config
from graphopt.config import ConfigSnapshot
from graphopt.backends import compile_notices
from graphopt.backends.planned_order import PlannedOrder
from graphopt.debug.dump import GraphRecorder
from graphopt.distributed import faults
from graphopt.measure import agreement
from graphopt.passes.manager import PassContext, run_stage
from graphopt.passes.pipeline import PIPELINE
from graphopt.passes.plans import CompilePlans, JointSignature

log = logging.getLogger("graphopt.backend")

_graph_counter = itertools.count()


def backend(**overrides: Any):
    """A torch.compile backend with flags fixed for it: ``backend=graphopt.backend(codegen="eager")``.

    The flags are checked here (an unknown or ill-typed flag fails at this call, not at the first
    call of the compiled model) and bind at every compile of this backend: over patches and
    assignments, under the environment (``graphopt.config``'s precedence)."""
    fixed = config.snapshot(**overrides)
    return functools.partial(compile_graph, **{name: getattr(fixed, name) for name in overrides})


def compile_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], **overrides: Any):
    """Compile one Dynamo graph: pre-grad passes, AOTAutograd + joint passes, partition, codegen."""
    cfg = config.compile_snapshot(**overrides)
    graph_id = _graph_id()
    recorder = GraphRecorder(graph_id, _rank_dump_dir(cfg.dump_dir), cfg.describe(),
                             index_root=cfg.dump_dir)
    state = _CompileState(cfg, graph_id, recorder, list(example_inputs))
    log.info("[%s] compiling %d nodes, codegen %s, passes on: %s", graph_id, len(gm.graph.nodes),
             cfg.codegen, ", ".join(p.name for stage in PIPELINE.values() for p in stage
                                    if p.enabled(cfg)) or "none")
    breaks = compile_notices.warn_graph_breaks(
        cfg.memory_budget is not None or bool(cfg.offload_activations), graph_id)
    if breaks:
        recorder.note("graph_breaks", breaks)
    try:
        gm = run_stage("pre_grad", PIPELINE["pre_grad"], gm, state.context("pre_grad"))
        state.content_key = agreement.fingerprint([agreement.describe_graph(gm), cfg.digest()])
        recorder.finish()
        # before AOTAutograd: a rank that compiled another graph fails here, not after waiting
        # out the measured op times of a graph its peers never compile
        agreed = agreement.check_graph(gm, cfg, graph_id, _pre_grad_decisions(state))
        if cfg.codegen == "inductor":
            compiled = _compile_inductor(gm, example_inputs, state)
            _keep_or_replay_budget_warnings(state)
        else:
            compiled = _compile_eager(gm, example_inputs, state)
        agreement.check_decisions(agreed, _decisions(state), cfg.rank_agreement_timeout_s,
                                  graph_id)
    except Exception as error:
        faults.report(error)  # the peers' graphopt waits end now, with this message
        raise
    return _tied_to_compiled_graph(compiled, state.content_key)


class _CompileState:
    def __init__(self, cfg: ConfigSnapshot, graph_id: str, recorder: GraphRecorder, example_inputs):
        self.config = cfg
        self.graph_id = graph_id
        self.recorder = recorder
        self.example_inputs = example_inputs
        self.plans = CompilePlans()
        self.content_key = ""

    def context(self, stage: str, example_inputs=None,
                joint: JointSignature | None = None) -> PassContext:
        return PassContext(stage, self.config, self.graph_id,
                           list(example_inputs if example_inputs is not None else self.example_inputs),
                           self.recorder, self.plans, joint, self.content_key)

    def run_graph_stage(self, stage: str, gm: fx.GraphModule, example_inputs) -> fx.GraphModule:
        gm = run_stage(stage, PIPELINE[stage], gm, self.context(stage, example_inputs))
        self.recorder.finish()
        return gm


class GraphoptPartitioner(_compat.PartitionerBase):
    """Joint passes, then the partition stage: graphopt's planner cuts where it made a plan,
    torch's min-cut elsewhere.

    Installed as Inductor's ``custom_partitioner_fn`` and as AOTAutograd's ``partition_fn``."""

    def __init__(self, state: _CompileState):
        self.state = state

    def __call__(self, joint: fx.GraphModule, joint_inputs, **kwargs):
        state = self.state
        joint = run_stage("joint", PIPELINE["joint"], joint, state.context("joint", joint_inputs))
        kwargs.pop("compiler", None)
        if any(graph_pass.enabled(state.config) for graph_pass in PIPELINE["partition"]):
            joint = run_stage("partition", PIPELINE["partition"], joint,
                              state.context("partition", joint_inputs, JointSignature.of(kwargs)))
        plan = state.plans.partition
        if plan is not None:
            fw, bw = plan.forward, plan.backward
        else:
            fw, bw = _compat.min_cut_rematerialization_partition(
                joint, joint_inputs, compiler="inductor", **kwargs)
        state.plans.backward_graph = bw
        state.recorder.finish()
        return fw, bw

    def uuid(self) -> str:
        """Covers graphopt's config, its source and the device profile the planners read."""
        digest = hashlib.sha256((self.state.config.digest() + config.source_digest()).encode())
        if self.state.config.device_profile:
            with open(self.state.config.device_profile, "rb") as handle:
                digest.update(handle.read())
        return digest.hexdigest()

    def __reduce__(self):
        # Inductor hashes its config by pickling it: pickle to the uuid, so that equal
        # configurations share cache entries and different ones never do.
        return (str, (f"GraphoptPartitioner:{self.uuid()}",))


def _compile_inductor(gm: fx.GraphModule, example_inputs, state: _CompileState):
    def inner_compile(graph: fx.GraphModule, inputs, **kwargs):
        stage = ("backward" if kwargs.get("is_backward")
                 else "inference" if kwargs.get("is_inference") else "forward")
        graph = state.run_graph_stage(stage, graph, inputs)
        with _compat.inductor_config_patch(**_planned_graph_patches(state, stage)):
            compiled = _compat.compile_fx_inner(graph, inputs, **kwargs)
        state.recorder.finish()  # the planned order's note, when there is one
        return compiled

    patches = {}
    if _compat.HAS_CUSTOM_PARTITIONER:
        patches["custom_partitioner_fn"] = GraphoptPartitioner(state)
    elif PIPELINE["joint"] or PIPELINE["partition"]:  # pragma: no cover
        raise RuntimeError(
            f"torch {torch.__version__} has no inductor custom_partitioner_fn, which graphopt needs "
            "for its joint passes; use torch>=2.11 or graphopt.config.codegen='eager'")
    if state.config.dump_dir:
        # A cache hit skips the stages after pre_grad; a dump is asked for to see them all.
        patches["force_disable_caches"] = True
    return _compat.compile_fx(gm, example_inputs, inner_compile=inner_compile, config_patches=patches)


def _stages_after_pre_grad_ran(state: _CompileState) -> bool:
    """False where Inductor served the graph from its cache (no partitioner, no forward stage)."""
    return any(stage["stage"] != "pre_grad" for stage in state.recorder.summary["stages"])


def _keep_or_replay_budget_warnings(state: _CompileState) -> None:
    key = compile_notices.notice_key(state.content_key, GraphoptPartitioner(state).uuid())
    if _stages_after_pre_grad_ran(state):
        compile_notices.record(key, state.plans.budget_warnings)
    else:
        compile_notices.replay(key, state.graph_id)


def _pre_grad_decisions(state: _CompileState) -> dict[str, Any]:
    """What the pre_grad passes decided (attentions sharded, masks specialised and to what,
    attention modules selected and their capacities), for the rank agreement: the graph's
    fingerprint leaves scalar constants out, so the passes' own accounts of what they did are
    compared besides it."""
    decided: dict[str, Any] = {}
    for entry in state.recorder.summary["passes"]:
        if entry["stage"] == "pre_grad" and entry.get("ran"):
            decided[f"{entry['pass']} at the pre_grad stage"] = [entry["matched"], entry["stats"]]
    selection = state.recorder.summary.get("notes", {}).get("attention_selection")
    if selection is not None:
        decided["attention_selection capacities"] = [
            [module.get("name"), module.get("capacity")] for module in selection["modules"]]
    return decided


def _decisions(state: _CompileState) -> dict[str, Any] | None:
    """What the passes after pre_grad decided for this graph, for the rank agreement: the overlap
    pass's runtime per site, the memory plan, the offload slots. None where those stages did not
    run (Inductor served the graph from its cache)."""
    if not _stages_after_pre_grad_ran(state):
        return None
    decided: dict[str, Any] = {}
    for entry in state.recorder.summary["passes"]:
        if entry.get("ran") and entry["pass"] == "overlap_matmul_collectives":
            decided[f"overlap_matmul_collectives at the {entry['stage']} stage"] = [
                [site.get(key) for key in ("pattern", "gemm", "mode", "chunks", "comm_sms", "taper",
                                           "replay")] for site in entry["stats"].get("sites", [])]
    plan = state.plans.partition
    if plan is not None:
        decided["plan_rematerialization"] = [sorted(plan.saved), sorted(plan.recomputed),
                                             sorted((n, round(a, 4)) for n, a in plan.offloaded.items())]
    if state.plans.offload is not None:
        decided["offload_activations"] = sorted(
            (name, slot.index, str(slot.offset), str(slot.kept_numel))
            for name, slot in state.plans.offload.slots.items())
    return decided


def _planned_graph_patches(state: _CompileState, stage: str) -> dict[str, Any]:
    """Inductor settings for a forward / backward whose peak graphopt's partitioner planned.

    The planner's model frees each buffer after its last reader, as the caching allocator does.
    Inductor's buffer reuse instead holds a dead buffer for a later allocation of the same size
    whenever that stays under Inductor's own estimate of the graph's peak, which is not the
    planner's (it leaves kernels' workspaces out, and a plan that recomputes much has buffers
    of one size dying and being born all over its backward). Measured on the 4-layer 7B-dimension
    Llama, 1 x H100: at 32K tokens and half the saved set, the peak rose 1.02 GiB over the same
    graphs without reuse (9.64 against 8.62 GiB), at 8K with no recomputation 0.12 GiB; the step
    times stayed within 1 % (the allocator hands out cached blocks in microseconds). So these graphs
    are compiled without it; Inductor still writes a kernel's output into an input that dies
    there (``inplace_buffers``).

    Their kernels also run in the order the planner simulated (``planned_order``), unless the
    user installed a post-fusion pass of their own; Inductor's ``reorder_for_peak_memory``, which
    runs after that pass and keeps whichever order its own peak estimate prefers, is then off for
    these graphs (on a CPU Llama of one layer it moved 41 of the 42 kernels of the planned forward)."""
    if stage not in ("forward", "backward") or state.plans.partition is None:
        return {}
    patches: dict[str, Any] = {"allow_buffer_reuse": False}
    if not _compat.HAS_POST_FUSION_PASS:
        log.info("[%s] this torch has no Inductor post-fusion pass: the %s runs in Inductor's order, "
                 "not the planner's", state.graph_id, stage)
    elif getattr(_compat.inductor_config(), _compat.POST_FUSION_PASS) is not None:
        log.info("[%s] a post-fusion pass is installed already: the %s runs in its order, not the "
                 "planner's", state.graph_id, stage)
    else:
        def record(facts: dict) -> None:
            earlier = state.recorder.summary.get("notes", {}).get("planned_order", {})
            state.recorder.note("planned_order", {**earlier, stage: facts})
        patches[_compat.POST_FUSION_PASS] = PlannedOrder(f"{state.graph_id} {stage}", record)
        if _compat.HAS_PEAK_MEMORY_REORDER:
            patches["reorder_for_peak_memory"] = False
    return patches


def _compile_eager(gm: fx.GraphModule, example_inputs, state: _CompileState):
    def stage_compiler(stage: str):
        def compile_stage(graph: fx.GraphModule, inputs):
            graph = state.run_graph_stage(stage, graph, inputs)
            return _compat.make_boxed_func(graph.forward)
        return compile_stage

    compiler = _compat.aot_autograd(
        fw_compiler=stage_compiler("forward"),
        bw_compiler=stage_compiler("backward"),
        inference_compiler=stage_compiler("inference"),
        partition_fn=GraphoptPartitioner(state),
        # No decomposition table: the graphs keep aten ops as autograd produced them (as
        # aot_eager does). torch's core-aten table gave wrong Llama gradients on torch 2.13 CPU.
        keep_inference_input_mutations=True,
    )
    return compiler(gm, example_inputs)


# Runtime caches of graphopt's ops that no compiled graph names (symmetric-memory workspaces and
# their CUDA graphs, the tracked GEMM's plans and buffers): freed when no graph graphopt compiled
# is alive any more (each module bounds them while graphs live; symm_mem.MAX_WORKSPACES).
_RUNTIME_CACHES = ("graphopt.distributed.symm_mem", "graphopt.ops.tracked_collectives",
                   "graphopt.distributed.tracked_gemm")
_live_graphs = 0


def _tied_to_compiled_graph(compiled: Callable, content_key: str) -> Callable:
    """``compiled`` in a function that lives exactly as long as Dynamo keeps the compiled graph:
    when it goes (``torch._dynamo.reset()``, the code cache dropped, garbage collection), the
    graph's offload pools go with it (once no forward holds them), and with the last graph alive
    the runtime caches of graphopt's ops. (Dynamo keeps the backend's callable; AOTAutograd's
    own function is not kept by it, so a finalizer on that would run at once.)"""
    global _live_graphs
    from graphopt.ops import offload as offload_ops

    def run(*args):
        return compiled(*args)

    if getattr(compiled, "_boxed_call", False):
        run._boxed_call = True
    _live_graphs += 1
    weakref.finalize(run, _graph_gone, offload_ops.hold(offload_ops.pool_owner(content_key)))
    return run


def _graph_gone(release_pools: Callable[[], None]) -> None:
    global _live_graphs
    release_pools()
    _live_graphs -= 1
    if _live_graphs == 0:
        for name in _RUNTIME_CACHES:
            module = sys.modules.get(name)
            if module is not None:
                module.clear_cache()


def _graph_id() -> str:
    compile_id = _compat.compile_id()
    suffix = compile_id.replace("/", "_").replace(" ", "") if compile_id else "x"
    return f"graph_{next(_graph_counter):03d}_{suffix}"


def _rank_dump_dir(dump_dir: str | None) -> str | None:
    if not dump_dir:
        return None
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return os.path.join(dump_dir, f"rank{dist.get_rank()}")
    return dump_dir
