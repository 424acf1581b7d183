"""The run-time side of attention selection: the selection each compiled graph reads, the scores it
writes, the strategies that turn scores into the next selection, and the per-step log.

A graph rewritten by ``passes/attention_selection`` calls two ops, which read and write three
buffers the pass registers here under the graph's name::

    idx = graphopt::select_samples(noise, graph, row, offset, capacity)
        = sort(topk(priority[row] + 1e-3 * noise, capacity).indices)      selected[offset:] = idx
    h2  = graphopt::add_selected(h, idx, y, reference, graph, offset)
        = index_add(h, 0, idx, y)                 scores[offset:] = |y_i| / |reference[idx_i]|

    priority [R, B] float32   host -> graph: module row's samples with priority 1 run; all 0: the
                              graph's own random draw (``noise`` is torch.rand in the graph)
    selected [N] int64        graph -> host: the local sample indices each module ran on
    scores   [N] float32      graph -> host: |attention output| / |residual| of each of them

``add_selected`` with no ``idx`` is ``h + y`` (a module that runs on every sample, scores recorded).
Both ops are graphopt:: ops, so no planner recomputes them; the selection's random draw is a
random op, never recomputed either, so the backward uses the forward's samples.

A training loop drives it through the process's :func:`selector`::

    sel = graphopt.ops.attention_selection.selector()
    for step, (ids, batch) in enumerate(loader):         # ids: the global batch's sample ids
        plan = sel.plan_step(ids)                         # optional for 'random' and 'layer'
        mine = plan.local_positions if plan else range(len(ids))
        loss = model(batch[mine]); loss.backward(); opt.step()
        sel.end_step()                                    # scores in, log out (a collective with DP)

Strategies (``attention_selection_strategy``, fixed when the graph compiles):
- ``random``: without ``plan_step`` the graph draws a fresh random choice every step; with it, the
  host draws one from (seed, step), the same on every rank.
- ``score``: a module runs samples drawn without replacement with probability proportional to the
  relative norm each had there when last measured (this module's mean before it ever was;
  Gumbel top-k): the samples whose attention moved them most run most often, and every sample
  keeps being measured. Scores are kept per sample id, so ``plan_step`` needs the ids.
- ``layer``: capacities fixed per module (``attention_selection_layer_fractions``, e.g. from
  :meth:`Selector.layer_fractions` after warm-up steps under any strategy); random within a module.

Keep the batch size fixed (``drop_last=True``): capacities are compiled for one batch size, and a
batch of another size makes Dynamo compile a dynamic-batch graph, which the pass leaves whole.
Evaluate under ``torch.no_grad()``: a graph compiled with grad is a training graph and selects.

With data parallelism ``plan_step`` takes the global batch's ids, assigns samples to ranks with the
hierarchical multiple-knapsack of ``analysis.attention_work.plan_step`` (every rank computes the
same plan from the same inputs) and ``end_step`` all-gathers the scores so every rank keeps the same
memory. Both are then collectives in effect: every rank calls them every step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
from typing import Any, Hashable, Optional, Sequence

import torch
import torch.distributed as dist

from graphopt.analysis import attention_work

log = logging.getLogger("graphopt.attention_selection")

RANDOM_TIEBREAK = 1e-3  # in-graph: priority + this x rand; a host priority of 1 always wins


@dataclasses.dataclass(frozen=True)
class SelectedModule:
    """One attention module of a compiled graph and where its selection lives in the buffers."""

    name: str                         # the module as Dynamo names it
    capacity: int                     # samples it runs on (0: removed, batch: all)
    batch: int
    priority_row: Optional[int]       # its row of ``priority`` (0 < capacity < batch)
    record_offset: Optional[int]      # its slice of ``selected`` / ``scores`` (capacity > 0)
    flops_per_sample: float           # forward + backward
    seconds_per_sample: float         # modelled, forward + backward
    reference: str                    # the scores' denominator: "residual" or "input"


@dataclasses.dataclass
class GraphSelection:
    """The selection state of one compiled graph."""

    graph_id: str
    strategy: str
    seed: int
    modules: tuple[SelectedModule, ...]
    priority: torch.Tensor
    selected: torch.Tensor
    scores: torch.Tensor
    log_dir: Optional[str] = None

    @property
    def partial(self) -> tuple[SelectedModule, ...]:
        return tuple(m for m in self.modules if m.priority_row is not None)

    def read(self) -> dict[str, tuple[list[int], list[float]]]:
        """Module name -> (local samples it ran on, their scores) of the last step run."""
        selected, scores = self.selected.cpu().tolist(), self.scores.cpu().tolist()
        out = {}
        for module in self.modules:
            if module.record_offset is None:
                continue
            span = slice(module.record_offset, module.record_offset + module.capacity)
            samples = selected[span] if module.priority_row is not None else list(range(module.batch))
            out[module.name] = (samples, scores[span])
        return out


@dataclasses.dataclass(frozen=True)
class RankPlan:
    """What ``plan_step`` decided for this rank (with the whole group's plan)."""

    step: int
    rank: int
    local_positions: tuple[int, ...]           # positions in the global batch this rank takes
    local_ids: tuple[Hashable, ...]            # their sample ids
    chosen: dict[str, tuple[int, ...]]         # module -> local indices that run
    plan: attention_work.StepPlan


class Selector:
    """The process's selection driver for every graph compiled with attention selection."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget graphs, scores and the step count (a new training run)."""
        self.graphs: list[GraphSelection] = []
        self.step = 0
        self.memory: dict[str, dict[Hashable, float]] = {}   # module -> sample id -> last score
        self.totals: dict[str, tuple[float, int]] = {}       # module -> (sum of scores, count)
        self.current: Optional[RankPlan] = None
        self.history: list[dict[str, Any]] = []

    # --- graphs -------------------------------------------------------------------------------

    def register(self, graph: GraphSelection) -> None:
        """Drive ``graph`` from now on; a graph compiled earlier for the same modules (a
        recompile) is dropped."""
        names = {m.name for m in graph.modules}
        self.graphs = [g for g in self.graphs if not names & {m.name for m in g.modules}]
        self.graphs.append(graph)
        if graph.strategy == "score":
            log.warning("[%s] attention selection 'score' ranks samples by the scores kept per "
                        "sample id: call graphopt.ops.attention_selection.selector().plan_step("
                        "sample_ids) before each step and end_step() after it; a step without "
                        "plan_step runs a random selection", graph.graph_id)

    def modules(self) -> list[SelectedModule]:
        return [m for graph in self.graphs for m in graph.modules]

    # --- before a step ------------------------------------------------------------------------

    def plan_step(self, sample_ids: Sequence[Hashable], *, group: Any = None,
                  gpus_per_node: Optional[int] = None) -> Optional[RankPlan]:
        """Choose this step's selection for the global batch ``sample_ids`` (ranks x batch ids,
        rank-major) and write it into every graph's priority buffer. Returns this rank's share, or
        None before any graph has compiled (the first step then runs the graph's own random
        choice on the batch as given)."""
        if not self.graphs:
            return None
        ranks, rank = _group_size_rank(group)
        per_node = gpus_per_node or _gpus_per_node(ranks)
        modules = self.modules()
        batch = modules[0].batch
        if any(m.batch != batch for m in modules):
            raise ValueError("attention selection: the compiled graphs' modules see different batch "
                             f"sizes ({sorted({m.batch for m in modules})}); plan_step plans one batch")
        sample_ids = list(sample_ids)
        if len(sample_ids) != ranks * batch:
            raise ValueError(f"plan_step got {len(sample_ids)} sample ids; the global batch is "
                             f"{ranks} ranks x {batch} samples = {ranks * batch} (pass every rank's "
                             "ids, rank-major, on every rank)")
        if len(set(sample_ids)) != len(sample_ids):
            raise ValueError("plan_step: sample ids repeat within the batch; give each sample of "
                             "the global batch its own id (e.g. its dataset index)")
        plan = attention_work.plan_step(
            self.priorities(sample_ids), [m.capacity for m in modules],
            batch, ranks, per_node, [m.seconds_per_sample for m in modules])
        positions = plan.rank_samples[rank]
        chosen = {m.name: plan.chosen[rank][k] for k, m in enumerate(modules)}
        self.choose(chosen)
        self.current = RankPlan(self.step, rank, positions, tuple(sample_ids[i] for i in positions),
                                chosen, plan)
        return self.current

    def choose(self, chosen: dict[str, Sequence[int]]) -> None:
        """Run exactly these local samples in these modules from the next step on (module name ->
        sample indices, as many as its capacity); every other module draws its own at random."""
        known = {m.name: m for m in self.modules()}
        unknown = sorted(set(chosen) - set(known))
        if unknown:
            raise KeyError(f"no selected attention module named {unknown}; the modules are "
                           f"{sorted(known)}")
        for name, picked in chosen.items():
            module, picked = known[name], list(picked)
            if len(picked) != module.capacity or len(set(picked)) != len(picked) or \
                    not all(0 <= i < module.batch for i in picked):
                raise ValueError(f"{module.name} runs on {module.capacity} distinct samples of "
                                 f"{module.batch}; got {picked}")
        for graph in self.graphs:
            rows = torch.zeros(tuple(graph.priority.shape), dtype=torch.float32)
            for module in graph.partial:
                rows[module.priority_row, list(chosen.get(module.name, ()))] = 1.0
            graph.priority.copy_(rows)

    def priorities(self, sample_ids: Sequence[Hashable]) -> list[list[float]]:
        """Every module's priority for each of ``sample_ids`` this step (the strategy's), the same
        on every rank."""
        return [self._priorities(m, list(sample_ids)) for m in self.modules()]

    def _priorities(self, module: SelectedModule, sample_ids: list[Hashable]) -> list[float]:
        """Module's priority for each sample of the global batch, the same on every rank."""
        strategy = self._strategy_of(module)
        noise = random.Random(f"{self._seed_of(module)}/{self.step}/{module.name}")
        draws = [noise.random() for _ in sample_ids]
        if strategy != "score":
            return draws
        memory = self.memory.get(module.name, {})
        total, count = self.totals.get(module.name, (0.0, 0))
        fallback = total / count if count else 1.0
        # Gumbel top-k: the top of log(score) + Gumbel noise are drawn without replacement with
        # probability proportional to the score, so every sample keeps being measured
        return [math.log(max(memory.get(sid, fallback), 1e-30)) - math.log(-math.log(max(u, 1e-300)))
                for sid, u in zip(sample_ids, draws)]

    def _graph_of(self, module: SelectedModule) -> GraphSelection:
        return next(g for g in self.graphs if any(m is module for m in g.modules))

    def _strategy_of(self, module: SelectedModule) -> str:
        return self._graph_of(module).strategy

    def _seed_of(self, module: SelectedModule) -> int:
        return self._graph_of(module).seed

    # --- after a step -------------------------------------------------------------------------

    def end_step(self, *, group: Any = None) -> dict[str, Any]:
        """Read what every graph ran and measured, share it with the group, update the scores,
        log the step and count it. Returns the step's record (also in the per-step log)."""
        ranks, rank = _group_size_rank(group)
        plan = self.current if self.current is not None and self.current.step == self.step else None
        measured: dict[str, list[tuple[Optional[Hashable], int, float]]] = {}
        for graph in self.graphs:
            for name, (samples, scores) in graph.read().items():
                ids = [plan.local_ids[i] if plan else None for i in samples]
                measured[name] = list(zip(ids, samples, scores))
        everyone = [measured]
        if ranks > 1:
            everyone = [None] * ranks
            dist.all_gather_object(everyone, measured, group=group)
        for shares in everyone:
            for name, cells in shares.items():
                memory = self.memory.setdefault(name, {})
                total, count = self.totals.get(name, (0.0, 0))
                for sample_id, _, score in cells:
                    if math.isfinite(score):
                        total, count = total + score, count + 1
                        if sample_id is not None:
                            memory[sample_id] = score
                self.totals[name] = (total, count)
        record = self._record(measured, plan, rank)
        self.history.append(record)
        self._log(record)
        self.step += 1
        return record

    def _record(self, measured, plan: Optional[RankPlan], rank: int) -> dict[str, Any]:
        record: dict[str, Any] = {"step": self.step, "rank": rank, "planned": plan is not None,
                                  "modules": {}}
        for name, cells in measured.items():
            scores = [score for _, _, score in cells]
            record["modules"][name] = {
                "selected": [local for _, local, _ in cells],
                "sample_ids": [sid for sid, _, _ in cells] if plan else None,
                "scores": [round(s, 6) for s in scores],
                "score_mean": round(math.fsum(scores) / len(scores), 6) if scores else None,
            }
        if plan is not None:
            record["work_max_over_mean_before"] = round(plan.plan.imbalance_before, 4)
            record["work_max_over_mean_after"] = round(plan.plan.imbalance_after, 4)
            record["cells_moved_by_capacity"] = plan.plan.moved
        return record

    def _log(self, record: dict[str, Any]) -> None:
        if log.isEnabledFor(logging.INFO):
            parts = [f"{_short(name)}: "
                     f"{len(info['selected'])} run, score {info['score_mean']}"
                     for name, info in record["modules"].items()]
            balance = (f"; work max/mean {record['work_max_over_mean_before']} -> "
                       f"{record['work_max_over_mean_after']}" if record["planned"] else "")
            log.info("attention selection step %d: %s%s", record["step"], "; ".join(parts), balance)
        for graph in self.graphs:
            if not graph.log_dir:
                continue
            names = {m.name for m in graph.modules}
            own = {**record, "modules": {k: v for k, v in record["modules"].items() if k in names}}
            os.makedirs(graph.log_dir, exist_ok=True)
            with open(os.path.join(graph.log_dir, "attention_selection_steps.jsonl"), "a") as handle:
                handle.write(json.dumps(own) + "\n")

    # --- warm-up -> fixed per-module capacities ----------------------------------------------------

    def importance(self) -> dict[str, float]:
        """Module -> mean relative norm measured so far (the warm-up's importance)."""
        return {name: total / count for name, (total, count) in self.totals.items() if count}

    def layer_fractions(self, kept_fraction: float, graph: int = 0) -> tuple[float, ...]:
        """Per-module kept fractions for ``attention_selection_layer_fractions`` (graph order of
        compiled graph ``graph``), proportional to the measured importance, averaging
        ``kept_fraction``. Recompile with them to start the 'layer' strategy."""
        if not self.graphs:
            raise RuntimeError("no graph compiled with attention selection yet: run warm-up steps "
                               "first, then ask for the layer fractions")
        importance = self.importance()
        modules = self.graphs[graph].modules
        missing = [m.name for m in modules if m.name not in importance]
        if missing:
            raise RuntimeError(f"no scores measured yet for {missing}: call end_step() after each "
                               "warm-up step (and keep them above capacity 0) before asking")
        return attention_work.layer_fractions([importance[m.name] for m in modules],
                                              kept_fraction, modules[0].batch)


def _short(name: str) -> str:
    """'layers.0.self_attn' of "L['self'].model.layers[0].self_attn" (for the log line)."""
    cleaned = name.replace("[", ".").replace("]", "").replace("'", "")
    return ".".join(cleaned.split(".")[-3:])


def _group_size_rank(group: Any) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group), dist.get_rank(group)
    return 1, 0


