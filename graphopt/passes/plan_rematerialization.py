"""plan_rematerialization: partition the joint graph so that peak memory fits a byte budget.

The pass of the "partition" stage: it replaces torch's ``min_cut_rematerialization_partition``
when ``config.memory_budget`` is set or ``config.offload_activations`` is on (switched off by
``disabled_passes``, torch's min-cut partitions). It plans and cuts; the cut graphs and what it
decided (saved / recomputed / offloaded values, the planned peak) go to the backend and to the
forward / backward passes as one ``PartitionPlan`` (``ctx.plans.partition``, ``passes/plans.py``).
The rewrite, on a joint graph::

    before (joint)                              after (forward, backward)
      h  = mm(x, w1)                              fw: h = mm(x, w1); a = relu(h); y = mm(a, w2)
      a  = relu(h)                                    return y, (x, w1, w2)      # h, a not saved
      y  = mm(a, w2)                              bw: h = mm(x, w1); a = relu(h) # recomputed just
      ga = mm(g, w2.t()); gh = ga * (h > 0)           ga = mm(g, w2.t())         #   before first use
      ...                                             gh = ga * (h > 0) ...

Which values are saved comes from ``graphopt.analysis.remat_solver``: the runtime-optimal min-cut
first (cheap ops recomputed for free), then the cheapest keep / recompute / offload choice whose
simulated peak (``graphopt.analysis.liveness``: forward, then backward in the order this module
emits it) fits the budget. The graphs themselves are cut by torch's own extraction for that saved
set, and the backward is reordered so every recomputed value is produced right before its first
reader (the order the simulation assumed).

Budget: bytes ("40GiB", "512MiB", 4e10) bound the step's device memory: the graph's inputs
(parameters, buffers, the batch), live through the step, plus the peak of what forward and backward
allocate (saved activations, transients, tangents, gradients, kernel workspaces). Optimizer state,
gradients accumulated before the step and other graphs' memory are not the graph's to count (the
dump's "counts" line says so). A fraction f in (0, 1] bounds the saved activations, as torch's
``activation_memory_budget`` does: at most f of the device bytes the min-cut plan (torch's
runtime-optimal plan, f = 1) saves, offloaded bytes not counted, at a peak no higher than that
plan's. The saved set does not depend on the codegen, so a fraction means the same bytes under
both; the peaks do (eager code stores every intermediate). With codegen "eager" the simulation
keeps the backward's inputs until it returns (the boxed FX call holds its argument list) and
stores every intermediate, as the FX code does. With Inductor each input is freed at its last use
and the simulation runs the graphs as Inductor's kernels (``liveness.inline_pointwise``):
pointwise chains computed inside their readers, sibling kernels that share reads written together,
scatters written into the buffer of an input that dies there, and a kernel's workspace live while
it runs; a plan's time is that schedule's, priced kernel by kernel (``analysis/kernel_time``:
Inductor's own kernels at the memory bandwidth measured on the graph's ops, GEMMs and attention at
their measured times), and offload copies are timed on it (``offload_model.copy_points``: the
host link's two queues) and placed where the pass will put them. The graphs it plans compile
without Inductor's buffer reuse, which would hold dead buffers up to Inductor's own estimate of the
peak (``graphopt_backend._planned_graph_patches``), and their kernels run in the order simulated,
not in the one Inductor's sort after fusion gives (``backends/planned_order.py``; Inductor's
``reorder_for_peak_memory`` is off for them). On a 4-layer 7B-dimension Llama (H100,
bench/results/remat.md and remat_32k.md) every plan that fits its budget measured 0.996-1.000 of
its planned peak, and the lowest-peak plans for budgets no plan reaches 0.979-1.000 (1.007 in an
earlier run).

With ``offload_activations`` and no budget the plan is the lowest-peak one whose modelled step is
within ``OFFLOAD_ALONE_SLOWDOWN`` of the min-cut plan's: only copies the host link hides; where it
cannot hide all of the saved activations the refusals say how much it moved and why.

Safe because recomputation replays the same deterministic ops on the same inputs. Never
recomputed: collectives (``_c10d_functional``) and every ``graphopt::`` op (they may communicate),
attention (aten SDPA / flash / efficient / cudnn, graphopt attention), random ops, ops with
effects or mutation, values tagged MUST_SAVE, and values read from memory the forward later
writes in place (a buffer updated in place: Dynamo's ``copy_`` of its new value runs at the
forward's end, so a replay in the backward would read the new contents; the refusals name them);
values tagged MUST_RECOMPUTE are never saved.
When no plan fits the budget, the lowest-peak plan is used and the refusal says by how much it
misses, in one ``plans.BudgetNotMetWarning`` naming the floor in bytes and what holds it; numerics are
never changed.
"""

from __future__ import annotations

import logging
import math
import operator
from typing import Any, Callable

import torch
import torch.fx as fx

