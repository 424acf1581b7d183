"""Liveness of tensors over a schedule: bytes live at every step of forward + backward.

``SavedTensor`` describes one activation that the forward saves for the backward; the
rematerialization planner and the offload model (issue 7) exchange lists of them.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from graphopt.analysis.cost_model import is_view, tensor_nbytes, workspace_bytes


@dataclasses.dataclass(frozen=True)
class SavedTensor:
    """One tensor the forward saves for the backward, as the planners see it."""

    name: str                       # node name in the joint graph (= forward output / backward placeholder)
    nbytes: int                     # bytes of its elements: what an offload copies
    shape: tuple
    dtype: torch.dtype
    fw_index: int                   # position in the forward schedule where it is produced
    bw_index: int                   # position in the backward schedule of its first use
    fw_time_after_s: float          # estimated forward compute time after it is produced
    bw_time_before_s: float         # estimated backward compute time before its first use
    recompute_time_s: float | None  # None if it cannot be recomputed
    # Device bytes freed once it leaves the device: the allocation it holds (a view's base, all of
    # it) when nothing else keeps that alive. None: ``nbytes``.
    device_nbytes: int | None = None

    @property
    def freed_nbytes(self) -> int:
        return self.nbytes if self.device_nbytes is None else self.device_nbytes


@dataclasses.dataclass(frozen=True)
class Step:
    """One op of a schedule: it allocates ``nbytes`` for ``key`` and reads ``inputs``.

    ``storage`` names the allocation the output lives in: its own key, or the storage of the input
    it is a view of. Keys are unique over the whole schedule ("f:x" for x in forward, "b:x" for x
    computed or recomputed in backward, "t:x" for a backward input such as a tangent). An op with
    several outputs allocates them all when it runs (``outputs``, storages "key#0", "key#1", ...);
    its getitems live in those storages, and an output nobody reads is freed right away.
    ``workspace`` bytes live only while the op runs (a kernel's own scratch memory)."""

    key: str
    nbytes: int
    storage: str
    inputs: tuple[str, ...]
    outputs: tuple[int, ...] = ()
    workspace: int = 0


@dataclasses.dataclass
class Timeline:
    """Bytes live after every step of a schedule (inputs to the graph not counted)."""

    labels: list[str]
    live_bytes: list[int]
    boundary: int  # index of the first backward step (len(labels) when there is none)

    @property
    def peak(self) -> int:
        return max(self.live_bytes, default=0)

    @property
    def peak_index(self) -> int:
        return max(range(len(self.live_bytes)), key=self.live_bytes.__getitem__, default=0)

    @property
    def peak_label(self) -> str:
        return self.labels[self.peak_index] if self.labels else ""

    def to_json(self) -> dict:
        return {"peak": self.peak, "peak_at": self.peak_label, "boundary": self.boundary,
                "steps": len(self.labels)}


def simulate(steps: list[Step], pinned: set[str] = frozenset(), preloaded: dict[str, int] | None = None,
             boundary: int | None = None) -> Timeline:
    """Run a schedule over a memory counter.

    An op's output storage is allocated when the op runs and freed right after the last step that
    reads any tensor living in it; storages in ``pinned`` (forward outputs the user holds) stay to
    the end (``pinned`` names keys; their storages are kept). ``preloaded`` storages exist before the first step (bytes by key) and are freed at
    their last use like the others. The bytes after a step include the step's inputs and output, so
    the peak is the high-water mark an allocator without fragmentation would see."""
    storage_of: dict[str, str] = {}
    size: dict[str, int] = dict(preloaded or {})
    for key in size:
        storage_of[key] = key
    for step in steps:
        for index, nbytes in enumerate(step.outputs):
            storage_of[f"{step.key}#{index}"] = f"{step.key}#{index}"
            size[f"{step.key}#{index}"] = nbytes
        storage_of[step.key] = storage_of.get(step.storage, step.storage)
        if storage_of[step.key] == step.key:
            size[step.key] = step.nbytes
    last_use: dict[str, int] = {}
    for index, step in enumerate(steps):
        owned = [f"{step.key}#{i}" for i in range(len(step.outputs))]
        for name in (step.key, *step.inputs, *owned):
            storage = storage_of.get(name)
            if storage is not None:
                last_use[storage] = index
    pinned_storages = {storage_of.get(key, key) for key in pinned}
    frees: dict[int, list[str]] = {}
    for storage, index in last_use.items():
        if storage not in pinned_storages:
            frees.setdefault(index, []).append(storage)
    live = sum(size.get(key, 0) for key in (preloaded or {}))
    labels, live_bytes = [], []
    for index, step in enumerate(steps):
        if storage_of[step.key] == step.key:
            live += size[step.key]
        live += sum(step.outputs)
        labels.append(step.key)
        live_bytes.append(live + step.workspace)
        for storage in frees.get(index, ()):
            live -= size.get(storage, 0)
    return Timeline(labels, live_bytes, len(steps) if boundary is None else boundary)


def output_nodes(gm: fx.GraphModule) -> list:
    """The flat list of what ``gm`` returns (nodes, or constants / None)."""
    output = next(iter(gm.graph.find_nodes(op="output")))
    return list(pytree.tree_leaves(output.args[0]))


def _graph_steps(gm: fx.GraphModule, prefix: str, key_of: dict[str, str]) -> list[Step]:
    """Steps of the call_function nodes of ``gm``; ``key_of`` maps node names to schedule keys
    (placeholders are looked up there and are free when absent)."""
    steps = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        key = f"{prefix}{node.name}"
        key_of[node.name] = key
        inputs = tuple(key_of.get(i.name, f"in:{i.name}") for i in node.all_input_nodes)
        value = node.meta.get("val")
        parent = tuple_parent(node)
        base = aliased_input(node)
        if base is not None and inputs and not is_view(node):  # an output of split, unbind, ...
            steps.append(Step(key, 0, key_of.get(base.name, f"in:{base.name}"), inputs))
        elif isinstance(value, (tuple, list)) and is_view(node):
            steps.append(Step(key, 0, inputs[0], inputs) if inputs else Step(key, 0, key, ()))
        elif isinstance(value, (tuple, list)):
            steps.append(Step(key, 0, key, inputs, tuple(tensor_nbytes(v) for v in value),
                              workspace_bytes(node)))
        elif parent is not None and parent.name in key_of:
            steps.append(Step(key, 0, f"{key_of[parent.name]}#{node.args[1]}", inputs))
        elif is_view(node) and inputs:
            steps.append(Step(key, 0, inputs[0], inputs))
        else:
            steps.append(Step(key, tensor_nbytes(value), key, inputs, workspace=workspace_bytes(node)))
    return steps


def aliased_input(node: fx.Node) -> fx.Node | None:
    """The input whose memory ``node``'s value lives in: a view's base, and for an output of a
    view op with several outputs (split, unbind, chunk) that op's base; None if it allocates."""
    if node.op != "call_function":
        return None
    parent = tuple_parent(node)
    if parent is not None:
        return aliased_input(parent) if is_view(parent) else None
    if is_view(node) and node.all_input_nodes:
        return node.all_input_nodes[0]
    return None


def tuple_parent(node: fx.Node) -> fx.Node | None:
    """The multi-output node ``node`` takes an element of (``operator.getitem``), or None."""
    if node.target is not operator.getitem or not isinstance(node.args[1], int):
        return None
    parent = node.args[0]
    if isinstance(parent, fx.Node) and isinstance(parent.meta.get("val"), (tuple, list)):
        return parent
    return None


def graph_timeline(gm: fx.GraphModule, hold_inputs: bool = False) -> tuple[list[fx.Node], Timeline]:
    """Bytes live after each call_function node of one graph (the nodes, and the timeline).

    Its placeholders exist from the start and are freed at their last use (held to the end with
    ``hold_inputs``, where the caller keeps the argument list); what it returns lives to the end."""
    key_of: dict[str, str] = {}
    preloaded = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        key_of[node.name] = f"in:{node.name}"
        preloaded[f"in:{node.name}"] = tensor_nbytes(node.meta.get("val"))
    steps = _graph_steps(gm, "", key_of)
    pinned = {key_of[n.name] for n in output_nodes(gm) if isinstance(n, fx.Node) and n.name in key_of}
    if hold_inputs:
        pinned |= set(preloaded)
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    return nodes, simulate(steps, pinned, preloaded)


def partitioned_timeline(fw_gm: fx.GraphModule, bw_gm: fx.GraphModule, num_fwd_outputs: int,
                         hold_backward_inputs: bool = False) -> Timeline:
    """Bytes live over forward then backward of a partitioned graph pair.

    Graph inputs (parameters, user inputs) are not counted. Saved tensors live from their
    production in forward to their last use in backward (to the end of backward with
    ``hold_backward_inputs``, where the runtime holds the backward's argument list); the forward's
    own outputs (held by the caller) and the gradients (returned) live to the end. Tangents appear
    when backward starts."""
    fw_keys: dict[str, str] = {}
    steps = _graph_steps(fw_gm, "f:", fw_keys)
    fw_outputs = output_nodes(fw_gm)
    pinned = {fw_keys[n.name] for n in fw_outputs[:num_fwd_outputs]
              if isinstance(n, fx.Node) and n.name in fw_keys}
    boundary = len(steps)
    bw_keys: dict[str, str] = {}
    for node in bw_gm.graph.find_nodes(op="placeholder"):
        if node.name in fw_keys:
            bw_keys[node.name] = fw_keys[node.name]
        elif "tangents" in node.name:
            bw_keys[node.name] = f"t:{node.name}"
            steps.append(Step(f"t:{node.name}", tensor_nbytes(node.meta.get("val")), f"t:{node.name}", ()))
    steps += _graph_steps(bw_gm, "b:", bw_keys)
    pinned |= {bw_keys[n.name] for n in output_nodes(bw_gm) if isinstance(n, fx.Node) and n.name in bw_keys}
    if hold_backward_inputs:
        pinned |= {bw_keys[n.name] for n in bw_gm.graph.find_nodes(op="placeholder") if n.name in bw_keys}
    return simulate(steps, pinned, boundary=boundary)
