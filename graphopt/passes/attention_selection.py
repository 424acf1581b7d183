"""attention_selection: every attention module runs on the samples a run-time selection picks.

Stage "pre_grad" (Dynamo's torch IR), fine-tuning graphs only. Each attention module (found by
``passes/attention_modules``: from the q/k/v projections to the output projection) gets a capacity
C = round(f x B) of its batch B, f from ``attention_selection_kept_fraction`` or the module's entry
of ``attention_selection_layer_fractions``; C is compiled in, the samples are chosen every step::

    before                                  after (0 < C < B)
    q = linear(x, Wq); k = ...; v = ...     idx = graphopt.select_samples(rand(B), graph, j, o, C)
    o = sdpa(q, k, v, mask)                     # top C of priority[j] + 1e-3 * rand; idx recorded
    y = linear(o', Wo)                      xs, ms = x[idx], mask[idx]          # batched inputs
    h2 = h + y                              ... the same module on xs, ms: [C, ...] ...
                                            h2 = graphopt.add_selected(h, idx, ys, h, graph, o)
                                                # index_add(h, 0, idx, ys); |ys| / |h[idx]| recorded

    C == B: h2 = graphopt.add_selected(h, None, y, h, graph, o)   (h + y, scores recorded)
    C == 0: h2 = h; the module is gone.

One compiled graph serves every step: the choice is data (``priority``, written by
``graphopt.ops.attention_selection`` before a step, or the graph's own random draw when it is all
zero); shapes are static. The unselected samples never enter the module, so neither its forward
nor its backward runs for them and its parameters (frozen weights and LoRA adapters alike) get no
gradient from them; the selected samples get exactly the module's function. With every sample
selected (C == B) the graph computes what it did without the pass.

Safe where the module treats samples independently along dim 0: every node that depends on a
batched input is recomputed on fake tensors at C samples and must give its old shape with dim 0
scaled by C / B; a node that indexes, reduces, sorts or concatenates along dim 0, reads the batch
size as a value, or fails at C samples leaves the module unchanged (reason in the refusals). The
size arguments of view / reshape / expand / new_* whose first entry is B (or a multiple of it) are
scaled to C. ``add_selected`` replaces the module's one consumer when that is ``h + y`` of equal
shape and dtype; otherwise it adds the output into zeros (scores against the module input) and the
consumers read that.

Refused (module unchanged): more than one output; a batch of one sample or a symbolic batch;
sequence-parallel attention (shard_attention's op; each rank holds a slice of the same samples and
all would have to pick alike); a module inside a checkpoint region; a graph compiled without grad
(evaluation), which keeps every attention.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import os
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
from torch.fx.operator_schemas import normalize_function

from graphopt import _compat
from graphopt.analysis import attention_work
from graphopt.analysis.cost_model import matmul_rate
from graphopt.analysis.device_profile import current_profile
from graphopt.passes.attention_modules import (LINEAR, AttentionModule, find_attention_modules,
                                               is_parameter)
from graphopt.passes.manager import PassContext, PassResult
from graphopt.analysis.attention_sites import ADD, EXPAND, MATMUL, RESHAPE, SDPA
from graphopt.analysis.torch_ir import OpSpec

log = logging.getLogger("graphopt.passes.attention_selection")

NEW_TENSOR = OpSpec("new_tensor", methods=("new_zeros", "new_ones", "new_empty"),
                    params=("input", "size"), varargs=True,
                    ignored_kwargs=("dtype", "device", "layout", "pin_memory", "requires_grad"))
BROADCAST_TO = OpSpec("broadcast_to", (torch.broadcast_to,), ("broadcast_to",),
                      params=("input", "size"))
# Ops whose size argument names dim 0 first: (spec, the parameter holding the sizes).
SIZE_ARGUMENTS: tuple[tuple[OpSpec, str], ...] = (
    (RESHAPE, "shape"), (EXPAND, "size"), (NEW_TENSOR, "size"), (BROADCAST_TO, "size"))
_DIM_PARAMETERS = ("dim", "dims", "dimension")


class Refused(Exception):
    """A module that cannot be proven to run per sample; the message says why."""


@dataclasses.dataclass
class _Site:
    """One module and how it is rewritten."""

    module: AttentionModule
    batch: int
    capacity: int
    output: fx.Node
    batched_inputs: list[fx.Node]
    residual_add: Optional[fx.Node] = None
    residual: Optional[fx.Node] = None
    resized: dict[fx.Node, tuple[tuple, dict, Any]] = dataclasses.field(default_factory=dict)


# --- values -----------------------------------------------------------------------------------

def _val(node: Any) -> Any:
    if not isinstance(node, fx.Node):
        return node
    return node.meta.get("example_value", node.meta.get("val"))


def _static_shape(value: torch.Tensor) -> bool:
    return not any(_compat.is_symbolic(size) for size in value.shape)


def _set_meta(node: fx.Node, value: Any) -> None:
    node.meta["val"] = value
    node.meta["example_value"] = value  # Dynamo's graphs read this one


# --- analysis: which modules, and can they run on C samples -----------------------------------

def _residual_add(output: fx.Node, members: set) -> tuple[Optional[fx.Node], Optional[fx.Node]]:
    """(h + y, h) where the module output y's only consumer adds it to h of its shape and dtype."""
    users = [u for u in output.users if u not in members]
    if len(users) != 1:
        return None, None
    args = ADD.bind(users[0])  # no alpha: ADD takes input and other only
    if args is None:
        return None, None
    other = args["other"] if args["input"] is output else args["input"]
    if other is output or not isinstance(other, fx.Node):
        return None, None
    y, h = _val(output), _val(other)
    if not isinstance(h, torch.Tensor) or h.shape != y.shape or h.dtype != y.dtype:
        return None, None
    return users[0], other


