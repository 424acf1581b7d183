"""Liveness of tensors over a schedule: bytes live at every step of forward + backward.

``SavedTensor`` describes one activation that the forward saves for the backward; the
rematerialization planner and the offload model (issue 7) exchange lists of them.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Iterable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from graphopt.analysis.cost_model import tensor_nbytes, workspace_bytes
from graphopt.analysis.op_facts import fusion_kind, is_view


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
    kind: str = ""  # fusion_kind of the op: "pointwise", "reduction" or "" (see inline_pointwise)
    # Time of the op on the compute stream where it is priced whole (a GEMM, attention, a
    # collective; every op under eager codegen; 0 for views); None: a kernel Inductor writes,
    # priced from the bytes it reads and writes (``kernel_time.step_seconds``).
    seconds: float | None = None
    value_bytes: int = 0   # bytes of its value: what a reader of it reads (a view: its elements)
    inlined: bool = False  # computed inside its readers' kernels (``inline_pointwise``)


@dataclasses.dataclass
class Timeline:
    """Bytes live after every step of a schedule (inputs to the graph not counted), and the
    seconds each step takes on the compute stream (empty when the schedule was not priced)."""

    labels: list[str]
    live_bytes: list[int]
    boundary: int  # index of the first backward step (len(labels) when there is none)
    seconds: list[float] = dataclasses.field(default_factory=list)

    @property
    def forward_s(self) -> float:
        return math.fsum(self.seconds[:self.boundary])

    @property
    def backward_s(self) -> float:
        return math.fsum(self.seconds[self.boundary:])

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
             boundary: int | None = None, seconds: list[float] | None = None) -> Timeline:
    """Run a schedule over a memory counter.

    An op's output storage is allocated when the op runs and freed right after the last step that
    reads any tensor living in it; storages in ``pinned`` (forward outputs the user holds) stay to
    the end (``pinned`` names keys; their storages are kept). ``preloaded`` storages exist before the first step (bytes by key) and are freed at
    their last use like the others. The bytes after a step include the step's inputs and output, so
    the peak is the high-water mark an allocator without fragmentation would see. A kernel's
    workspace is live while its step runs. (Inductor's buffer reuse would hold dead buffers past
    their last use; graphs graphopt plans compile without it, see graphopt_backend.)"""
    storage_of, size, last_use = _storages(steps, preloaded)
    pinned_storages = {storage_of.get(key, key) for key in pinned}
    frees: dict[int, list[str]] = {}
    for storage, index in last_use.items():
        if storage not in pinned_storages:
            frees.setdefault(index, []).append(storage)
    boundary = len(steps) if boundary is None else boundary
    live = sum(size.get(key, 0) for key in (preloaded or {}))
    labels, live_bytes = [], []
    for index, step in enumerate(steps):
        if storage_of[step.key] == step.key:
            live += size[step.key]
        live += sum(step.outputs)
        labels.append(step.key)
        live_bytes.append(live)
        for storage in frees.get(index, ()):
            live -= size.get(storage, 0)
    for index, step in enumerate(steps):
        live_bytes[index] += step.workspace
    return Timeline(labels, live_bytes, boundary, list(seconds or []))


def live_storages(steps: list[Step], pinned: set[str], index: int) -> tuple[dict[str, int], int]:
    """The storages live at step ``index`` of ``simulate``'s count (bytes by storage), and the
    workspace of the kernel that runs there: what its bytes are made of."""
    storage_of, size, last_use = _storages(steps)
    kept = {storage_of.get(key, key) for key in pinned}
    live: dict[str, int] = {}
    for step in steps[:index + 1]:
        if storage_of[step.key] == step.key:
            live[step.key] = size[step.key]
        for position, nbytes in enumerate(step.outputs):
            live[f"{step.key}#{position}"] = nbytes
    for storage in list(live):
        if storage not in kept and last_use.get(storage, index) < index:
            del live[storage]
    return live, steps[index].workspace if steps else 0


def _storages(steps: list[Step], preloaded: dict[str, int] | None = None):
    """The storage each key lives in, each storage's bytes, and the index of the last step that
    reads each storage (or, for its own, writes it)."""
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
    return storage_of, size, last_use


# --- what a fusing compiler does not allocate -------------------------------------------------------

# Which ops Inductor computes inside their readers: ``op_facts.fusion_kind``.

# Inductor's limits for computing a pointwise value inside its readers (torch/_inductor/config.py,
# GPU values): a value several ops read is stored when its inlined code reads more than
# REUSE_READS buffers or has more than MAX_OPS ops; any value that reads more than MAX_READS.
REUSE_READS = 4
MAX_OPS = 30
MAX_READS = 8


def inline_pointwise(steps: list[Step], pinned: set[str] = frozenset(), boundary: int | None = None) -> list[Step]:
    """The schedule as Inductor runs it: a pointwise value that only pointwise and reduction
    steps of the same graph read (directly or through views), and that is not kept (``pinned``)
    or saved for the backward (read across ``boundary``), is computed inside its readers' kernels:
    it allocates nothing, and its readers read its inputs instead, which therefore live until the
    last of those kernels. As Inductor does, a value with several readers is stored after all
    when its inlined code reads more than REUSE_READS buffers or has more than MAX_OPS ops, and
    any value that reads more than MAX_READS; a value a matmul, attention or any other kernel
    reads is always stored. Sibling kernels are then fused (``_fuse_siblings``), and scatters
    write into the buffers of inputs that die in them (``_write_in_place``). Without this the
    simulation counts every intermediate of a chain (as eager code runs the FX graph): at 7B
    dimensions the fp32 intermediates of one SiLU backward alone are 0.7 GiB at 8K tokens."""
    boundary = len(steps) if boundary is None else boundary
    readers: dict[str, list[int]] = {}
    for i, step in enumerate(steps):
        for name in step.inputs:
            readers.setdefault(name, []).append(i)
    expanded: dict[str, tuple[str, ...]] = {}  # inlined value (or a view of one) -> buffers it reads
    ops: dict[str, int] = {}
    result = []
    for i, step in enumerate(steps):
        reads: list[str] = []
        for name in step.inputs:
            for source in expanded.get(name, (name,)):
                if source not in reads:
                    reads.append(source)
        extra = tuple(r for r in reads if r not in step.inputs)
        if extra:  # (the constructor: dataclasses.replace costs twice as much here)
            step = Step(step.key, step.nbytes, step.storage, step.inputs + extra, step.outputs,
                        step.workspace, step.kind, step.seconds, step.value_bytes)
        if step.storage in expanded and step.nbytes == 0 and not step.outputs:  # a view of one
            expanded[step.key] = expanded[step.storage]
            result.append(step)
            continue
        if (step.kind == "pointwise" and not step.outputs and step.storage == step.key and step.nbytes
                and step.key not in pinned):
            count = 1 + sum(ops.get(name, 0) for name in step.inputs)
            users = _final_readers(steps, readers, step.key, pinned)
            if (users and len(reads) <= MAX_READS
                    and all(steps[j].kind in ("pointwise", "reduction") and (i < boundary) == (j < boundary)
                            for j in users)
                    and (len(users) == 1 or (len(reads) <= REUSE_READS and count <= MAX_OPS))):
                expanded[step.key], ops[step.key] = tuple(reads), count
                result.append(Step(step.key, 0, step.storage, step.inputs, step.outputs, step.workspace,
                                   step.kind, step.seconds, step.value_bytes, inlined=True))
                continue
        result.append(step)
    return _write_in_place(_fuse_siblings(result, boundary), pinned)


# Steps of the FX schedule within which sibling kernels are fused (Inductor fuses the nodes of
# one region of the graph; this keeps a group from spanning layers).
FUSION_WINDOW = 64


def _fuse_siblings(steps: list[Step], boundary: int) -> list[Step]:
    """Stored pointwise values of one size that read a common buffer (of at least a quarter of
    their size), neither depending on the other, are one Inductor kernel (it fuses nodes that
    share reads): the kernel runs where the last of them could, all their outputs are allocated
    together, and the steps that read the earlier ones (directly or not) wait for it; every
    other step keeps its place. A SiLU backward so writes its three [tokens, ffn] values at
    once, after the matmul that feeds two of them, and the weight gradient that reads the third
    runs after that kernel."""
    index_of = {step.key: i for i, step in enumerate(steps)}
    deps = [{index_of[name] for name in (*step.inputs, step.storage) if index_of.get(name, i) != i}
            for i, step in enumerate(steps)]  # the steps each one reads (a view: its base too)

    def depends(i: int, first: int, group: list[int]) -> bool:
        """Whether step i reads, through any chain of steps after ``first``, a member of group."""
        targets, seen, stack = set(group), set(), [i]
        while stack:
            for j in deps[stack.pop()]:
                if j in targets:
                    return True
                if j > first and j not in seen:
                    seen.add(j)
                    stack.append(j)
        return False

    buffer_bytes: dict[str, int] = {}  # bytes of the buffer a value lives in (through views)
    for step in steps:
        buffer_bytes[step.key] = buffer_bytes.get(step.storage, step.nbytes)
    leader: dict[int, int] = {}
    members: dict[int, list[int]] = {}
    by_read: dict[tuple, list[int]] = {}
    for i, step in enumerate(steps):
        if step.kind != "pointwise" or not step.nbytes or step.storage != step.key:
            continue
        phase = i < boundary
        shared = [name for name in step.inputs if buffer_bytes.get(name, 0) * 4 >= step.nbytes]
        for name in shared:
            for j in by_read.get((phase, step.nbytes, name), ()):
                first = leader[j]
                group = members[first]
                if i in group or i - first > FUSION_WINDOW or depends(i, first, group):
                    continue
                leader[i] = first
                group.append(i)
                break
            if i in leader:
                break
        if i not in leader:
            leader[i], members[i] = i, [i]
        for name in shared:
            by_read.setdefault((phase, step.nbytes, name), []).append(i)
    groups = [g for g in members.values() if len(g) > 1]
    if not groups:
        return steps
    # each group runs at its last member; what reads an earlier member (directly or not) waits for
    # it, everything else keeps its place
    group_of = {m: g for g in groups for m in g}
    blocked: set[int] = set()
    waiting: list[int] = []
    order: list[int] = []

    def run(i: int) -> None:
        members_ = group_of.get(i)
        if members_ is None:
            order.append(i)
            return
        order.extend(members_)
        blocked.difference_update(members_)

    for i in range(len(steps)):
        members_ = group_of.get(i)
        if (members_ is not None and i != members_[-1]) or not blocked.isdisjoint(deps[i]):
            blocked.add(i)
            waiting.append(i)
            continue
        run(i)
        while True:  # release what waited on this kernel, in order
            w = next((w for w in waiting if w in blocked and blocked.isdisjoint(deps[w])
                      and (group_of.get(w) is None or w == group_of[w][-1])), None)
            if w is None:
                break
            blocked.discard(w)
            waiting.remove(w)
            run(w)
    if len(order) != len(steps) or waiting and any(w in blocked for w in waiting):
        return steps  # a group that cannot run as one kernel: keep the schedule as it was
    return [steps[i] for i in order]


def _write_in_place(steps: list[Step], pinned: set[str]) -> list[Step]:
    """A scatter (index_put, scatter_add, ...) writes into a copy of its first input; Inductor
    writes that copy into the input's own buffer when the input dies there (``inplace_buffers``)
    and is of the output's size (within 5 %, its ``can_match_buffer_size``). The step then
    allocates nothing: the buffer lives on as its value (``Step.storage``). Buffers the caller
    keeps (``pinned``) and graph inputs never die there. Measured on an H100: a 1-layer Llama's
    embedding gradient accumulates into its fp32 zeros buffer, and counting a second one put the
    planned peak 0.3 GiB over the measured. Pointwise kernels are left as they are: Inductor
    writes some of them into a dying input, but modelling that for all of them put the planned
    peak 4 % under the measured at 8K tokens (the rule is narrower than size and last use)."""
    storage_of, size, last_use = _storages(steps)
    kept = {storage_of.get(key, key) for key in pinned}
    moved: dict[str, str] = {}  # a scatter's own storage -> the buffer it writes into

    result = []
    for index, step in enumerate(steps):
        if step.kind == "scatter" and step.nbytes and step.storage == step.key and step.inputs:
            storage = storage_of.get(step.inputs[0])
            while storage in moved:
                storage = moved[storage]
            if (storage is not None and storage not in kept and last_use.get(storage) == index
                    and 0.95 * size.get(storage, 0) <= step.nbytes <= size.get(storage, 0)):
                moved[step.key] = storage
                last_use[storage] = last_use.get(step.key, index)
                step = Step(step.key, step.nbytes, storage, step.inputs, step.outputs, step.workspace,
                            step.kind, step.seconds, step.value_bytes)
        result.append(step)
    return result


def _final_readers(steps: list[Step], readers: dict[str, list[int]], key: str, pinned) -> list[int] | None:
    """The steps that read ``key``'s value other than its views, through views; None when a view
    of it is kept."""
    found, stack, seen = [], [key], set()
    while stack:
        for j in readers.get(stack.pop(), ()):
            reader = steps[j]
            if reader.storage == key and reader.nbytes == 0 and not reader.outputs:
                if reader.key in pinned:
                    return None
                if reader.key not in seen:
                    seen.add(reader.key)
                    stack.append(reader.key)
            elif j not in found:
                found.append(j)
    return found


def output_nodes(gm: fx.GraphModule) -> list:
    """The flat list of what ``gm`` returns (nodes, or constants / None)."""
    output = next(iter(gm.graph.find_nodes(op="output")))
    return list(pytree.tree_leaves(output.args[0]))


def _graph_steps(gm: fx.GraphModule, prefix: str, key_of: dict[str, str],
                 seconds: dict[str, float | None] | None = None) -> list[Step]:
    """Steps of the call_function nodes of ``gm``; ``key_of`` maps node names to schedule keys
    (placeholders are looked up there and are free when absent). ``seconds``: per node name the
    ``Step.seconds`` (absent or None: priced from its bytes); views take none."""
    seconds = seconds or {}
    steps = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        key = f"{prefix}{node.name}"
        key_of[node.name] = key
        inputs = tuple(key_of.get(i.name, f"in:{i.name}") for i in node.all_input_nodes)
        value = node.meta.get("val")
        size = tensor_nbytes(value)
        parent = tuple_parent(node)
        base = aliased_input(node)
        if base is not None and inputs and not is_view(node):  # an output of split, unbind, ...
            steps.append(Step(key, 0, key_of.get(base.name, f"in:{base.name}"), inputs, seconds=0.0,
                              value_bytes=size))
        elif isinstance(value, (tuple, list)) and is_view(node):
            steps.append(Step(key, 0, inputs[0], inputs, seconds=0.0) if inputs
                         else Step(key, 0, key, (), seconds=0.0))
        elif isinstance(value, (tuple, list)):
            steps.append(Step(key, 0, key, inputs, tuple(tensor_nbytes(v) for v in value),
                              workspace_bytes(node), seconds=seconds.get(node.name)))
        elif parent is not None and parent.name in key_of:
            steps.append(Step(key, 0, f"{key_of[parent.name]}#{node.args[1]}", inputs, seconds=0.0,
                              value_bytes=size))
        elif is_view(node) and inputs:
            steps.append(Step(key, 0, inputs[0], inputs, seconds=0.0, value_bytes=size))
        else:
            steps.append(Step(key, size, key, inputs, workspace=workspace_bytes(node),
                              kind=fusion_kind(node), seconds=seconds.get(node.name), value_bytes=size))
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


def storage_root(node: fx.Node) -> fx.Node:
    """The node that allocated ``node``'s memory (through views and the outputs of split-like ops;
    a getitem of any other op picks a tensor it allocated)."""
    while (base := aliased_input(node)) is not None:
        node = base
    return node


def tuple_parent(node: fx.Node) -> fx.Node | None:
    """The multi-output node ``node`` takes an element of (``operator.getitem``), or None."""
    if node.target is not operator.getitem or not isinstance(node.args[1], int):
        return None
    parent = node.args[0]
    if isinstance(parent, fx.Node) and isinstance(parent.meta.get("val"), (tuple, list)):
        return parent
    return None


def graph_schedule(gm: fx.GraphModule, seconds: dict[str, float | None] | None = None):
    """One graph as a schedule: (steps of its call_function nodes keyed by node name, the keys its
    outputs hold, its placeholders' bytes keyed "in:<name>"). ``seconds``: see ``_graph_steps``."""
    key_of: dict[str, str] = {}
    preloaded = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        key_of[node.name] = f"in:{node.name}"
        preloaded[f"in:{node.name}"] = tensor_nbytes(node.meta.get("val"))
    steps = _graph_steps(gm, "", key_of, seconds)
    pinned = {key_of[n.name] for n in output_nodes(gm) if isinstance(n, fx.Node) and n.name in key_of}
    return steps, pinned, preloaded


def graph_timeline(gm: fx.GraphModule, hold_inputs: bool | Iterable[str] = False,
                   fuse_pointwise: bool = False) -> tuple[list[fx.Node], Timeline]:
    """Bytes live after each call_function node of one graph (the nodes, and the timeline).

    Its placeholders exist from the start and are freed at their last use, but those the caller
    holds anyway: every one with ``hold_inputs=True`` (the caller keeps the argument list), or the
    placeholders named in ``hold_inputs`` (parameters, which the module holds); what it returns
    lives to the end.
    ``fuse_pointwise``: as Inductor runs the graph (``inline_pointwise``); the bytes are still
    listed in the graph's node order, each node's the bytes after the kernel that computes it."""
    steps, pinned, preloaded = graph_schedule(gm)
    if hold_inputs is True:
        pinned |= set(preloaded)
    elif hold_inputs:
        pinned |= {f"in:{name}" for name in hold_inputs} & set(preloaded)
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    if not fuse_pointwise:
        return nodes, simulate(steps, pinned, preloaded)
    timeline = simulate(inline_pointwise(steps, pinned), pinned, preloaded)
    after = dict(zip(timeline.labels, timeline.live_bytes))
    return nodes, Timeline([n.name for n in nodes], [after[n.name] for n in nodes], len(nodes))


def partitioned_timeline(fw_gm: fx.GraphModule, bw_gm: fx.GraphModule, num_fwd_outputs: int,
                         hold_backward_inputs: bool = False, fuse_pointwise: bool = False) -> Timeline:
    """Bytes live over forward then backward of a partitioned graph pair.

    Graph inputs (parameters, user inputs) are not counted. Saved tensors live from their
    production in forward to their last use in backward (to the end of backward with
    ``hold_backward_inputs``, where the runtime holds the backward's argument list); the forward's
    own outputs (held by the caller) and the gradients (returned) live to the end. Tangents appear
    when backward starts. ``fuse_pointwise``: as Inductor runs them (``inline_pointwise``)."""
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
    if fuse_pointwise:
        steps = inline_pointwise(steps, pinned, boundary)
    return simulate(steps, pinned, boundary=boundary)