def _gpus_per_node(ranks: int) -> int:
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    if local <= 0 and torch.cuda.is_available():
        local = torch.cuda.device_count()
    local = local if local > 0 else ranks
    return math.gcd(ranks, local) or 1



# --- the graph's ops --------------------------------------------------------------------------------

_GRAPHS: dict[str, GraphSelection] = {}


def _graph(name: str) -> GraphSelection:
    graph = _GRAPHS.get(name)
    if graph is None:
        raise RuntimeError(f"attention selection: graph {name!r} is not registered in this process "
                           "(a compiled graph from another process' cache?); clear the compile "
                           "caches or compile again")
    return graph


@torch.library.custom_op("graphopt::select_samples", mutates_args=())
def select_samples(noise: torch.Tensor, graph: str, row: int, offset: int,
                   capacity: int) -> torch.Tensor:
    """The ``capacity`` samples of highest priority (ties broken by ``noise``), ascending."""
    state = _graph(graph)
    priority = state.priority[row].to(noise.device) + RANDOM_TIEBREAK * noise
    idx = torch.sort(torch.topk(priority, capacity, sorted=False).indices).values
    state.selected[offset:offset + capacity].copy_(idx)
    return idx


@select_samples.register_fake
def _(noise, graph, row, offset, capacity):
    return noise.new_empty((capacity,), dtype=torch.int64)


