"""Offload saved activations to pinned host memory, overlapped, and reload them ahead of use (Memo).

Runs on the partitioned graphs: the forward stage rewrites what the forward saves, the backward
stage rewrites how the backward gets it back. The plan {saved name: alpha} is the joint planner's
(``ctx.plans.partition.offloaded``, from plan_rematerialization); without one (and without a memory
budget) this pass plans itself with ``offload_model.offload_options``: it offloads what the host link
hides. Forward outputs saved for backward and the backward's placeholders carry the same names, in
the same order. The forward stage hands its slots to the backward stage as ``ctx.plans.offload``.

Forward, for a saved ``x`` offloaded with fraction alpha (alpha of its last tokens go to the host)::

    before                              after
    x = producer(...)                   x = producer(...)
                                        t = graphopt.offload(x, pool, size, slot, offset, kept_numel, stride)
    ... forward compute ...             ... forward compute covering the copy (cost model) ...
                                        x_kept = graphopt.offload_wait(t, x, pool, slot, kept_numel, stride)
    return (out, ..., x, ...)           return (out, ..., x_kept, ...)     # x's memory is free

Backward::

    before                              after
    x = placeholder                     x_kept = placeholder
                                        ... backward compute ...
                                        r = graphopt.reload(x_kept, pool, slot, numel)
                                        ... enough backward compute to hide the copy, no more ...
    y = first_use(x)                    x = graphopt.reload_wait(r, pool, slot, shape, stride)
                                        y = first_use(x)

Placement: where the joint planner simulated the copies (``PartitionPlan.copy_points``), else
on this graph's own times (``op_timing.codegen_times``: Inductor's kernels under Inductor) with the
same queues (``offload_model.copy_points``; the host link slowed by ``config.offload_link_slack``,
more under Inductor, ``kernel_time.copy_slack``): the forward waits no earlier than the first node
by which the D2H queue (all offloads, in production order) has finished the copy, and after the
last forward use of ``x`` and its views; from there each wait moves as late as the forward's
simulated memory allows without lifting the planned peak (``_sink_forward_waits``), so a copy
running late stalls nothing until then. In the backward each reload must be issued no later than
the H2D queue (in order of first use, each copy due at its first use, with the same slack) allows,
and is issued as much earlier as the backward's memory allows: no earlier than the reload before
it, and never where its bytes would raise the backward's simulated peak (``_hoist_reloads``; the
forward's own inputs, parameters, stay live through it). Memory the backward does not use at its peak so buys the copy slack
against a late arrival, at no cost in peak.

Every offloaded tensor gets a slot of one static pinned pool (``graphopt.ops.offload``): offsets
planned here, the pool allocated once and reused every step, within
``config.offload_host_capacity`` (per compiled graph: a model split by graph breaks gets one pool
per graph, each within the capacity; checked at the sizes' hints). Reloaded device memory is
allocated on the compute stream at the reload point, so the caching allocator hands the same
blocks back every step. The pool is named after the graph's content (``ctx.content_key``) and
a digest of its slots, so compiled code from Inductor's cache in another process names the pool
its own plan made, and the backend frees it with the compiled graph.

Symbolic sizes (``dynamic=True``, or a second input shape): sizes, offsets and the pool's size
become expressions of the graph's symbols, computed in the graph (``_SizeArgs``: from its SymInt
inputs, else the sizes of its tensor inputs) and evaluated at every step; a fraction alpha < 1
keeps ``(rows * n + d / 2) // d`` rows (alpha ~ n / d). The backward must be able to read every
symbol from an input other than the offloaded tensors.

Saved views are offloaded like any tensor, the copy issued where their base is written (the
views between are moved up to it, ``_hoist_view_chain``): it moves the view's elements, in its own
strides when its memory is dense, else packed in the same order of dimensions (the reload comes
back in that layout), and the base's memory goes once no output holds it. Saved tensors sharing
one base are offloaded together or not at all.

Refused (left in device memory, with a reason): names the forward does not save; tensors whose
memory stays alive anyway (views of graph inputs, memory a forward output holds, a base also
saved through a tensor the plan keeps); tensors whose memory an op writes in place (the copy
could miss the write); symbolic sizes the forward or the backward cannot
compute (``_SizeArgs.why_not``); fractions below one token row; tensors beyond the host
capacity. Where the joint plan counted on an offload refused here, the plan's peak rises by the
bytes it was to free: the dump's ``remat_plan`` lists it under ``offloads_refused`` and says
``feasible: false`` when the budget is no longer met (a ``BudgetNotMetWarning`` names the
bytes). Under Inductor the backward's placeholders must be rewritten before AOTAutograd lowers
the backward, so the forward stage needs the backward graph
(``ctx.plans.backward_graph``, put there by the backend after the partition); without it the pass
refuses.
If the backward's placeholders do not match what the forward rewrote, the pass raises: the
forward already returns the kept parts, and running the backward unchanged would be wrong.
"""

from __future__ import annotations

import dataclasses
import logging
import operator

import torch
import torch.fx as fx

from graphopt import _compat
from graphopt.analysis import kernel_time, liveness, offload_model, op_facts
from graphopt.analysis.cost_model import tensor_nbytes
from graphopt.analysis.device_profile import current_profile
from graphopt.analysis.liveness import SavedTensor, aliased_input, storage_root, tuple_parent
from graphopt.analysis.op_facts import is_view
from graphopt.measure import agreement, op_timing
from graphopt.ops import offload as offload_ops
from graphopt.passes.manager import PassContext, PassResult
from graphopt.passes.plans import OffloadRewrite, Size, Slot, warn_budget_not_met

log = logging.getLogger("graphopt.passes.offload_activations")

_OPS = torch.ops.graphopt
_hint = _compat.hint_int  # a size's concrete value for estimates (its hint where symbolic)