def _sizes_at_capacity(node: fx.Node, batch: int, capacity: int) -> Optional[tuple[tuple, dict]]:
    """The node's (args, kwargs) with its size argument's first entry k * B made k * C."""
    for spec, name in SIZE_ARGUMENTS:
        if spec.bind(node) is None:
            continue
        position = spec.params.index(name)
        if name in node.kwargs:
            given, rebuild = node.kwargs[name], lambda new: (tuple(node.args), {**node.kwargs, name: new})
        elif len(node.args) > position + 1 or isinstance(node.args[position], int):
            given = tuple(node.args[position:])  # sizes one by one: x.view(B, S, H, D)
            rebuild = lambda new: (tuple(node.args[:position]) + tuple(new), dict(node.kwargs))  # noqa: E731
        else:
            given = node.args[position]
            rebuild = lambda new: (tuple(node.args[:position]) + (tuple(new),) + tuple(  # noqa: E731
                node.args[position + 1:]), dict(node.kwargs))
        sizes = [given] if isinstance(given, int) else list(given)
        if not sizes or not isinstance(sizes[0], int) or sizes[0] <= 0 or sizes[0] % batch:
            return None
        sizes[0] = sizes[0] // batch * capacity
        return rebuild(sizes[0] if isinstance(given, int) else sizes)
    return None


def _touches_batch_dim(node: fx.Node) -> bool:
    """The node indexes, reduces or reorders along dim 0 (from its op's schema)."""
    if node.target is operator.getitem:
        if not isinstance(_val(node.args[0]), torch.Tensor):
            return False  # an item of a tuple (split, topk), not an index into a tensor
        index = node.args[1]
        first = index[0] if isinstance(index, tuple) and index else index
        return not (first is None or first is Ellipsis or first == slice(None))
    function = node.target if node.op == "call_function" else getattr(torch, str(node.target), None)
    if not callable(function):
        return False
    try:
        normalized = normalize_function(function, tuple(node.args), dict(node.kwargs),
                                        normalize_to_only_use_kwargs=True)
    except Exception:  # no schema matches these arguments: nothing to read
        normalized = None
    if normalized is None:
        return False
    first = next((a for a in node.all_input_nodes if isinstance(_val(a), torch.Tensor)), None)
    rank = _val(first).dim() if first is not None else 0
    for name in _DIM_PARAMETERS:
        dims = normalized.kwargs.get(name)
        dims = [dims] if isinstance(dims, int) else list(dims or ()) if isinstance(
            dims, (tuple, list)) else []
        if any(isinstance(d, int) and rank and d % rank == 0 for d in dims):
            return True
    return False