def _relative_norms(y: torch.Tensor, reference: torch.Tensor,
                    idx: Optional[torch.Tensor]) -> torch.Tensor:
    # norms in float32 at least: half-precision sums of squares overflow; vector_norm refuses a
    # dtype narrower than its input's (a float64 model, found by the fuzzer)
    dtype = torch.promote_types(y.dtype, torch.float32)
    ref = torch.linalg.vector_norm(reference, 2, tuple(range(1, reference.dim())), dtype=dtype)
    if idx is not None:
        ref = ref.index_select(0, idx)
    return torch.linalg.vector_norm(y, 2, tuple(range(1, y.dim())), dtype=dtype) / ref.clamp_min(1e-30)


@torch.library.custom_op("graphopt::add_selected", mutates_args=())
def add_selected(base: torch.Tensor, idx: Optional[torch.Tensor], y: torch.Tensor,
                 reference: torch.Tensor, graph: str, offset: int) -> torch.Tensor:
    """``base`` with ``y`` added at rows ``idx`` (all rows without idx); records each added
    sample's |y| / |reference| for the host."""
    out = base + y if idx is None else base.index_add(0, idx, y)
    ratio = _relative_norms(y.detach(), reference.detach(), idx)
    _graph(graph).scores[offset:offset + ratio.shape[0]].copy_(ratio)
    return out


@add_selected.register_fake
def _(base, idx, y, reference, graph, offset):
    return torch.empty_like(base)


def _add_selected_setup(ctx, inputs, output) -> None:
    base, idx, y, reference, graph, offset = inputs
    ctx.save_for_backward(idx)
    ctx.whole = idx is None


def _add_selected_backward(ctx, grad):
    (idx,) = ctx.saved_tensors
    grad_y = grad if ctx.whole else grad.index_select(0, idx)
    return grad, None, grad_y, None, None, None


add_selected.register_autograd(_add_selected_backward, setup_context=_add_selected_setup)

_SELECTOR = Selector()


def selector() -> Selector:
    """The process's selection driver."""
    return _SELECTOR


def register_graph(graph: GraphSelection) -> None:
    """Called by the pass when a graph compiles with attention selection."""
    _GRAPHS[graph.graph_id] = graph
    _SELECTOR.register(graph)