from graphopt import _compat
from graphopt.analysis import cost_model, kernel_time, liveness, offload_model, op_facts, remat_solver
from graphopt.analysis.device_profile import current_profile
from graphopt.analysis.remat_solver import JointGraph, Option, Plan
from graphopt.debug import memory_plot
from graphopt.measure import op_timing
from graphopt.passes.manager import PassContext, PassResult
from graphopt.passes.plans import JointSignature, PartitionPlan, warn_budget_not_met

log = logging.getLogger("graphopt.passes.plan_rematerialization")


# offload_activations with no budget: the plan may be slower than the min-cut plan by this share of
# its modelled step (the device copies of kept parts, a recomputation Inductor fuses for nearly
# free); the copies themselves must hide.
OFFLOAD_ALONE_SLOWDOWN = 0.005


def plan_rematerialization(joint_gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Plan the partition of ``joint_gm`` under ``ctx.config.memory_budget`` (and, with
    ``offload_activations``, jointly with offload) and cut it: ``ctx.plans.partition`` gets the
    forward and backward graphs and the plan the forward / backward passes read."""
    signature = ctx.joint
    joint_gm.graph.eliminate_dead_code()
    joint_gm.recompile()
    joint_gm = _compat.cleanup_recompute_tags(joint_gm)
    config = ctx.config
    profile = current_profile(config.device_profile)
    hold = config.codegen == "eager"  # the boxed FX call keeps backward inputs to the end
    fuse = config.codegen == "inductor"  # Inductor computes pointwise chains in one kernel
    timing = op_timing.time_graph(joint_gm, profile, config.op_timing,
                                  config.op_timing_agreement_timeout_s)
    copy_profile = (offload_model.planning_profile(
        profile, kernel_time.copy_slack(config.offload_link_slack, fuse))
                    if config.offload_activations else None)
    graph = build_joint_graph(joint_gm, signature.num_fwd_outputs, profile, hold_backward_inputs=hold,
                              node_times=timing.times, fuse_pointwise=fuse,
                              memory_bytes_per_s=op_timing.memory_bandwidth(timing, profile),
                              copy_profile=copy_profile)
    if not graph.bw_outputs or not any(graph.role[n] == "bw" for n in graph.order):
        return PassResult(joint_gm, False, refusals=[
            "no backward in the joint graph: nothing to plan; torch's min-cut partitions it"])

    inputs = _input_bytes(graph, signature)
    base_saved = remat_solver.min_cut_saved(graph)
    base = remat_solver.evaluate(graph, base_saved)
    saved_base = saved_tensors(graph, base) if config.offload_activations else []
    offload, windows = (_offload_options(graph, saved_base, base, graph.copy_profile,
                                         config.offload_host_capacity) if saved_base else ({}, None))
    plan, scored, budget, warned = choose_plan(graph, base_saved, base, config.memory_budget, offload,
                                               inputs)
    refusals = _offload_shortfall(graph, saved_base, plan, windows) if saved_base else []
    refusals += _overwrite_refusals(joint_gm, plan)

    fw_gm, bw_gm = _extract(joint_gm, graph, plan, signature)
    realized = liveness.partitioned_timeline(fw_gm, bw_gm, signature.num_fwd_outputs,
                                             hold_backward_inputs=hold, fuse_pointwise=fuse)
    summary = _summary(graph, base, plan, budget, realized, len(scored), refusals + warned, inputs,
                       config.memory_budget)
    forward = graph.forward_run(plan.saved)
    summary.update(
        # the plan's forward / backward as the codegen runs them (Inductor's kernels: kernel_time),
        # what the offload windows were sized with, beside the op-by-op sum and the roofline
        model_forward_s=plan.timeline.forward_s, model_backward_s=plan.timeline.backward_s,
        model_step_s=plan.step_s, min_cut_model_step_s=base.step_s,
        op_sum_forward_s=timing.total(forward)[0], roofline_forward_s=timing.total(forward)[1],
        memory_gbps=graph.memory_bytes_per_s / 1e9, host_link_gbps=profile.host_link_gbps,
        codegen=config.codegen)
    if windows is not None:
        summary["offload_windows"] = windows
    timing_report = timing.report()
    summary["op_timing"] = {k: v for k, v in timing_report.items() if k != "table"}
    ctx.plans.partition = PartitionPlan(
        forward=fw_gm, backward=bw_gm, saved=tuple(plan.saved), recomputed=tuple(plan.recomputed),
        offloaded=dict(plan.offloaded), planned_peak_bytes=plan.peak, report=summary,
        copy_points={name: tuple(_node_of(key) for key in pair) for name, pair in plan.copy_points.items()})
    for reason in warned:
        warn_budget_not_met(ctx.plans, ctx.graph_id, reason)
    log.info("[%s] plan_rematerialization: peak %s -> %s (budget %s), modelled step %.3f -> %.3f ms, "
             "saved %d, recomputed %d, offloaded %d", ctx.graph_id, _fmt(base.peak), _fmt(plan.peak),
             _budget_text(config.memory_budget, budget), base.step_s * 1e3, plan.step_s * 1e3,
             len(plan.saved), len(plan.recomputed), len(plan.offloaded))
    return PassResult(
        joint_gm, False, matched=len(plan.recomputed) + len(plan.offloaded), refusals=refusals + warned,
        stats={"saved": len(plan.saved), "recomputed": len(plan.recomputed),
               "offloaded": len(plan.offloaded), "min_cut_peak_bytes": base.peak,
               "planned_peak_bytes": plan.peak, "budget_bytes": summary["budget_bytes"]},
        notes={"remat_plan": _note(summary), "op_timing": timing_report},
        files=_files(ctx.graph_id, base, plan, summary, timing_report))


def choose_plan(graph: JointGraph, base_saved: list[str], base: Plan,
                memory_budget: int | float | None, offload: dict[str, list[Option]],
                inputs: dict[str, int] | None = None
                ) -> tuple[Plan, list[Plan], "remat_solver.Budget | None", list[str]]:
    """The plan for ``memory_budget`` (the typed flag value) from the min-cut saved set
    ``base_saved`` and its plan ``base``, with ``offload`` options per saved tensor: (plan, every
    plan scored, the budget, the one warning a budget no plan meets gives). Without a budget
    (offload alone) the lowest peak within OFFLOAD_ALONE_SLOWDOWN of ``base``'s modelled step.
    ``inputs``: the graph's input bytes (``_input_bytes``), which a budget in bytes counts. The
    layout planner runs this too, on the graphs it traces."""
    inputs = inputs or {"total": 0, "parameters": 0, "other": 0}
    budget = _budget(memory_budget, base, inputs["total"])
    warned = []
    if budget is None:  # offload alone: the lowest peak that costs no more than the base plan
        plan, scored = remat_solver.plan_under_budget(graph, remat_solver.Budget(), base_saved, offload)
        allowed = base.step_s * (1 + OFFLOAD_ALONE_SLOWDOWN)
        plan = min((p for p in scored if p.step_s <= allowed), key=lambda p: (p.peak, p.step_s),
                   default=base)
    else:
        plan, scored = remat_solver.plan_under_budget(graph, budget, base_saved, offload)
        if not plan.feasible:
            warned.append(_budget_miss(memory_budget, budget, graph, plan, scored, base, inputs))
    return plan, scored, budget, warned


def offload_choices(graph: JointGraph, base: Plan, profile,
                    config) -> tuple[dict[str, list[Option]], dict]:
    """Offload options per saved tensor of ``base`` and the windows they were sized with, for the
    layout planner (its traced graphs carry no copy profile: the link from ``profile`` with
    ``config.offload_link_slack``)."""
    copy_profile = graph.copy_profile or offload_model.planning_profile(profile,
                                                                        config.offload_link_slack)
    return _offload_options(graph, saved_tensors(graph, base), base, copy_profile,
                            config.offload_host_capacity)


def _node_of(key: str | None) -> str | None:
    """The cut graphs' node a schedule key stands for; None for none, or a backward input (a
    tangent: the backward's start)."""
    return None if key is None or key.startswith("t:") else key.split(":", 1)[1]


# --- the budget: what it bounds, and what it counts ----------------------------------------------

def _input_bytes(graph: JointGraph, signature: JointSignature) -> dict[str, int]:
    """Device bytes of the graph's inputs, live before the step and through it: parameters and
    buffers (the primals whose memory outlives the step) and the rest (the batch, ...)."""
    primals = [n for n in graph.order if graph.role[n] == "primal"]
    static = set(signature.static_input_indices)
    parameters = sum(graph.nbytes[n] for i, n in enumerate(primals) if i in static)
    total = sum(graph.nbytes[n] for n in primals)
    return {"total": total, "parameters": parameters, "other": total - parameters}


def _budget(value: int | float | None, base: Plan, inputs: int) -> remat_solver.Budget | None:
    """``config.memory_budget`` as the plan's bound. Bytes bound the step's device memory: the
    graph's inputs (parameters, buffers, the batch) plus the peak of what the graph allocates
    (activations, gradients, workspaces). A fraction f bounds the saved activations: at most f of
    the device bytes the min-cut plan saves (torch's ``activation_memory_budget``; the same bytes
    whichever codegen runs the graphs), at a peak no higher than the min-cut plan's (saving less
    can peak higher, where the recomputations meet in the backward)."""
    if value is None:
        return None
    if isinstance(value, float):
        return remat_solver.Budget(peak_bytes=base.peak, kept_bytes=int(value * base.kept_bytes))
    return remat_solver.Budget(peak_bytes=value - inputs)


def _budget_text(value, budget: remat_solver.Budget | None) -> str:
    if budget is None:
        return "-"
    if budget.kept_bytes is not None:
        return f"{value} of the saved activations ({_fmt(budget.kept_bytes)})"
    return _fmt(value)


def _budget_miss(value, budget: remat_solver.Budget, graph: JointGraph, plan: Plan, scored: list,
                 base: Plan, inputs: dict[str, int]) -> str:
    """The one warning a budget no plan meets gives: the floor in bytes and what holds it."""
    held = _peak_breakdown(graph, plan)
    parts = ", ".join(f"{what} {_fmt(nbytes)}" for what, nbytes in held.items() if nbytes)
    floor = inputs["total"] + plan.peak
    where = (f"{_fmt(floor)}: graph inputs {_fmt(inputs['total'])} (parameters and buffers "
             f"{_fmt(inputs['parameters'])}, other inputs {_fmt(inputs['other'])}) + "
             f"{_fmt(plan.peak)} at {plan.timeline.peak_label} ({parts})")
    if budget.kept_bytes is not None:
        least = min(p.kept_bytes for p in scored)
        if least <= budget.kept_bytes:
            return (f"memory_budget={value} keeps at most {_fmt(budget.kept_bytes)} of the "
                    f"{_fmt(base.kept_bytes)} of activations torch's min-cut plan saves; the plans that "
                    f"do peak above the min-cut plan's {_fmt(base.peak)} (their recomputations meet in "
                    f"the backward), so the lowest-peak plan runs, whose step peaks at {where}. Raise "
                    "memory_budget, turn on offload_activations, or set a budget in bytes")
        return (f"memory_budget={value} keeps at most {_fmt(budget.kept_bytes)} of the "
                f"{_fmt(base.kept_bytes)} of activations torch's min-cut plan saves, but no plan of the "
                f"{len(scored)} scored keeps less than {_fmt(least)} (values never recomputed -- "
                "attention outputs, collectives, random ops -- and what recomputation starts from); "
                f"using the lowest-peak plan, whose step peaks at {where}. Set memory_budget to at "
                f"least {math.ceil(100 * least / max(base.kept_bytes, 1)) / 100:.2f}, turn on "
                "offload_activations, or reduce the sequence or batch size")
    return (f"no plan fits memory_budget={_fmt(value)}: the lowest peak of the {len(scored)} plans "
            f"scored is {where}; using it. Set memory_budget to at least {_fmt(floor)}, turn on "
            "offload_activations, or reduce the sequence or batch size")


def _peak_breakdown(graph: JointGraph, plan: Plan) -> dict[str, int]:
    """What is live at ``plan``'s peak, by kind: gradients, forward outputs (the loss), saved
    activations, incoming gradients, working memory, and the workspace of the kernel running."""
    steps, pinned, boundary, _ = remat_solver.schedule(graph, plan.saved, plan.recomputed,
                                                       plan.offloaded, plan.copy_points)
    index = plan.timeline.peak_index
    live, workspace = liveness.live_storages(steps, pinned, index)
    gradients = {f"b:{n}" for n in graph.bw_outputs} | {f"f:{n}" for n in graph.bw_outputs}
    outputs = {f"f:{n}" for n in graph.fw_outputs}
    saved = {f"{prefix}{n}" for n in plan.saved for prefix in ("f:", "o:", "r:")}
    kinds = {"gradients": 0, "forward outputs (the loss)": 0, "saved activations": 0,
             "incoming gradients": 0, "working memory": 0, "kernel workspace": workspace}
    for storage, nbytes in live.items():
        key = storage.split("#", 1)[0]
        kind = ("gradients" if key in gradients else "forward outputs (the loss)" if key in outputs
                else "saved activations" if key in saved else "incoming gradients"
                if key.startswith("t:") else "working memory")
        kinds[kind] += nbytes
    return kinds


# --- the joint graph as the solver sees it ----------------------------------------------------------

def build_joint_graph(joint_gm: fx.GraphModule, num_fwd_outputs: int, profile,
                      hold_backward_inputs: bool = False,
                      node_times: dict[str, float] | None = None,
                      fuse_pointwise: bool = False, memory_bytes_per_s: float | None = None,
                      copy_profile=None) -> JointGraph:
    """The joint graph as the solver sees it; node times from ``node_times`` (measured, see
    ``op_timing``) where given, else the roofline on ``profile``. With ``fuse_pointwise``
    (Inductor) the kernels Inductor writes are priced from their bytes at ``memory_bytes_per_s``
    (``kernel_time``); ``copy_profile`` schedules offload copies (None: no offload)."""
    nodes = [n for n in joint_gm.graph.nodes if n.op != "output"]
    outputs = liveness.output_nodes(joint_gm)
    fw_outputs = [o for o in outputs[:num_fwd_outputs] if isinstance(o, fx.Node)]
    bw_outputs = [o for o in outputs[num_fwd_outputs:] if isinstance(o, fx.Node)]
    tangent_dependent = set()
    for node in nodes:
        if _is_backward_input(node) or any(i in tangent_dependent for i in node.all_input_nodes):
            tangent_dependent.add(node)
    forward_seeds = fw_outputs + [n for n in nodes if n.op == "call_function" and not n.users
                                  and n not in tangent_dependent]
    forward = _ancestors(forward_seeds)
    # an output of a forward multi-output op belongs to the forward even when only backward reads it
    forward |= {n for n in nodes if n.target is operator.getitem and n.args[0] in forward}
    # What only the backward reads but no tangent feeds (a loss that forms its gradient in forward,
    # a backward formula's function of forward values) may run in either pass: the cut decides --
    # in forward with its output saved, or in backward from saved inputs -- as torch's min-cut
    # does. Ops that cannot be replayed freely (collectives, such as the all-gather of a sharded
    # weight for the backward; random ops; effects) stay in the backward, and so does what reads
    # them.
    for node in nodes:
        if (node.op == "call_function" and node not in forward and node not in tangent_dependent
                and op_facts.recomputable(node)
                and all(i.op == "placeholder" or i in forward for i in node.all_input_nodes)):
            forward.add(node)
    overwritten = reads_before_overwrite(nodes)
    policy = _compat.checkpoint_policy()
    role, inputs, nbytes, logical, view_of, times, recomputable = {}, {}, {}, {}, {}, {}, {}
    cheap, must_recompute, symbolic, tuples = set(), set(), set(), set()
    shapes, dtypes, tuple_outputs, getitem_of = {}, {}, {}, {}
    for node in nodes:
        name = node.name
        inputs[name] = tuple(i.name for i in node.all_input_nodes)
        value = node.meta.get("val")
        if node.op == "placeholder":
            role[name] = "tangent" if _is_backward_input(node) else "primal"
        else:
            role[name] = "fw" if node in forward else "bw"
        logical[name] = cost_model.tensor_nbytes(value)
        if isinstance(value, torch.Tensor):
            shapes[name] = tuple(cost_model.size_hint(s) for s in value.shape)
            dtypes[name] = value.dtype
        nbytes[name] = logical[name]
        aliasing = op_facts.is_view(node)
        if isinstance(value, (tuple, list)):
            tuples.add(name)
            nbytes[name] = 0
            if not aliasing:  # split, unbind, ... allocate nothing: their outputs are views
                tuple_outputs[name] = tuple(cost_model.tensor_nbytes(v) for v in value)
        parent = liveness.tuple_parent(node)
        if parent is not None and not op_facts.is_view(parent):
            getitem_of[name] = (parent.name, node.args[1])
        if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            symbolic.add(name)
        base = liveness.aliased_input(node)
        if base is not None:
            view_of[name] = base.name
            nbytes[name] = 0
        if node.op != "call_function":
            times[name] = 0.0
        elif node_times is not None and name in node_times:
            times[name] = node_times[name]
        else:
            times[name] = cost_model.node_time(node, profile)
        tag = node.meta.get("recompute")
        recomputable[name] = (node.op == "call_function" and op_facts.recomputable(node)
                              and tag != policy.MUST_SAVE and node not in overwritten)
        if tag == policy.MUST_RECOMPUTE and recomputable[name]:
            must_recompute.add(name)
        if recomputable[name] and (op_facts.is_view(node) or _is_cheap(node)
                                   or tag == policy.PREFER_RECOMPUTE):
            cheap.add(name)
    return JointGraph(order=[n.name for n in nodes], inputs=inputs, role=role, nbytes=nbytes,
                      logical_bytes=logical, view_of=view_of, time_s=times, recomputable=recomputable,
                      cheap=cheap, must_recompute=must_recompute, symbolic=symbolic, tuples=tuples,
                      fw_outputs=[o.name for o in fw_outputs], bw_outputs=[o.name for o in bw_outputs],
                      shapes=shapes, dtypes=dtypes, hold_backward_inputs=hold_backward_inputs,
                      tuple_outputs=tuple_outputs, getitem_of=getitem_of,
                      workspace={n.name: size for n in nodes
                                 if (size := cost_model.workspace_bytes(n))},
                      fuse_pointwise=fuse_pointwise,
                      kind={n.name: kind for n in nodes if (kind := op_facts.fusion_kind(n))},
                      priced_by_bytes={n.name for n in nodes
                                       if fuse_pointwise and op_facts.inductor_writes_kernel(n)},
                      memory_bytes_per_s=memory_bytes_per_s or profile.hbm_gbps * 1e9,
                      launch_s=profile.kernel_launch_s, copy_profile=copy_profile)


def reads_before_overwrite(nodes: list[fx.Node]) -> dict[fx.Node, fx.Node]:
    """Nodes that read memory a later node writes in place, each with that last writer: a buffer
    the forward updates (Dynamo writes its new value back with ``copy_`` at the forward's end), an
    input mutated in place. Replayed in the backward, after the write, such a node would read the
    new contents, so it is never recomputed; views only alias the memory and stay free to replay
    (their readers are checked)."""
    position = {node: i for i, node in enumerate(nodes)}
    last_write: dict[fx.Node, fx.Node] = {}  # an allocation -> its last in-place writer
    for node in nodes:
        for written in op_facts.written_inputs(node):
            last_write[liveness.storage_root(written)] = node
    if not last_write:
        return {}
    result = {}
    for node in nodes:
        if node.op != "call_function" or liveness.aliased_input(node) is not None:
            continue
        writers = [last_write[root] for i in node.all_input_nodes
                   if (root := liveness.storage_root(i)) in last_write]
        later = [w for w in writers if position[w] > position[node]]
        if later:
            result[node] = max(later, key=position.__getitem__)
    return result


def _overwrite_refusals(joint_gm: fx.GraphModule, plan: Plan) -> list[str]:
    """Why saved values were kept rather than recomputed from the graph's inputs: they are, or
    read, a value that reads memory the forward overwrites later (``reads_before_overwrite``)."""
    overwritten = reads_before_overwrite(list(joint_gm.graph.nodes))
    if not overwritten:
        return []
    by_name = {node.name: node for node in joint_gm.graph.nodes}
    kept = []
    for name in plan.saved:
        node = by_name[name]
        reader = node if node in overwritten else next(
            (i for i in node.all_input_nodes if i in overwritten), None)
        if reader is not None:
            writer = overwritten[reader]
            memory = ", ".join(liveness.storage_root(w).name for w in op_facts.written_inputs(writer))
            kept.append(f"{name} ({reader.name} reads {memory} before {writer.name} writes it)")
    if not kept:
        return []
    return [f"{len(kept)} saved values are kept, not recomputed from the graph's inputs: the forward "
            "writes memory they were computed from in place, and a replay in the backward would "
            "read the new contents: " + "; ".join(kept[:4]) + ("; ..." if len(kept) > 4 else "")]


def _is_backward_input(node: fx.Node) -> bool:
    return node.op == "placeholder" and ("tangents" in node.target or "bwd_seed" in node.target
                                         or "bwd_base_offset" in node.target)


def _ancestors(seeds: list[fx.Node]) -> set[fx.Node]:
    seen, stack = set(), list(seeds)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(node.all_input_nodes)
    return seen


# A reduction whose output is this many times smaller than what it reads is not recomputed for
# free: keeping its output costs a fraction of the bytes its recomputation reads (a norm's
# statistics: keeping the [S, 1] rsqrt spares the backward re-reading the [S, D] input to rebuild
# the whole normalisation chain). The same rule as torch's min-cut partitioner.
SHRINK_NOT_CHEAP = 4


def _is_cheap(node: fx.Node) -> bool:
    """Recomputed for free by the min-cut: an op of the "cheap" cost category (``op_facts``) that
    does not shrink what it reads by ``SHRINK_NOT_CHEAP`` or more; getitem always."""
    if node.target is operator.getitem:
        return True
    if op_facts.cost_category(node) != "cheap":
        return False
    read = sum(cost_model.tensor_nbytes(i.meta.get("val")) for i in node.all_input_nodes)
    return cost_model.tensor_nbytes(node.meta.get("val")) * SHRINK_NOT_CHEAP >= read


# --- offload options (issue 7's model) --------------------------------------------------------------

def saved_tensors(graph: JointGraph, plan: Plan) -> list:
    """``liveness.SavedTensor`` for every allocation the saved activations of ``plan`` hold and
    could free (``JointGraph.freeable_groups``; primals, SymInts and memory a forward output keeps
    are left out), timed on the plan's schedule as the codegen runs it (``remat_solver.schedule``:
    Inductor's kernels under Inductor).

    A saved view counts its base's bytes as freed (``device_nbytes``) and its own elements as
    moved (``nbytes``). Saved tensors sharing one allocation become one entry, named after the
    first: produced when the allocation is written (offload_activations copies a view from
    there), needed when the first of them is."""
    steps, _, boundary, seconds = remat_solver.schedule(graph, plan.saved, plan.recomputed)
    fw_index = {step.key: i for i, step in enumerate(steps[:boundary])}
    forward_s = math.fsum(seconds[:boundary])
    elapsed = 0.0
    fw_after = {}
    for index in range(boundary):
        elapsed += seconds[index]
        fw_after[steps[index].key] = forward_s - elapsed
    first_use: dict[str, tuple[int, float]] = {}
    elapsed = 0.0
    for index in range(boundary, len(steps)):
        for source in steps[index].inputs:
            if source not in first_use:
                first_use[source] = (index - boundary, elapsed)
        elapsed += seconds[index]
    available = set(plan.saved) | set(plan.recomputed)
    result = []
    for root, members in graph.freeable_groups(plan.saved).items():
        freed = graph.storage_nbytes(root)
        if freed == 0:
            continue
        recomputable = all(graph.recomputable[m] for m in members)
        chain = remat_solver.recompute_chain(graph, members, available)[0] if recomputable else None
        produced = f"f:{root}" if f"f:{root}" in fw_index else min(
            (f"f:{m}" for m in members), key=fw_index.__getitem__)
        uses = [first_use.get(f"f:{m}", (len(steps) - boundary, elapsed)) for m in members]
        result.append(liveness.SavedTensor(
            name=members[0], nbytes=sum(graph.logical_bytes[m] for m in members),
            shape=graph.shapes[members[0]], dtype=graph.dtypes[members[0]],
            fw_index=fw_index[produced], bw_index=min(u[0] for u in uses),
            fw_time_after_s=fw_after[produced], bw_time_before_s=min(u[1] for u in uses),
            recompute_time_s=None if chain is None else sum(graph.time_s[n] for n in chain),
            device_nbytes=freed))
    return result


def _offload_options(graph: JointGraph, saved: list, base: Plan, profile,
                     host_capacity: int | None) -> tuple[dict[str, list[Option]], dict]:
    """Offload options per saved tensor over the copy link ``profile``, and how many bytes the
    transfer windows reach."""
    options = offload_model.offload_options(saved, profile, host_capacity)
    return ({name: [Option("offload", o.device_bytes_freed, o.exposed_time_s, o.alpha, o.host_bytes)
                    for o in choices if o.device_bytes_freed > 0]
             for name, choices in sorted(options.items())},
            offload_model.window_bytes(saved, profile, base.timeline.forward_s))


def _offload_shortfall(graph: JointGraph, saved: list, plan: Plan, windows: dict) -> list[str]:
    """What the plan leaves on the device that offload could have moved, and why: the forward's
    copy window (the host link over the modelled forward, less where it idles) and the reloads'
    deadlines hide only so much, and copies beyond them would stall the step."""
    candidate = sum(t.nbytes for t in saved)
    moved = sum(int(alpha * graph.logical_bytes[name]) for name, alpha in plan.offloaded.items())
    if candidate == 0 or moved >= 0.99 * candidate:
        return []
    return [f"offloads {_fmt(moved)} of the {_fmt(candidate)} of saved activations "
            f"({moved / candidate:.0%}): the host link ({graph.copy_profile.host_link_gbps:.1f} GB/s "
            f"planned) hides {_fmt(windows['d2h_window_bytes'])} in the modelled forward of "
            f"{windows.get('forward_s', 0.0) * 1e3:.1f} ms ({windows.get('d2h_before_first_s', 0.0) * 1e3:.1f}"
            f" ms before the first saved tensor exists) and "
            f"{_fmt(windows['d2h_and_h2d_window_bytes'])} once every reload must arrive before its "
            "first use; more would stall the step, so the rest stays on the device"]


# --- cutting the graphs -----------------------------------------------------------------------------

def _extract(joint_gm: fx.GraphModule, graph: JointGraph, plan: Plan,
             signature: JointSignature) -> tuple[fx.GraphModule, fx.GraphModule]:
    by_name = {n.name: n for n in joint_gm.graph.nodes}
    saved_values = [by_name[n] for n in plan.saved if n not in graph.symbolic]
    saved_sym = [by_name[n] for n in plan.saved if n in graph.symbolic]
    primals = [n for n in joint_gm.graph.find_nodes(op="placeholder") if graph.role[n.name] == "primal"]
    static = [p for i, p in enumerate(primals) if i in signature.static_input_indices]
    fw_gm, bw_gm = _compat.extract_fwd_bwd_modules(
        joint_gm, saved_values, saved_sym, num_fwd_outputs=signature.num_fwd_outputs,
        static_lifetime_input_nodes=static)
    return fw_gm, reorder_backward(bw_gm)


def reorder_backward(bw_gm: fx.GraphModule) -> fx.GraphModule:
    """Run the backward as the autograd engine would (the order ``remat_solver.backward_order``
    simulates): nodes that read a gradient in order, every other node -- recomputed forward values
    and gradient-independent backward values -- just before its first reader, so recomputed
    values do not all live at once.

    Nodes no output needs are dropped: torch's extraction keeps ops that FX counts as impure
    (random ops) when their inputs happen to be recomputable, and running them again would only
    waste time."""
    old_nodes = list(bw_gm.graph.nodes)
    position = {node: i for i, node in enumerate(old_nodes)}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    gradient_dependent: set[fx.Node] = set()
    for node in old_nodes:
        if node.op == "placeholder":
            env[node] = graph.node_copy(node, env.__getitem__)
            if _is_backward_input(node):
                gradient_dependent.add(node)
        elif any(i in gradient_dependent for i in node.all_input_nodes):
            gradient_dependent.add(node)

    def emit(root: fx.Node) -> None:
        pending, stack = set(), [root]
        while stack:
            node = stack.pop()
            if node in pending or node in env:
                continue
            pending.add(node)
            stack.extend(node.all_input_nodes)
        for node in sorted(pending, key=position.__getitem__):
            env[node] = graph.node_copy(node, env.__getitem__)

    for node in old_nodes:
        if node.op == "call_function" and node in gradient_dependent:
            emit(node)
    for node in old_nodes:
        if node.op == "output":
            emit(node)
    return fx.GraphModule(bw_gm, graph)


# --- what the dump shows ------------------------------------------------------------------------------

def _summary(graph: JointGraph, base: Plan, plan: Plan, budget: remat_solver.Budget | None,
             realized, family: int, refusals: list[str], inputs: dict[str, int],
             value: int | float | None) -> dict[str, Any]:
    base_recomputed = set(base.recomputed)
    rows = []
    for root, members in graph.freeable_groups(plan.saved).items():
        for name in members:  # "bytes": the allocation, on its group's first row only
            rows.append({"tensor": name, "action": "offload" if name in plan.offloaded else "save",
                         "bytes": graph.storage_nbytes(root) if name == members[0] else 0,
                         "alpha": plan.offloaded.get(name, 0.0), "recompute_s": None,
                         **({"view_of": root} if name != root else {})})
    for name in plan.recomputed:
        rows.append({"tensor": name, "action": "recompute" if name not in base_recomputed
                     else "recompute (min-cut)", "bytes": graph.nbytes[name], "alpha": 0.0,
                     "recompute_s": graph.time_s[name]})
    return {
        "memory_budget": value,
        # the bound on the activation peak (a budget in bytes less the graph's inputs), or None
        "budget_bytes": None if budget is None else budget.peak_bytes,
        # the bound on the saved activations' device bytes (a fraction of the min-cut plan's), or None
        "saved_budget_bytes": None if budget is None else budget.kept_bytes,
        "feasible": plan.feasible if budget is not None else True,
        "planned_peak_bytes": plan.peak,
        "planned_step_peak_bytes": inputs["total"] + plan.peak,
        "inputs_bytes": inputs["total"], "parameter_bytes": inputs["parameters"],
        "counts": ("planned_step_peak_bytes = the graph's inputs (parameters and buffers "
                   f"{_fmt(inputs['parameters'])}, other inputs {_fmt(inputs['other'])}), live through "
                   "the step, + planned_peak_bytes: the peak of what the forward and backward allocate "
                   "(activations, the parameters' gradients, the loss, kernel workspaces); not counted: "
                   "optimizer state, gradients accumulated before this step, memory other graphs hold"),
        # the cut graphs' own liveness; with offloads planned it is the graphs before
        # offload_activations moves anything (so it can exceed the planned peak, which counts them)
        "realized_peak_bytes": realized.peak,
        **({"realized_peak_is": "before offload"} if plan.offloaded else {}),
        "min_cut_peak_bytes": base.peak,
        "planned_forward_end_bytes": plan.timeline.live_bytes[plan.timeline.boundary - 1]
        if plan.timeline.boundary else 0,
        "planned_forward_peak_bytes": max(plan.timeline.live_bytes[:plan.timeline.boundary], default=0),
        "saved_bytes": graph.saved_storage_bytes(plan.saved),
        "kept_saved_bytes": plan.kept_bytes,
        "min_cut_saved_bytes": graph.saved_storage_bytes(base.saved),
        "recompute_time_s": plan.recompute_time_s,
        "extra_recompute_time_s": plan.recompute_time_s - base.recompute_time_s,
        "exposed_offload_s": plan.exposed_offload_s,
        "saved": list(plan.saved),
        "recomputed": list(plan.recomputed),
        "offloaded": dict(plan.offloaded),
        "copy_points": {name: list(pair) for name, pair in plan.copy_points.items()},
        "plans_scored": family,
        "peak_at": plan.timeline.peak_label,
        "refusals": list(refusals),
        "table": rows,
    }


def _note(summary: dict) -> dict:
    """The plan as the dump's "remat_plan" note: every figure, the per-tensor table last."""
    note = {k: v for k, v in summary.items() if k not in ("saved", "recomputed", "table")}
    note["table"] = summary["table"]
    return note


def _files(graph_id: str, base: Plan, plan: Plan, summary: dict,
           timing_report: dict) -> dict[str, Callable[[], str]]:
    """The plan's pages for a dump folder: op times, the memory timeline, the per-tensor table."""
    return {
        "op_times.md": lambda: op_timing.table_markdown(
            timing_report, f"{graph_id}: op times the planners used (joint graph)"),
        "remat_memory.svg": lambda: memory_plot.timeline_svg(
            [("min-cut plan (torch's default)", base.timeline), ("graphopt plan", plan.timeline)],
            budget=summary["budget_bytes"], title=f"{graph_id}: bytes live over forward + backward"),
        "remat_plan.md": lambda: memory_plot.plan_table_markdown(summary),
    }


def _fmt(nbytes: float | None) -> str:
    if nbytes is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{int(nbytes)} B"