def _fake_call(node: fx.Node, args: tuple, kwargs: dict, env: dict[fx.Node, Any]) -> Any:
    """Run the node's op on fake values: ``env``'s for the nodes in it, the recorded ones else."""
    def value(arg: Any) -> Any:
        return env[arg] if isinstance(arg, fx.Node) and arg in env else _val(arg)
    values = fx.node.map_aggregate(args, value)
    kw = fx.node.map_aggregate(kwargs, value)
    if node.op == "call_method":
        return getattr(values[0], node.target)(*values[1:], **kw)
    return node.target(*values, **kw)


def _check_resized(node: fx.Node, old: Any, new: Any, batch: int, capacity: int) -> None:
    olds = old if isinstance(old, (tuple, list)) else (old,)
    news = new if isinstance(new, (tuple, list)) else (new,)
    if len(olds) != len(news):
        raise Refused(f"{node.name} returns a different number of values at {capacity} samples")
    for before, after in zip(olds, news):
        if before is None and after is None:
            continue
        if not isinstance(before, torch.Tensor) or not isinstance(after, torch.Tensor):
            raise Refused(f"{node.name} ({node.target}) produces a non-tensor value from the batch "
                          f"({before!r}); a module that reads the batch size cannot be resized")
        first_old, first_new = before.shape[0] if before.dim() else None, \
            after.shape[0] if after.dim() else None
        if (before.dim() == 0 or first_old % batch or first_new * batch != first_old * capacity
                or tuple(before.shape[1:]) != tuple(after.shape[1:]) or before.dtype != after.dtype):
            raise Refused(f"{node.name} ({node.target}) does not keep samples along dim 0: shape "
                          f"{tuple(before.shape)} at {batch} samples, {tuple(after.shape)} at "
                          f"{capacity}")