def offload_activations(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    if ctx.stage == "forward":
        return _rewrite_forward(gm, ctx)
    if ctx.stage == "backward":
        return _rewrite_backward(gm, ctx)
    return PassResult(gm, False, refusals=[f"stage {ctx.stage!r} saves no activations for a backward"])


# --- forward ---------------------------------------------------------------------------------------

def _rewrite_forward(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    output = next(iter(gm.graph.find_nodes(op="output")))
    outputs = list(output.args[0])
    partition = ctx.plans.partition
    plan = dict(partition.offloaded) if partition is not None else None
    saved_positions = _saved_positions(gm, outputs, plan)
    if saved_positions is None:
        return PassResult(gm, False, refusals=[
            "cannot tell the forward's saved activations from its outputs: this torch attaches no "
            "output descriptors and no partition plan names them"])
    saved_order = [outputs[i].name for i in saved_positions]
    saved_tensors = [outputs[i].name for i in saved_positions
                     if isinstance(outputs[i].meta.get("val"), torch.Tensor)]
    bw_gm = ctx.plans.backward_graph
    if ctx.config.codegen == "inductor" and bw_gm is None:
        return PassResult(gm, False, refusals=[
            "under Inductor the backward's placeholders must change before AOTAutograd lowers the "
            "backward, but no backward graph reached this pass (ctx.plans.backward_graph); "
            "use codegen='eager'"])
    mismatch = _backward_mismatch(bw_gm, saved_order, saved_tensors) if bw_gm is not None else None
    if mismatch:
        return PassResult(gm, False, refusals=[mismatch])

    refusals: list[str] = []
    candidates = _offloadable(gm, outputs, saved_positions, refusals)
    activation_bytes = _activation_bytes(outputs, saved_positions)
    profile = current_profile(ctx.config.device_profile)
    fw_times = _times(gm, profile, ctx)
    profile = _planning_profile(profile, ctx)  # with slack
    if plan is None:
        if ctx.config.memory_budget is not None:
            return PassResult(gm, False, refusals=[
                "memory_budget is set but no partition plan reached this pass (plan_rematerialization "
                "switched off by disabled_passes, or a joint graph without backward); the joint "
                "planner decides offload under a budget"])
        plan = _plan_hidden(gm, bw_gm, candidates, fw_times, profile, ctx)
    fw_sizes = _SizeArgs(gm, "forward")
    bw_sizes = _SizeArgs(bw_gm, "backward", skip=set(candidates)) if bw_gm is not None else None
    slots = _assign_slots(plan, candidates, saved_order, (fw_sizes, bw_sizes), ctx, refusals)
    notes = _plan_kept(gm, partition, slots, refusals, ctx)
    if not slots:
        return PassResult(gm, False, refusals=refusals or ["the plan offloads nothing"],
                          stats={"planned": len(plan), "offloaded_bytes": 0,
                                 "activation_bytes": activation_bytes}, notes=notes)
    last = max(slots.values(), key=lambda slot: slot.index)  # offsets grow with the index
    pool_nbytes = last.offset + last.host_bytes
    pool = _pool_name(ctx, gm, slots)

    for name in slots:  # a saved view's elements exist once its base does: copy them from there
        _hoist_view_chain(gm, candidates[name].node, candidates[name].root)
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    planned = dict(partition.copy_points) if partition is not None else {}
    waits = _place_forward_waits(gm, slots, candidates, fw_times, profile, order, planned)
    original_vals, kept_vals, waits_added = {}, {}, {}
    for name, slot in slots.items():
        node = candidates[name].node
        stride = [fw_sizes.arg(s) for s in slot.stride]
        with gm.graph.inserting_after(node):
            ticket = gm.graph.call_function(
                _OPS.offload.default, (node, pool, fw_sizes.arg(pool_nbytes), slot.index,
                                       fw_sizes.arg(slot.offset), fw_sizes.arg(slot.kept_numel), stride))
        ticket.meta["val"] = node.meta["val"].new_empty(0)
        with gm.graph.inserting_before(waits[name]):
            kept = gm.graph.call_function(
                _OPS.offload_wait.default, (ticket, node, pool, slot.index,
                                            fw_sizes.arg(slot.kept_numel), stride))
        kept.meta["val"] = node.meta["val"].new_empty(slot.kept_numel)
        for op_node in (ticket, kept):  # x in the layout the slot was planned in, not Inductor's own
            _compat.pin_input_strides(op_node)
        waits_added[name] = kept
        outputs[candidates[name].position] = kept
        val = node.meta["val"]  # what the backward reads: the reload comes back in the slot's layout
        same_layout = all(map(_compat.statically_equal, val.stride(), slot.stride))
        original_vals[name] = val if same_layout else val.new_empty_strided(slot.shape, slot.stride)
        kept_vals[name] = kept.meta["val"]
    output.args = (tuple(outputs),) + tuple(output.args[1:])
    sunk_s = _sink_forward_waits(gm, [(waits_added[n], slots[n], candidates[n]) for n in waits_added],
                                 fw_times, partition.planned_peak_bytes if partition else None,
                                 fuse_pointwise=ctx.config.codegen == "inductor")
    rewrite = OffloadRewrite(pool, pool_nbytes, saved_order, saved_tensors, slots, original_vals,
                             kept_vals)
    ctx.plans.offload = rewrite
    if bw_gm is not None:
        _retype_backward_inputs(bw_gm, rewrite)
    gm.graph.lint()
    offloaded = sum(_hint(s.host_bytes) for s in slots.values())
    saved_bytes = sum(c.nbytes for c in candidates.values())
    log.info("[%s] offloading %d of %d saved activations, %d bytes to pool %s", ctx.graph_id,
             len(slots), len(saved_order), offloaded, pool)
    symbolic = [n for n, s in slots.items() if _compat.is_symbolic(s.host_bytes)]
    return PassResult(gm, True, matched=len(slots), refusals=refusals, notes=notes, stats={
        "offloaded": len(slots), "offloaded_bytes": offloaded, "candidate_bytes": saved_bytes,
        "activation_bytes": activation_bytes, "pool": pool,
        "pool_bytes": _hint(pool_nbytes), "alphas": {n: round(s.alpha, 4) for n, s in slots.items()},
        **({"symbolic_sizes": symbolic, "pool_bytes_expression": str(pool_nbytes)} if symbolic
           else {}),
        "wait_sunk_ms": {n: round(t * 1e3, 3) for n, t in sunk_s.items()}})


def _activation_bytes(outputs: list, saved_positions: list[int]) -> int:
    """Device bytes of the saved activations (each allocation once; graph inputs excluded)."""
    roots = {}
    for position in saved_positions:
        root = storage_root(outputs[position])
        val = root.meta.get("val")
        if root.op == "call_function" and isinstance(val, torch.Tensor):
            roots[root] = val.numel() * val.element_size()
    return int(sum(_compat.hint_int(n) for n in roots.values()))


def _saved_positions(gm: fx.GraphModule, outputs: list, plan: dict | None) -> list[int] | None:
    positions = _compat.saved_for_backward_output_indices(gm)
    if positions is not None:
        return positions
    if plan is None:
        return None
    # Without descriptors: the planned names, where each is returned exactly once.
    names = [o.name if isinstance(o, fx.Node) else None for o in outputs]
    return [i for i, name in enumerate(names) if name in plan and names.count(name) == 1]


@dataclasses.dataclass(frozen=True)
class _Candidate:
    node: fx.Node
    position: int          # index among the forward's outputs
    nbytes: int            # bytes of its elements (what the copy moves)
    last_forward_use: int  # graph index of the last forward node that reads its memory
    root: fx.Node          # the node that allocated its memory (itself unless a view)
    stride: tuple[int, ...]  # the dense layout its elements are copied in (see _offload_strides)


def _offloadable(gm: fx.GraphModule, outputs: list, saved_positions: list[int],
                 refusals: list[str]) -> dict[str, _Candidate]:
    """Saved activations whose device memory is freed when the forward stops holding them.

    A saved view qualifies: its elements are copied, and its base's memory is freed once no
    output holds the base any more -- so saved tensors sharing a base are offloaded together or
    not at all (``_whole_groups``)."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    saved = set(saved_positions)
    held = {storage_root(value) for i, value in enumerate(outputs)
            if isinstance(value, fx.Node) and i not in saved}
    written = {storage_root(target): node for node in gm.graph.nodes
               for target in op_facts.written_inputs(node)}
    candidates = {}
    inputs = []
    for position in saved_positions:
        node = outputs[position]
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue  # a saved SymInt
        root = storage_root(node)
        if root.op != "call_function":
            inputs.append(node.name)
            continue
        reason = _why_not_offloadable(val, root, held, written.get(root))
        if reason:
            refusals.append(f"{node.name}: {reason}")
            held.add(root)  # what shares this memory with it cannot free it either
            continue
        family = _alias_family(root)
        last_use = max((order[user] for member in family for user in member.users
                        if user.op != "output"), default=order[node])
        candidates[node.name] = _Candidate(node, position, _hint(val.numel()) * val.element_size(),
                                           max(last_use, order[node]), root, _offload_strides(val))
    for name in [n for n, c in candidates.items() if c.root in held]:
        refusals.append(f"{name}: its memory ({candidates[name].root.name}) stays on the device "
                        "through another saved tensor that cannot be offloaded")
        del candidates[name]
    if inputs:
        refusals.append(f"{len(inputs)} saved tensors are graph inputs (parameters, user inputs) or "
                        f"their views, which stay alive anyway: {', '.join(inputs[:4])}"
                        + (", ..." if len(inputs) > 4 else ""))
    return candidates


def _why_not_offloadable(val: torch.Tensor, root: fx.Node, held: set[fx.Node],
                         writer: fx.Node | None) -> str | None:
    if writer is not None:
        return (f"its memory ({root.name}) is written in place by {writer.name}; a copy taken "
                "where it is produced could miss a write the backward reads")
    if root in held:
        return (f"its memory ({root.name}) is also a forward output the caller holds; offloading it "
                "frees nothing")
    if not _compat.statically_equal(val.storage_offset(), _hint(val.storage_offset())):
        return "symbolic storage offset"
    if _hint(val.numel()) == 0:
        return "empty"
    return None


def _whole_groups(plan: dict[str, float], candidates: dict[str, _Candidate],
                  refusals: list[str]) -> dict[str, float]:
    """The plan without offloads that free nothing: saved tensors sharing a base with a saved
    tensor the plan keeps on the device (the base stays alive through it)."""
    members: dict[fx.Node, list[str]] = {}
    for name, candidate in candidates.items():
        members.setdefault(candidate.root, []).append(name)
    result = dict(plan)
    for root, names in members.items():
        kept = [n for n in names if float(plan.get(n, 0.0)) <= 0]
        offloaded = [n for n in names if float(plan.get(n, 0.0)) > 0]
        if kept and offloaded:
            for name in offloaded:
                refusals.append(f"{name}: its memory ({root.name}) is also saved through {kept[0]}, "
                                "which the plan keeps on the device; offloading it alone frees nothing")
                del result[name]
    return result


def _alias_family(root: fx.Node) -> list[fx.Node]:
    family, stack = [], [root]
    while stack:
        node = stack.pop()
        family.append(node)
        stack.extend(u for u in node.users if u.op == "call_function" and u not in family
                     and (aliased_input(u) is node or (is_view(node) and tuple_parent(u) is node)))
    return family


def _hoist_view_chain(gm: fx.GraphModule, node: fx.Node, root: fx.Node) -> bool:
    """Move the views between ``root`` and the saved view ``node`` right after ``root``, so the
    offload issued after ``node`` starts when the base is written, not where the graph first needs
    the view (a transposed attention input is taken right before attention, after the rotary
    embedding of q and k: at S = 8K on an H100, 1-2 ms of idle host link in each layer).

    Views compute nothing, so moving them earlier changes no value; each must read only the chain
    and nodes already placed before ``root``. Returns False (graph unchanged) where they do not."""
    chain, current = [], node
    while current is not root:
        chain.append(current)
        parent = tuple_parent(current)
        if parent is None and is_view(current) and current.all_input_nodes:
            parent = current.all_input_nodes[0]
        if parent is None:
            return False
        current = parent
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    members = set(chain) | {root}
    if any(order[i] > order[root] for n in chain for i in n.all_input_nodes if i not in members):
        return False
    anchor = root
    for view in reversed(chain):
        anchor.append(view)
        anchor = view
    return True


def _is_dense(val: torch.Tensor) -> bool:
    dims = sorted((d for d in range(val.dim()) if _hint(val.shape[d]) != 1),
                  key=lambda d: _hint(val.stride()[d]))
    expected = 1
    for d in dims:
        if not _compat.statically_equal(val.stride()[d], expected):
            return False
        expected *= val.shape[d]
    return True


def _offload_strides(val: torch.Tensor) -> tuple[int, ...]:
    """The dense layout ``val``'s elements travel and come back in: its own strides when its memory
    is dense (no copy on the device), else packed in the same order of dimensions (a view with
    gaps, or a slice of its base). Views the backward takes of it stay valid: dimensions adjacent
    in memory stay adjacent."""
    if _is_dense(val):
        return tuple(val.stride())
    inner_first = sorted(range(val.dim()), key=lambda d: (_hint(val.stride()[d]), -d))
    strides, expected = [0] * val.dim(), 1
    for d in inner_first:
        strides[d] = expected
        expected *= val.shape[d]
    return tuple(strides)


def _row_numel(shape: tuple[Size, ...], stride: tuple[Size, ...]) -> tuple[Size, Size]:
    """(rows, elements per row) along the outermost memory dimension (the token dim of [B, S, ...])."""
    dims = [d for d in range(len(shape)) if _hint(shape[d]) != 1]
    if not dims:
        return 1, 1
    outer = max(dims, key=lambda d: _hint(stride[d]))
    return shape[outer], stride[outer]


def _planning_profile(profile, ctx: PassContext):
    """The profile copies are placed with: the host link slowed by the planning slack
    (``kernel_time.copy_slack``: more under Inductor, whose times are modelled)."""
    return offload_model.planning_profile(profile, kernel_time.copy_slack(
        ctx.config.offload_link_slack, ctx.config.codegen == "inductor"))


def _times(gm: fx.GraphModule, profile, ctx: PassContext) -> dict[str, float]:
    """Seconds per node of ``gm`` as its code runs (``op_timing.codegen_times``: op times measured
    where the flag says; under Inductor the time of the kernel each node is part of)."""
    return op_timing.codegen_times(gm, profile, ctx.config.op_timing,
                                   ctx.config.op_timing_agreement_timeout_s,
                                   fuse_pointwise=ctx.config.codegen == "inductor")


def _plan_hidden(gm, bw_gm, candidates, fw_times, profile, ctx) -> dict[str, float]:
    """The plan without a joint planner: per tensor the fraction the host link hides."""
    saved = _saved_tensors(gm, bw_gm, candidates, fw_times, profile, ctx)
    capacity = ctx.config.offload_host_capacity
    options = offload_model.offload_options(saved, profile, capacity)
    return offload_model.hidden_plan(saved, options, capacity, profile=profile)


def _saved_tensors(gm, bw_gm, candidates, fw_times, profile, ctx) -> list[SavedTensor]:
    """SavedTensor descriptions of the candidates, timed with the planners' op times (op_timing).

    Without the backward graph, the backward compute before a tensor's first use is estimated as
    twice the forward compute after its production (backward mirrors forward at ~2x the FLOPs)."""
    nodes = list(gm.graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    finish, forward_s = {}, 0.0
    for node in nodes:
        forward_s += fw_times.get(node.name, 0.0)
        finish[node.name] = forward_s
    first_use_start, first_use_index = {}, {}
    if bw_gm is not None:
        bw_times = _times(bw_gm, profile, ctx)
        elapsed = 0.0
        for index, node in enumerate(bw_gm.graph.nodes):
            for arg in node.all_input_nodes:
                if arg.op == "placeholder" and arg.name not in first_use_start:
                    first_use_start[arg.name] = elapsed
                    first_use_index[arg.name] = index
            elapsed += bw_times.get(node.name, 0.0)
    saved = []
    for name, candidate in candidates.items():
        val = candidate.node.meta["val"]
        after = forward_s - finish[candidate.root.name]  # copied once its base is written
        saved.append(SavedTensor(
            name=name, nbytes=candidate.nbytes, shape=tuple(_hint(s) for s in val.shape),
            dtype=val.dtype, fw_index=position[candidate.root],
            bw_index=first_use_index.get(name, -1),
            fw_time_after_s=after, bw_time_before_s=first_use_start.get(name, 2.0 * after),
            recompute_time_s=None))
    return saved


# alpha < 1 of a symbolic row count: round(alpha * rows) as (rows * n + d / 2) // d, alpha ~ n / d
_ALPHA_DENOMINATOR = 1024


def _offloaded_rows(alpha: float, rows: Size) -> Size:
    """round(alpha * rows) token rows, at most all of them; an expression where rows is one."""
    if alpha >= 1.0:
        return rows
    if not _compat.is_symbolic(rows):
        return min(rows, round(alpha * rows))
    numerator = round(alpha * _ALPHA_DENOMINATOR)
    return (rows * numerator + _ALPHA_DENOMINATOR // 2) // _ALPHA_DENOMINATOR


def _assign_slots(plan: dict[str, float], candidates: dict[str, _Candidate], saved_order: list[str],
                  sizes: tuple["_SizeArgs", "_SizeArgs | None"], ctx: PassContext,
                  refusals: list[str]) -> dict[str, Slot]:
    """Slots in the forward's order, offsets packed. Symbolic sizes make symbolic slots: each
    size must be computable in the forward and, from the backward's other inputs, in the
    backward (``sizes``); the host capacity is checked at the sizes' hints."""
    capacity = ctx.config.offload_host_capacity
    plan = _whole_groups(plan, candidates, refusals)
    slots: dict[str, Slot] = {}
    offset: Size = 0
    for name in saved_order:  # the forward's order: every rank assigns the same offsets
        alpha = float(plan.get(name, 0.0))
        if alpha <= 0:
            continue
        candidate = candidates.get(name)
        if candidate is None:
            if not any(r.startswith(f"{name}:") for r in refusals):
                refusals.append(f"{name}: planned for offload but not among the forward's saved "
                                "activations (the partitioner's names do not match the graph)")
            continue
        val = candidate.node.meta["val"]
        shape = tuple(val.shape)
        rows, row_numel = _row_numel(shape, candidate.stride)
        offloaded_rows = _offloaded_rows(min(alpha, 1.0), rows)
        if _hint(offloaded_rows) == 0:
            refusals.append(f"{name}: alpha {alpha:.3f} is less than one of its {_hint(rows)} "
                            "token rows")
            continue
        slot = Slot(name, len(slots), offset, val.numel(), (rows - offloaded_rows) * row_numel,
                    shape, candidate.stride, val.dtype)
        if capacity is not None and _hint(offset + slot.host_bytes) > capacity:
            refusals.append(f"{name}: {_hint(slot.host_bytes)} more host bytes exceed "
                            f"offload_host_capacity ({capacity - _hint(offset)} left for this graph)")
            continue
        values = (slot.offset, slot.host_bytes, slot.kept_numel, slot.numel, *shape, *slot.stride)
        unreadable = [why for graph_sizes in sizes
                      if graph_sizes is not None and (why := graph_sizes.why_not(values))]
        if unreadable:
            refusals.append(f"{name}: its sizes are symbolic and {unreadable[0]}")
            continue
        slots[name] = slot
        offset = offset + -(-slot.host_bytes // offload_ops.SLOT_ALIGNMENT) * offload_ops.SLOT_ALIGNMENT
    whole = _whole_groups({name: slot.alpha for name, slot in slots.items()}, candidates, refusals)
    if len(whole) < len(slots):  # offsets and indices packed again without the ones dropped
        return _assign_slots({n: a for n, a in plan.items() if n in whole}, candidates, saved_order,
                             sizes, ctx, refusals)
    for name in plan:
        if name not in saved_order and name not in candidates:
            refusals.append(f"{name}: planned for offload but the forward does not save it")
    return slots


class _SizeArgs:
    """FX arguments for sizes that may be symbolic, in one graph: an int stays an int; a SymInt
    becomes nodes computing its expression from the graph's symbols -- its SymInt placeholders,
    else the sizes of its tensor placeholders (``aten.sym_size``) -- placed after the placeholders.
    ``skip``: placeholders whose sizes cannot be read (the backward's offloaded inputs, which
    arrive as their kept parts)."""

    def __init__(self, gm: fx.GraphModule, stage: str, skip: set[str] = frozenset()):
        self.graph = gm.graph
        self.stage = stage
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        self.cursor = placeholders[-1] if placeholders else None
        self.symbols: dict = {}   # sympy symbol -> a node holding it, or (placeholder, dim)
        for node in placeholders:
            value = node.meta.get("val")
            if _compat.is_symbolic(value) and value.node.expr.is_Symbol:
                self.symbols[value.node.expr] = node
        for node in placeholders:
            value = node.meta.get("val")
            if node.name in skip or not isinstance(value, torch.Tensor):
                continue
            for dim, size in enumerate(value.shape):
                if _compat.is_symbolic(size) and size.node.expr.is_Symbol:
                    self.symbols.setdefault(size.node.expr, (node, dim))
        self.emitted: dict = {}

    def why_not(self, values) -> str | None:
        """Why some of ``values`` cannot be computed here, or None."""
        for value in values:
            if not _compat.is_symbolic(value):
                continue
            for atom in value.node.expr.atoms():
                if atom.is_Symbol and atom not in self.symbols:
                    return (f"symbol {atom} is no input of the {self.stage} but through the "
                            "offloaded tensors")
            try:
                self._check(value.node.expr)
            except _Inexpressible as error:
                return f"{error} has no FX form here"
        return None

    def _check(self, expr) -> None:
        power = expr.is_Pow and expr.exp.is_Integer and expr.exp > 0
        if not (expr.is_Integer or expr.is_Symbol or power or expr.func in _SYMPY_OPERATORS):
            raise _Inexpressible(str(expr))
        for arg in expr.args:
            self._check(arg)

    def arg(self, value: Size):
        """``value`` as an FX argument (a SymInt becomes the node computing it)."""
        if not _compat.is_symbolic(value):
            return int(value)
        return self._emit(value.node.expr)

    def _emit(self, expr):
        if expr.is_Integer:
            return int(expr)
        if expr in self.emitted:
            return self.emitted[expr]
        if expr.is_Symbol:
            source = self.symbols[expr]
            if isinstance(source, fx.Node):
                return source
            placeholder, dim = source
            node = self._add(torch.ops.aten.sym_size.int, (placeholder, dim),
                             placeholder.meta["val"].shape[dim])
        else:
            if expr.is_Pow:  # s**n (an attention's [S, S] scores): s * s * ...
                operator_fn, args = operator.mul, [self._emit(expr.base)] * int(expr.exp)
            else:
                operator_fn = _SYMPY_OPERATORS[expr.func]
                args = [self._emit(arg) for arg in expr.args]
            node = args[0]
            for arg in args[1:]:
                node = self._add(operator_fn, (node, arg),
                                 operator_fn(_value_of(node), _value_of(arg)))
        self.emitted[expr] = node
        return node

    def _add(self, target, args, value) -> fx.Node:
        with self.graph.inserting_after(self.cursor):
            node = self.graph.call_function(target, args)
        node.meta["val"] = value
        self.cursor = node
        return node


class _Inexpressible(Exception):
    pass


def _value_of(arg):
    return arg.meta["val"] if isinstance(arg, fx.Node) else arg


_SYMPY_OPERATORS = {}  # sympy function -> the Python operator FX graphs compute it with


def _sympy_operators() -> None:
    import sympy
    _SYMPY_OPERATORS.update({sympy.Add: operator.add, sympy.Mul: operator.mul,
                             _compat.sympy_floor_div(): operator.floordiv})


_sympy_operators()


def _pool_name(ctx: PassContext, gm: fx.GraphModule, slots: dict[str, Slot]) -> str:
    """``<owner>/<layout>``: the compiled graph's content key (the backend's; this forward's
    structure where none came), and a digest of the slots. The same in every process, so code
    from Inductor's cache names the pool its plan made (``graphopt.ops.offload``)."""
    layout = agreement.fingerprint(
        (name, slot.index, str(slot.offset), str(slot.numel), str(slot.kept_numel),
         tuple(map(str, slot.shape)), tuple(map(str, slot.stride)), str(slot.dtype))
        for name, slot in slots.items())
    owner = offload_ops.pool_owner(ctx.content_key or agreement.graph_fingerprint(gm))
    return f"{owner}/{layout[:12]}"


def _plan_kept(gm: fx.GraphModule, partition, slots: dict[str, Slot], refusals: list[str],
               ctx: PassContext) -> dict:
    """The partition plan as this pass carries it out: where planned offloads are refused, the
    device bytes they were to free stay, so the plan's peak and its saved bytes rise by them; a
    budget the plan met and no longer meets is a ``BudgetNotMetWarning`` (the planner's one
    warning path), and the dump's ``remat_plan`` says ``feasible: false``. Returns the pass's notes
    (the corrected ``remat_plan``), empty where everything planned is done."""
    if partition is None:
        return {}
    refused = {name: alpha for name, alpha in partition.offloaded.items()
               if alpha > 0 and name not in slots}
    if not refused:
        return {}
    nodes = {node.name: node for node in gm.graph.nodes}
    freed = {}  # the allocation each refused offload was to free (views of one base count once)
    for name, alpha in refused.items():
        root = storage_root(nodes[name]) if name in nodes else None
        nbytes = tensor_nbytes(root.meta.get("val")) if root is not None else 0
        freed[root or name] = max(freed.get(root or name, 0), int(min(alpha, 1.0) * nbytes))
    kept_bytes = sum(freed.values())
    report = partition.report
    peak = (partition.planned_peak_bytes or 0) + kept_bytes
    saved = report.get("kept_saved_bytes", 0) + kept_bytes
    over = [f"{peak - bound} bytes over the activation peak of {bound} it bounds"
            for bound in [report.get("budget_bytes")] if bound is not None and peak > bound]
    over += [f"{saved - bound} bytes over the {bound} saved bytes it allows"
             for bound in [report.get("saved_budget_bytes")] if bound is not None and saved > bound]
    planned_feasible = bool(report.get("feasible", True))
    feasible = planned_feasible and not over
    reasons = {name: next((r for r in refusals if r.startswith(f"{name}:")), "refused")
               for name in refused}
    message = (f"offload_activations carries out {len(slots)} of the "
               f"{len(slots) + len(refused)} offloads the memory plan counted on; "
               f"{len(refused)} stay on the device ({kept_bytes} bytes: "
               f"{'; '.join(list(reasons.values())[:3])}), so the planned peak rises to {peak} bytes"
               + (f": memory_budget={report.get('memory_budget')} is missed by "
                  f"{' and '.join(over)}. Mark the dimensions static, raise "
                  "offload_host_capacity where it refused, or raise memory_budget" if over else ""))
    if planned_feasible and over:
        warn_budget_not_met(ctx.plans, ctx.graph_id, message)
    else:  # met anyway, or the planner already warned that no plan meets it
        log.info("[%s] %s", ctx.graph_id, message)
    note = ctx.recorder.summary.get("notes", {}).get("remat_plan") if ctx.recorder else None
    if note is None:
        return {}
    table = [{**row, "action": "save (offload refused)"} if row.get("tensor") in refused
             and row.get("action") == "offload" else row for row in note.get("table", [])]
    corrected = {key: value for key, value in note.items() if key != "table"}
    corrected.update(feasible=feasible, offloaded={n: a for n, a in note.get("offloaded", {}).items()
                                                   if n not in refused},
                     offloads_refused={name: reasons[name] for name in refused},
                     planned_peak_bytes=peak, kept_saved_bytes=saved,
                     planned_step_peak_bytes=note.get("inputs_bytes", 0) + peak,
                     planned_peak_is="raised by the offloads refused",
                     refusals=[*note.get("refusals", []), message], table=table)
    return {"remat_plan": corrected}


def _place_forward_waits(gm, slots, candidates, fw_times, profile, order,
                         planned: dict) -> dict[str, fx.Node]:
    """Per offloaded tensor, the node before which the forward waits for its copy: where the
    joint planner simulated it (``PartitionPlan.copy_points``), else where the D2H queue on this
    graph's times finishes it (``offload_model.copy_points``); never before its last forward use."""
    nodes = list(gm.graph.nodes)
    by_name = {node.name: node for node in nodes}
    copies = [offload_model.Copy(name, _hint(slots[name].host_bytes), order[candidates[name].node],
                                 candidates[name].last_forward_use, 0) for name in slots]
    queued, _ = offload_model.copy_points([fw_times.get(n.name, 0.0) for n in nodes[:-1]], [], copies,
                                          profile)
    waits = {}
    for name in slots:
        point = planned.get(name)
        wait = (nodes[-1] if point[0] is None else by_name[point[0]]) if point and (
            point[0] is None or point[0] in by_name) else nodes[queued[name][0]]
        earliest = candidates[name].last_forward_use + 1
        waits[name] = wait if order[wait] >= earliest else nodes[earliest]
    return waits


def _sink_forward_waits(gm: fx.GraphModule, waits: list[tuple[fx.Node, Slot, _Candidate]],
                        times: dict[str, float], planned_peak: int | None,
                        fuse_pointwise: bool = False) -> dict[str, float]:
    """Move each offload wait as late in the forward as its memory allows: the copy then has
    until there to finish, not just the time the D2H queue was planned to take, and a copy
    running late (op times or the link off the model) costs no stall unless it is later still.

    ``waits``: (offload_wait, slot, candidate) at the earliest point the D2H queue allows. A wait
    moved later holds the tensor's whole allocation longer; it moves only while the forward's
    simulated bytes (``liveness.graph_timeline``, inputs held) stay within the larger of the
    forward's own peak and the step's planned activation peak (``planned_peak``, from
    plan_rematerialization) plus the inputs -- so it never lifts the planned peak. Each wait's
    place comes from an estimate (its tensor's bytes added over the range it moves past); the
    moved graph is then simulated, and where the estimate missed bytes (a storage other saved
    tensors share, a kept part allocated while the whole still lives) the waits are placed again,
    each checked against the simulation. Returns how much later (modelled seconds) each wait now
    runs."""
    if not waits:
        return {}
    nodes, timeline = liveness.graph_timeline(gm, hold_inputs=True, fuse_pointwise=fuse_pointwise)
    inputs = sum(tensor_nbytes(p.meta.get("val")) for p in gm.graph.find_nodes(op="placeholder"))
    bound = max(timeline.peak, (planned_peak or 0) + inputs)
    index = {node: i for i, node in enumerate(nodes)}
    original_next = {wait: wait.next for wait, _, _ in waits}
    sunk = _sink_waits(gm, nodes, list(timeline.live_bytes), bound, waits, times, fuse_pointwise,
                       checked=False)
    if liveness.graph_timeline(gm, hold_inputs=True, fuse_pointwise=fuse_pointwise)[1].peak <= bound:
        return sunk
    for wait, _, _ in sorted(waits, key=lambda w: index[w[0]], reverse=True):
        original_next[wait].prepend(wait)  # back where it was: later waits first
    return _sink_waits(gm, nodes, list(timeline.live_bytes), bound, waits, times, fuse_pointwise,
                       checked=True)


def _sink_waits(gm: fx.GraphModule, nodes: list[fx.Node], live: list[int], bound: int,
                waits: list[tuple[fx.Node, Slot, _Candidate]], times: dict[str, float],
                fuse_pointwise: bool, checked: bool) -> dict[str, float]:
    """``_sink_forward_waits``' moves, latest wait first, over ``nodes`` (the graph's call_function
    nodes before any move) and their simulated bytes ``live``; ``checked``: each move is
    simulated, and a wait that would lift the peak over ``bound`` goes to the latest point
    that does not (found by bisection)."""
    index = {node: i for i, node in enumerate(nodes)}
    output = next(iter(gm.graph.find_nodes(op="output")))
    end = len(nodes)  # just before the output
    sunk, moved = {}, set()

    def place(wait: fx.Node, target: int) -> None:
        """Before nodes[target]; a wait moved already is no longer there: before the next node."""
        while target < end and nodes[target] in moved:
            target += 1
        (nodes[target] if target < end else output).prepend(wait)

    def simulated() -> dict[fx.Node, int]:
        now, timeline = liveness.graph_timeline(gm, hold_inputs=True, fuse_pointwise=fuse_pointwise)
        return dict(zip(now, timeline.live_bytes))

    for wait, slot, candidate in sorted(waits, key=lambda w: index[w[0]], reverse=True):
        at = index[wait]
        held = tensor_nbytes(candidate.root.meta.get("val")) - _hint(slot.kept_numel) * slot.dtype.itemsize
        target = at  # the wait goes before nodes[target]; the tensor is held through at .. target - 1
        while target < end and live[target] + held <= bound:
            target += 1
        if target <= at + 1:
            continue
        place(wait, target)
        if not checked:
            for k in range(at, target):
                live[k] += held
            moved.add(wait)
        else:
            after = simulated()
            if max(after.values()) > bound:
                fits, too_late = at + 1, target
                while too_late - fits > 1:
                    middle = (fits + too_late) // 2
                    place(wait, middle)
                    if max(simulated().values()) <= bound:
                        fits = middle
                    else:
                        too_late = middle
                target = fits
                place(wait, target)
                if target <= at + 1:
                    continue
                after = simulated()
            # the waits before it plan with the bytes as now simulated; a moved wait's old place
            # in ``nodes`` (this one's too) reads its predecessor's
            moved.add(wait)
            live[:] = [after[node] for node in nodes]
            for i, node in enumerate(nodes):
                if node in moved and i:
                    live[i] = live[i - 1]
        sunk[candidate.node.name] = sum(times.get(n.name, 0.0) for n in nodes[at + 1:target])
    return sunk


def _retype_backward_inputs(bw_gm: fx.GraphModule, rewrite: OffloadRewrite) -> None:
    """The backward receives the kept parts now: its placeholders say so (AOTAutograd reads them)."""
    placeholders = _saved_placeholders(bw_gm, rewrite)
    for name in rewrite.slots:
        placeholders[name].meta["val"] = rewrite.kept_vals[name]


def _backward_mismatch(bw_gm: fx.GraphModule, saved_order: list[str],
                       saved_tensors: list[str]) -> str | None:
    """Why the backward's leading placeholders are not the forward's saved outputs, or None.

    AOTAutograd hands the backward the saved SymInts first and the saved tensors after them (the
    forward returns the tensors first): the tensors must come in the forward's order."""
    names = [p.name for p in bw_gm.graph.find_nodes(op="placeholder")][:len(saved_order)]
    if sorted(names) != sorted(saved_order):
        missing = sorted(set(saved_order) - set(names))
        return (f"the backward's first {len(saved_order)} inputs are not the forward's saved "
                f"values ({', '.join(missing[:3])} missing); the partitioner must name the "
                "backward's placeholders after the forward's saved outputs")
    tensors = [name for name in names if name in set(saved_tensors)]
    for index, (found, expected) in enumerate(zip(tensors, saved_tensors)):
        if found != expected:
            return (f"the backward's saved tensor {index} is {found} but the forward saves {expected} "
                    "there; the partitioner must keep the forward's order of saved tensors")
    return None


def _saved_placeholders(bw_gm: fx.GraphModule, rewrite: OffloadRewrite) -> dict[str, fx.Node]:
    mismatch = _backward_mismatch(bw_gm, rewrite.saved_order, rewrite.saved_tensors)
    if mismatch:
        raise RuntimeError(
            f"offload_activations: {mismatch}. The forward already returns kept parts, so this graph "
            "cannot run; switch graphopt.config.offload_activations off and report it")
    placeholders = list(bw_gm.graph.find_nodes(op="placeholder"))[:len(rewrite.saved_order)]
    return {p.name: p for p in placeholders}


# --- backward --------------------------------------------------------------------------------------

def _rewrite_backward(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    rewrite = ctx.plans.offload
    if rewrite is None:
        return PassResult(gm, False, refusals=["the forward stage offloaded nothing"])
    placeholders = _saved_placeholders(gm, rewrite)
    for name in rewrite.slots:  # the cost model reads the shapes the backward computes with
        placeholders[name].meta["val"] = rewrite.original_vals[name]
    profile = current_profile(ctx.config.device_profile)
    nodes = list(gm.graph.nodes)
    times = _times(gm, profile, ctx)
    profile = _planning_profile(profile, ctx)
    position = {node: i for i, node in enumerate(nodes)}
    first_use = {}
    for name in rewrite.slots:
        users = [u for u in placeholders[name].users]
        if users:
            first_use[name] = min(users, key=position.__getitem__)
    compute = [n for n in nodes if n.op not in ("placeholder", "output")]
    partition = ctx.plans.partition
    issue = _place_reloads(rewrite, first_use, times, compute, profile,
                           dict(partition.copy_points) if partition is not None else {})
    by_first_use = sorted(first_use, key=lambda n: position[first_use[n]])
    sizes = _SizeArgs(gm, "backward", skip=set(rewrite.slots))
    reloads = []
    for name in by_first_use:
        slot = rewrite.slots[name]
        placeholder = placeholders[name]
        placeholder.meta["val"] = rewrite.kept_vals[name]
        with gm.graph.inserting_before(issue[name]):
            ticket = gm.graph.call_function(
                _OPS.reload.default, (placeholder, rewrite.pool, slot.index, sizes.arg(slot.numel)))
        ticket.meta["val"] = rewrite.kept_vals[name].new_empty(0)
        with gm.graph.inserting_before(first_use[name]):
            value = gm.graph.call_function(
                _OPS.reload_wait.default, (ticket, rewrite.pool, slot.index,
                                           [sizes.arg(s) for s in slot.shape],
                                           [sizes.arg(s) for s in slot.stride]))
        value.meta["val"] = rewrite.original_vals[name]
        placeholder.replace_all_uses_with(value, delete_user_cb=lambda user: user is not ticket)
        reloads.append((ticket, value, _hint(slot.numel) * slot.dtype.itemsize))
    for name in rewrite.slots:
        if name not in first_use:
            placeholders[name].meta["val"] = rewrite.kept_vals[name]
    hoisted_s = _hoist_reloads(gm, reloads, times, hold_inputs=_held_inputs(gm, ctx),
                               fuse_pointwise=ctx.config.codegen == "inductor")
    gm.graph.lint()
    return PassResult(gm, True, matched=len(first_use), stats={
        "reloaded": len(first_use),
        "reloaded_bytes": sum(_hint(rewrite.slots[n].host_bytes) for n in first_use),
        "reload_lead_ms": {n: round(t * 1e3, 3) for n, t in zip(by_first_use, hoisted_s)}})


def _held_inputs(gm: fx.GraphModule, ctx: PassContext) -> bool | set[str]:
    """The backward's inputs that stay alive through it whatever it frees: all of them under
    eager codegen (the boxed call holds its argument list); under Inductor the forward's own
    inputs saved for it (parameters: the module holds them), while saved activations and
    tangents die at their last use. Counting a parameter as freed at its last use would show the
    reloads headroom that is not there (measured on CPU: a hoisted reload lifted the allocator's
    peak to 1.10x the planned one)."""
    if ctx.config.codegen == "eager":
        return True
    partition = ctx.plans.partition
    if partition is not None:
        forward_inputs = {p.name for p in partition.forward.graph.find_nodes(op="placeholder")}
    else:
        forward_inputs = {p.name for p in gm.graph.find_nodes(op="placeholder")
                          if p.name.startswith("primals")}
    return {p.name for p in gm.graph.find_nodes(op="placeholder") if p.name in forward_inputs}


def _hoist_reloads(gm: fx.GraphModule, reloads: list[tuple[fx.Node, fx.Node, int]],
                   times: dict[str, float], hold_inputs: bool | set[str],
                   fuse_pointwise: bool = False) -> list[float]:
    """Issue each reload as early as the backward's memory allows: no earlier than the reload
    before it (the H2D queue stays in order of first use) and never where its bytes would lift the
    backward's simulated peak (``liveness.graph_timeline``, with every reload holding its memory
    from issue to first use). ``reloads``: (reload, reload_wait, bytes) in order of first use,
    each already at the latest point the H2D queue allows. Returns each reload's lead over its
    first use, in modelled seconds.

    The latest point leaves no slack beyond ``offload_link_slack``: measured on one H100 at
    S = 8K, one reload arriving late stalled the backward by 1.25 ms. Memory the backward is not
    using at its peak is free to hold a reload longer, so the copy gets all the lead that memory
    gives it at no cost in peak."""
    if not reloads:
        return []
    nodes, timeline = liveness.graph_timeline(gm, hold_inputs, fuse_pointwise)
    index = {node: i for i, node in enumerate(nodes)}
    live = list(timeline.live_bytes)
    for ticket, value, nbytes in reloads:  # bytes in flight between each reload and its first use
        for k in range(index[ticket], index[value]):
            live[k] += nbytes
    bound = max(live, default=0)
    floor = 0
    moves = []
    for ticket, value, nbytes in reloads:
        at = index[ticket]
        target = at
        # never above what the reload reads (its kept part; the nodes computing symbolic sizes)
        floor = max([floor] + [index[i] + 1 for i in ticket.all_input_nodes if i in index])
        while target - 1 >= floor and live[target - 1] + nbytes <= bound:
            target -= 1
        for k in range(target, at):
            live[k] += nbytes
        moves.append((ticket, target))
        floor = target
    # A reload goes before the node at its target, or where that node is a reload moved up
    # itself, before the first node after it that stays: prepending before a moved reload would
    # follow it up, above the sizes this one reads (the fuzzer's case under dynamic shapes).
    moved = {ticket for ticket, target in moves if target < index[ticket]}
    leads = []
    for (ticket, target), (_, value, _) in zip(moves, reloads):
        if ticket in moved:
            # its own first use (a reload_wait, never moved) comes later at the latest
            next(node for node in nodes[target:] if node not in moved).prepend(ticket)
        leads.append(sum(times.get(n.name, 0.0) for n in nodes[target:index[value]]))
    return leads


def _place_reloads(rewrite, first_use, times, compute, profile, planned: dict) -> dict[str, fx.Node]:
    """Per reloaded tensor, the node before which its reload is issued: where the joint planner
    simulated it (``PartitionPlan.copy_points``), else as late as the H2D queue on this graph's
    times allows (``offload_model.copy_points``: each copy due at its first use and before the
    next copy starts); never after its first use."""
    index = {node: i for i, node in enumerate(compute)}
    by_name = {node.name: node for node in compute}
    copies = [offload_model.Copy(name, _hint(rewrite.slots[name].host_bytes), 0, 0, index[first_use[name]])
              for name in first_use]
    queued, _ = offload_model.copy_points([], [times.get(n.name, 0.0) for n in compute], copies, profile)
    issue = {}
    for name in first_use:
        point = planned.get(name)
        if point and point[1] in by_name and index[by_name[point[1]]] <= index[first_use[name]]:
            issue[name] = by_name[point[1]]
        elif point and point[1] is None:
            issue[name] = compute[0]
        else:
            issue[name] = compute[queued[name][1]]
    return issue