def _resize(site: _Site, fake_mode) -> None:
    """Recompute every node that depends on the batch at ``capacity`` samples (fake tensors)."""
    module, batch, capacity = site.module, site.batch, site.capacity
    env: dict[fx.Node, Any] = {}
    with fake_mode:
        for x in site.batched_inputs:
            value = _val(x)
            env[x] = value.new_empty((value.shape[0] // batch * capacity, *value.shape[1:]))
    batched = set(site.batched_inputs)
    for node in module.nodes:
        if not any(a in batched for a in node.all_input_nodes):
            continue
        if node.op == "call_module":
            raise Refused(f"{node.name}: calls a module Dynamo did not inline ({node.target})")
        if _touches_batch_dim(node):
            raise Refused(f"{node.name} ({node.target}) works along dim 0, the samples; the "
                          "module is not per sample")
        batched.add(node)
        args, kwargs = _sizes_at_capacity(node, batch, capacity) or (tuple(node.args),
                                                                      dict(node.kwargs))
        try:
            with fake_mode:
                new = _fake_call(node, args, kwargs, env)
        except Exception as error:
            raise Refused(f"{node.name} ({node.target}) fails at {capacity} of {batch} samples: "
                          f"{type(error).__name__}: {str(error).splitlines()[0][:160]}") from None
        _check_resized(node, _val(node), new, batch, capacity)
        env[node] = new
        site.resized[node] = (args, kwargs, new)
    if site.output not in batched:
        raise Refused(f"{site.output.name}: the module's output does not depend on its batched "
                      "inputs")


def _analyse(module: AttentionModule, fraction: float, fake_mode) -> _Site:
    if module.distributed:
        raise Refused(f"{module.path}: sequence-parallel attention ({module.core.name}); every rank "
                      "of the group holds part of the same samples and would have to choose alike")
    if len(module.outputs) != 1:
        raise Refused(f"{module.path}: {len(module.outputs)} of its values are read outside it "
                      f"({', '.join(n.name for n in module.outputs)}); only a module with one "
                      "output (its attention output) is selected")
    output = module.outputs[0]
    value = _val(output)
    if not isinstance(value, torch.Tensor) or value.dim() == 0 or not _static_shape(value):
        raise Refused(f"{module.path}: its output {output.name} is not a tensor of static shape "
                      "[B, ...] (a symbolic batch: Dynamo makes it dynamic after a batch of "
                      "another size); keep the batch size fixed (drop_last=True) or compile with "
                      "dynamic=False")
    batch = int(value.shape[0])
    if batch < 2:
        raise Refused(f"{module.path}: a batch of {batch} sample(s); selection picks samples")
    batched = [x for x in module.inputs if not is_parameter(x) and isinstance(_val(x), torch.Tensor)
               and _val(x).dim() > 0 and _static_shape(_val(x)) and _val(x).shape[0] == batch]
    if not batched:
        raise Refused(f"{module.path}: none of its inputs carries the batch of {batch} samples")
    members = set(module.nodes)
    site = _Site(module, batch, attention_work.capacity(fraction, batch), output, batched)
    site.residual_add, site.residual = _residual_add(output, members)
    if 0 < site.capacity < batch:
        _resize(site, fake_mode)
    return site


# --- work model -----------------------------------------------------------------------------------

def _gemms(site: _Site) -> list[attention_work.Gemm]:
    """The matrix products of one sample through the module (the work selection skips)."""
    gemms = []
    for node in site.module.nodes:
        out = _val(node)
        linear = LINEAR.bind(node)
        matmul = MATMUL.bind(node)
        sdpa = SDPA.bind(node)
        if linear is not None:
            weight = _val(linear["weight"])
            gemms.append(attention_work.Gemm(2.0 * out.numel() * weight.shape[-1] / site.batch, False,
                                             bool(weight.requires_grad)))
        elif matmul is not None and isinstance(out, torch.Tensor):
            a = _val(matmul["input"])
            weight = next((_val(x) for x in (matmul["input"], matmul["other"]) if is_parameter(x)),
                          None)
            flops = 2.0 * out.numel() * a.shape[-1] / site.batch
            gemms.append(attention_work.Gemm(flops, weight is None,
                                             bool(weight is not None and weight.requires_grad)))
        elif sdpa is not None:
            q, k = _val(sdpa["query"]), _val(sdpa["key"])
            flops = 4.0 * q.numel() * k.shape[-2] / site.batch
            gemms.append(attention_work.Gemm(flops / 2 if sdpa["is_causal"] is True else flops, True))
    return gemms


# --- rewrite --------------------------------------------------------------------------------------

class _Emitter:
    """Creates nodes with fake values (``val`` and Dynamo's ``example_value``)."""

    def __init__(self, graph: fx.Graph, fake_mode):
        self.graph, self.fake_mode = graph, fake_mode

    def call(self, target: Callable, *args, method: bool = False, **kwargs) -> fx.Node:
        node = (self.graph.call_method if method else self.graph.call_function)(target, args, kwargs)
        values = fx.node.map_aggregate(args, _val)
        kw = fx.node.map_aggregate(kwargs, _val)
        with self.fake_mode:
            value = getattr(values[0], target)(*values[1:], **kw) if method else target(*values, **kw)
        _set_meta(node, value)
        return node


def _first_user(nodes: list[fx.Node], input_node: fx.Node) -> fx.Node:
    return next(n for n in nodes if input_node in n.all_input_nodes)


def _module_input(site: _Site) -> fx.Node:
    """The batched input the projections read (the hidden states), else the largest one."""
    projected = {a for p in site.module.projections for a in p.all_input_nodes}
    direct = [x for x in site.batched_inputs if x in projected]
    return direct[0] if direct else max(site.batched_inputs, key=lambda x: _val(x).numel())


def _add_back(gm: fx.GraphModule, site: _Site, emit: _Emitter, graph_name: str, offset: int,
              idx: Optional[fx.Node]) -> dict[fx.Node, fx.Node]:
    """The module output into the residual stream (into zeros where no residual add follows),
    with its scores recorded: ``add_selected`` replaces ``h + y``. Returns {node: the node now
    read in its place}."""
    graph, output = gm.graph, site.output
    add_selected = torch.ops.graphopt.add_selected.default
    if site.residual_add is not None:
        with graph.inserting_before(site.residual_add):
            added = emit.call(add_selected, site.residual, idx, output, site.residual, graph_name,
                              offset)
        site.residual_add.replace_all_uses_with(added)
        graph.erase_node(site.residual_add)
        return {site.residual_add: added}
    users = [u for u in output.users if u not in set(site.module.nodes)]
    value = _val(output)
    with graph.inserting_after(output):
        zeros = emit.call(torch.zeros, (site.batch, *value.shape[1:]), dtype=value.dtype,
                          device=value.device)
    with graph.inserting_after(zeros):
        full = emit.call(add_selected, zeros, idx, output, _module_input(site), graph_name, offset)
    for user in users:
        user.replace_input_with(output, full)
    return {output: full}


def _rewrite_selected(gm: fx.GraphModule, site: _Site, emit: _Emitter, graph_name: str,
                      row: int, offset: int) -> dict[fx.Node, fx.Node]:
    """0 < C < B: the module runs on the C selected samples."""
    graph, module = gm.graph, site.module
    first_users = {x: _first_user(module.nodes, x) for x in site.batched_inputs}
    order = {node: i for i, node in enumerate(graph.nodes)}
    with graph.inserting_before(min(first_users.values(), key=order.__getitem__)):
        noise = emit.call(torch.rand, site.batch, device=_val(site.output).device,
                          dtype=torch.float32)
        idx = emit.call(torch.ops.graphopt.select_samples.default, noise, graph_name, row, offset,
                        site.capacity)
    for node, (args, kwargs, value) in site.resized.items():
        node.args, node.kwargs = args, kwargs
        _set_meta(node, value)
    for x, first in first_users.items():
        with graph.inserting_before(first):
            small = emit.call(torch.index_select, x, 0, idx)
        for node in module.nodes:
            if x in node.all_input_nodes:
                node.replace_input_with(x, small)
    return _add_back(gm, site, emit, graph_name, offset, idx)


def _remove(gm: fx.GraphModule, site: _Site, emit: _Emitter) -> dict[fx.Node, fx.Node]:
    """C == 0: the module contributes nothing; its nodes go. Returns {node: the node now read in
    its place}."""
    graph, output = gm.graph, site.output
    if site.residual_add is not None:
        site.residual_add.replace_all_uses_with(site.residual)
        graph.erase_node(site.residual_add)
        replaced = {site.residual_add: site.residual}
    else:
        value = _val(output)
        with graph.inserting_after(output):
            zeros = emit.call(torch.zeros, tuple(value.shape), dtype=value.dtype, device=value.device)
        for user in [u for u in output.users if u is not zeros]:
            user.replace_input_with(output, zeros)
        replaced = {output: zeros}
    for node in reversed(site.module.nodes):
        if not node.users and not node.is_impure():
            graph.erase_node(node)
    return replaced


def _follow(site: _Site, replaced: dict[fx.Node, fx.Node]) -> None:
    """Point ``site`` at the nodes that took the place of those an earlier module's rewrite
    replaced: a module whose input is the one before it's ``h + y`` (two attention blocks in a
    row) reads ``add_selected`` now, and the erased add must not be read (found by the fuzzer)."""
    def resolve(node):
        while isinstance(node, fx.Node) and node in replaced:
            node = replaced[node]
        return node
    site.batched_inputs = list(dict.fromkeys(resolve(x) for x in site.batched_inputs))
    site.residual = resolve(site.residual)
    site.resized = {node: (fx.node.map_arg(args, resolve), fx.node.map_arg(kwargs, resolve), value)
                    for node, (args, kwargs, value) in site.resized.items()}


def _runtime():
    from graphopt.ops import attention_selection
    return attention_selection


def _grad_refusal(gm: fx.GraphModule) -> Optional[str]:
    if not torch.is_grad_enabled():
        return "the graph is compiled without grad (evaluation): every attention runs"
    if not any(isinstance(_val(n), torch.Tensor) and _val(n).requires_grad
               for n in gm.graph.nodes if n.op == "placeholder"):
        return "no input of the graph requires grad (an inference graph): every attention runs"
    return None


def select_attention(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Make every attention module of ``gm`` run on its selected samples (see the module doc)."""
    runtime = _runtime()
    refusal = _grad_refusal(gm)
    if refusal is not None:
        return PassResult(gm, modified=False, refusals=[refusal])
    modules, refusals = find_attention_modules(gm)
    cfg = ctx.config
    fractions = cfg.attention_selection_layer_fractions
    if fractions is not None and len(fractions) != len(modules):
        raise ValueError(
            f"attention_selection_layer_fractions has {len(fractions)} entries but graph "
            f"{ctx.graph_id} has {len(modules)} attention modules ({', '.join(m.path for m in modules)}); "
            "give one fraction per module in this order (selector().layer_fractions() does), or "
            "None")
    if cfg.attention_selection_strategy == "layer" and fractions is None:
        raise ValueError("attention_selection_strategy='layer' needs per-module capacities: run "
                         "warm-up steps (any strategy), then set attention_selection_layer_fractions"
                         "=graphopt.ops.attention_selection.selector().layer_fractions(f) and compile "
                         "again")
    fake_mode = next((v.fake_mode for v in (_val(n) for n in gm.graph.nodes)
                      if isinstance(v, torch.Tensor) and hasattr(v, "fake_mode")), None)
    if fake_mode is None:
        return PassResult(gm, modified=False, refusals=refusals + [
            "the graph's nodes carry no fake values (meta['example_value'] / ['val']), so shapes at "
            "a smaller batch cannot be checked"])
    sites: list[_Site] = []
    for index, module in enumerate(modules):
        fraction = fractions[index] if fractions is not None else cfg.attention_selection_kept_fraction
        try:
            sites.append(_analyse(module, fraction, fake_mode))
        except Refused as reason:
            refusals.append(str(reason))
    if not sites:
        return PassResult(gm, modified=False, refusals=refusals,
                          stats={"attention_modules": len(modules)})
    profile = current_profile(cfg.device_profile)
    batch = sites[0].batch
    partial = [s for s in sites if 0 < s.capacity < s.batch]
    device = _val(sites[0].output).device
    with _compat.real_tensors():
        priority = torch.zeros((max(1, len(partial)), batch), dtype=torch.float32, device=device)
        recorded = max(1, sum(s.capacity for s in sites))
        selected = torch.zeros(recorded, dtype=torch.int64, device=device)
        scores = torch.full((recorded,), float("nan"), dtype=torch.float32, device=device)
    emit = _Emitter(gm.graph, fake_mode)
    described, row, offset = [], 0, 0
    replaced: dict[fx.Node, fx.Node] = {}
    for site in sites:
        _follow(site, replaced)
        flops = attention_work.module_flops(_gemms(site))
        seconds = flops / matmul_rate(profile, _val(site.output).dtype)
        entry = runtime.SelectedModule(
            site.module.path, site.capacity, site.batch,
            row if 0 < site.capacity < site.batch else None,
            offset if site.capacity > 0 else None, flops, seconds,
            "residual" if site.residual is not None else "input")
        if 0 < site.capacity < site.batch:
            replaced.update(_rewrite_selected(gm, site, emit, ctx.graph_id, row, offset))
            row += 1
        elif site.capacity == site.batch:
            replaced.update(_add_back(gm, site, emit, ctx.graph_id, offset, None))
        else:
            replaced.update(_remove(gm, site, emit))
        offset += site.capacity
        described.append(entry)
    gm.graph.lint()
    log.debug("[%s] %d attention modules: capacities %s of %d", ctx.graph_id, len(sites),
              [s.capacity for s in sites], batch)
    log_dir = _log_dir(cfg.dump_dir, ctx.graph_id)
    runtime.register_graph(runtime.GraphSelection(
        ctx.graph_id, cfg.attention_selection_strategy, cfg.attention_selection_seed,
        tuple(described), priority, selected, scores, log_dir))
    notes = {"attention_selection": {
        "strategy": cfg.attention_selection_strategy, "batch": batch,
        "modules": [dataclasses.asdict(m) for m in described],
        "attention_flops_per_step": sum(m.flops_per_sample * m.batch for m in described),
        "selected_flops_per_step": sum(m.flops_per_sample * m.capacity for m in described),
        "per_step_log": os.path.join(log_dir, "attention_selection_steps.jsonl") if log_dir else None,
    }}
    stats = {"attention_modules": len(modules), "selected": len(partial),
             "whole": sum(s.capacity == s.batch for s in sites),
             "removed": sum(s.capacity == 0 for s in sites)}
    return PassResult(gm, modified=True, matched=len(sites), stats=stats, refusals=refusals,
                      notes=notes, files={"attention_selection.txt": lambda: _table(described)})


def _log_dir(dump_dir: Optional[str], graph_id: str) -> Optional[str]:
    """The graph's dump folder (per rank with several ranks), where the per-step log goes."""
    if not dump_dir:
        return None
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dump_dir = os.path.join(dump_dir, f"rank{dist.get_rank()}")
    return os.path.join(dump_dir, graph_id)


def _table(modules) -> str:
    lines = ["module | capacity / batch | GFLOP per sample (fwd+bwd) | modelled us per sample | "
             "score reference"]
    for m in modules:
        lines.append(f"{m.name} | {m.capacity} / {m.batch} | {m.flops_per_sample / 1e9:.4f} | "
                     f"{m.seconds_per_sample * 1e6:.3f} | {m.reference}")
    return "\n".join(lines) + "\n"

