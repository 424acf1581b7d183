"""Which activations to save, recompute or offload so that the peak stays under a byte budget.

Two stages, both deterministic (every loop walks the joint graph's order; no timing is measured):

1. ``min_cut_saved``: the runtime-optimal saved set when only cheap ops (views, pointwise ops,
   reductions that do not shrink what they read 4x or more) may be recomputed -- a minimum s-t
   cut in networkx over the forward nodes (capacity = bytes), with expensive and non-recomputable
   nodes tied to the source and every node the backward reads tied to the sink. This is the plan
   a budget of 1.0 gives.
2. ``plan_under_budget``: each allocation the saved tensors of that plan hold is a candidate
   with options (keep, recompute from the nearest saved tensors, offload a fraction to host) --
   a saved view is priced by its base's bytes, and saved tensors sharing an allocation are
   decided together, since only dropping all of them frees it. An exact
   multiple-choice knapsack DP over bytes freed (bucketed) gives, for every reduction level, the
   cheapest set of options under an additive model. Every member of that budget-independent
   family is then scored with the liveness simulation of the real schedule (forward, then backward
   with recomputation inserted just before first use) and the cheapest member whose simulated
   peak fits the budget wins. Because the family does not depend on the budget, a larger budget
   chooses from a superset and never pays more recompute time. With offload options the family
   also holds the DP's choices over each kind of option alone (see ``plan_under_budget``).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterable

import networkx as nx

from graphopt.analysis.liveness import Step, Timeline, inline_pointwise, simulate

log = logging.getLogger("graphopt.analysis.remat_solver")

INFINITE = float("inf")


@dataclasses.dataclass
class JointGraph:
    """The joint forward+backward graph as the solver sees it (no torch objects).

    ``order`` holds every node but the output, in the joint graph's order. ``role`` is "primal"
    (forward input, always available, free to save), "tangent", "fw" (the forward outputs need
    it, or only the backward reads it but it reads forward values alone and can be replayed
    freely, so it may run in either pass -- the cut decides) or "bw" (everything else: what a
    tangent feeds, and collectives, random ops or effects only the backward reads, with what
    reads them). ``view_of`` names the input a view aliases."""

    order: list[str]
    inputs: dict[str, tuple[str, ...]]
    role: dict[str, str]
    nbytes: dict[str, int]          # bytes the node allocates (0 for views and tuples)
    logical_bytes: dict[str, int]   # bytes of the node's value, views included
    view_of: dict[str, str]
    time_s: dict[str, float]        # time of the node: measured (op_timing) or its roofline
    recomputable: dict[str, bool]   # False: collectives, attention, random, effects, MUST_SAVE
    cheap: set[str]                 # recomputed freely by the min-cut (views, pointwise)
    must_recompute: set[str]        # MUST_RECOMPUTE tags: never saved
    symbolic: set[str]              # SymInt values: saved, never counted
    tuples: set[str]                # multi-output nodes: never saved whole (their getitems are)
    fw_outputs: list[str]
    bw_outputs: list[str]
    shapes: dict[str, tuple] = dataclasses.field(default_factory=dict)   # tensors only
    dtypes: dict[str, object] = dataclasses.field(default_factory=dict)  # tensors only
    # The runtime keeps the backward's inputs (saved tensors, tangents) until the backward returns
    # (eager codegen's boxed call holds its argument list); Inductor frees each at its last use.
    hold_backward_inputs: bool = False
    tuple_outputs: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)  # bytes per output
    getitem_of: dict[str, tuple[str, int]] = dataclasses.field(default_factory=dict)  # -> (tuple, index)
    workspace: dict[str, int] = dataclasses.field(default_factory=dict)  # kernel scratch bytes while it runs
    # Inductor runs the graphs: they are simulated as its kernels (liveness.inline_pointwise);
    # ``kind`` holds liveness.fusion_kind per node.
    fuse_pointwise: bool = False
    kind: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.position = {name: i for i, name in enumerate(self.order)}
        self.tangent_dependent: set[str] = set()
        for name in self.order:
            if self.role[name] == "tangent" or any(i in self.tangent_dependent for i in self.inputs[name]):
                self.tangent_dependent.add(name)
        self.users: dict[str, list[str]] = {name: [] for name in self.order}
        for name in self.order:
            for source in self.inputs[name]:
                self.users[source].append(name)

    def forward_run(self, saved: Iterable[str]) -> list[str]:
        """The forward nodes the forward graph runs with this saved set: what its outputs and the
        saved values need (the extraction leaves out the rest -- a value only the backward reads,
        not saved, is recomputed there)."""
        seeds = [n for n in self.fw_outputs if n in self.role]
        seeds += [n for n in saved if n in self.role and self.role[n] == "fw"]
        seeds += [n for n in self.order if self.role[n] == "fw" and not self.users[n]]
        needed, stack = set(), seeds
        while stack:
            name = stack.pop()
            if name in needed or self.role.get(name) != "fw":
                continue
            needed.add(name)
            stack.extend(self.inputs[name])
        return [n for n in self.order if n in needed]

    def is_forward(self, name: str) -> bool:
        return self.role[name] in ("fw", "primal")

    def bw_needed(self) -> list[str]:
        """Forward nodes the backward reads (or returns), in order."""
        needed = {i for n in self.order if self.role[n] == "bw" for i in self.inputs[n]
                  if self.is_forward(i)}
        needed |= {o for o in self.bw_outputs if self.is_forward(o)}
        return [n for n in self.order if n in needed]

    def storage_root(self, name: str) -> str:
        """The node whose allocation ``name``'s value lives in (``name`` itself unless a view)."""
        while name in self.view_of:
            name = self.view_of[name]
        return name

    def storage_nbytes(self, name: str) -> int:
        """Bytes of the allocation ``name`` lives in; 0 for graph inputs, which are never freed."""
        root = self.storage_root(name)
        return 0 if self.role[root] == "primal" else self.nbytes[root]

    def freeable_groups(self, saved: Iterable[str]) -> dict[str, list[str]]:
        """Saved forward tensors by the allocation they hold (its root node), for allocations that
        dropping every member frees: not graph inputs, not held by a forward output. A saved view
        frees its base's bytes; several saved tensors in one allocation free them only together."""
        held = {self.storage_root(n) for n in self.fw_outputs if n in self.role}
        groups: dict[str, list[str]] = {}
        for name in saved:
            if self.role[name] != "fw" or name in self.symbolic:
                continue
            root = self.storage_root(name)
            if self.role[root] != "primal" and root not in held:
                groups.setdefault(root, []).append(name)
        return groups

    def saved_storage_bytes(self, saved: Iterable[str]) -> int:
        """Device bytes a saved set holds: each forward allocation once, views through their base."""
        roots = {self.storage_root(n) for n in saved if self.role[n] == "fw" and n not in self.symbolic}
        return sum(self.nbytes[r] for r in roots if self.role[r] != "primal")


@dataclasses.dataclass(frozen=True)
class Option:
    """One way to treat a saved tensor: keep it, recompute it, or offload a fraction ``alpha``."""

    kind: str            # "keep", "recompute" or "offload"
    bytes_freed: int     # device bytes freed at the forward/backward boundary (additive estimate)
    cost_s: float        # recompute time, or exposed transfer time
    alpha: float = 0.0
    host_bytes: int = 0


KEEP = Option("keep", 0, 0.0)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """Saved tensors that share one allocation, decided together (a view frees its base only
    with every other saved tensor in that base). ``name`` is the first member; ``nbytes`` the
    allocation's bytes."""

    name: str
    nbytes: int
    options: tuple[Option, ...]  # options[0] is always KEEP
    members: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return self.members or (self.name,)


@dataclasses.dataclass
class Plan:
    saved: list[str]                 # forward nodes the backward receives, forward order
    recomputed: list[str]            # forward nodes recomputed in backward, forward order
    offloaded: dict[str, float]      # saved node -> fraction offloaded to host (every group member)
    timeline: Timeline
    recompute_time_s: float          # all recomputation in backward (cheap min-cut part included)
    exposed_offload_s: float
    budget: int
    feasible: bool
    choices: dict[str, Option] = dataclasses.field(default_factory=dict)

    @property
    def peak(self) -> int:
        return self.timeline.peak

    @property
    def cost_s(self) -> float:
        return self.recompute_time_s + self.exposed_offload_s


# --- stage 1: min-cut -----------------------------------------------------------------------------

def min_cut_saved(graph: JointGraph) -> list[str]:
    """The minimal-bytes saved set when only ``graph.cheap`` nodes may be recomputed."""
    needed = set(graph.bw_needed())
    flow = nx.DiGraph()
    flow.add_node("source")
    flow.add_node("sink")
    for name in graph.order:
        if not graph.is_forward(name):
            continue
        if name in graph.symbolic:
            continue
        capacity = 0 if graph.role[name] == "primal" else graph.logical_bytes[name]
        if name in graph.must_recompute or name in graph.tuples:
            capacity = INFINITE
        flow.add_edge(f"{name}_in", f"{name}_out", capacity=capacity)
        recompute_allowed = graph.role[name] == "primal" or (
            graph.recomputable[name] and (name in graph.cheap or name in graph.must_recompute))
        if not recompute_allowed:
            flow.add_edge("source", f"{name}_in", capacity=INFINITE)
        if graph.role[name] == "primal":
            flow.add_edge("source", f"{name}_in", capacity=INFINITE)
        for source in graph.inputs[name]:
            if graph.is_forward(source) and source not in graph.symbolic:
                flow.add_edge(f"{source}_out", f"{name}_in", capacity=INFINITE)
        if name in needed:
            flow.add_edge(f"{name}_out", "sink", capacity=INFINITE)
    if not needed:
        return []
    try:
        _, (reachable, _) = nx.minimum_cut(flow, "source", "sink")
    except nx.NetworkXUnbounded:
        raise RuntimeError(
            "the rematerialization min-cut found no finite cut: a value the backward needs is "
            "tagged MUST_RECOMPUTE but depends on a value that cannot be recomputed; remove that "
            "tag or mark the value MUST_SAVE") from None
    saved = [n for n in graph.order if f"{n}_in" in reachable and f"{n}_out" not in reachable
             and f"{n}_in" in flow]
    return saved + [n for n in graph.order if n in graph.symbolic and n in needed]


# --- the schedule a plan implies ------------------------------------------------------------------

def recompute_closure(graph: JointGraph, saved: Iterable[str]) -> tuple[list[str], list[str]]:
    """(saved, recomputed) once every forward value the backward reads is available.

    A value the backward needs that is not saved is recomputed from its inputs, recursively; a
    primal or a value that cannot be recomputed on that path is saved instead."""
    saved_set = set(saved)
    recomputed: set[str] = set()
    stack = list(reversed(graph.bw_needed()))
    while stack:
        name = stack.pop()
        if name in saved_set or name in recomputed:
            continue
        if name in graph.tuples and graph.recomputable[name]:
            recomputed.add(name)
            stack.extend(i for i in graph.inputs[name] if graph.is_forward(i))
            continue
        if name in graph.tuples:
            raise RuntimeError(
                f"the backward reads multi-output node {name} whole, and it cannot be recomputed; "
                "graphopt's planner saves only single tensors. Report this graph (dump_dir) to graphopt")
        if (graph.role[name] == "primal" or name in graph.symbolic
                or not graph.recomputable[name]):
            saved_set.add(name)
            continue
        recomputed.add(name)
        stack.extend(i for i in graph.inputs[name] if graph.is_forward(i))
    order = graph.order
    return [n for n in order if n in saved_set], [n for n in order if n in recomputed]


def backward_order(graph: JointGraph, recomputed: Iterable[str]) -> list[str]:
    """The backward as the autograd engine would run it: the nodes that read a gradient
    (tangent) in order, every other node -- recomputed forward values, and backward values that
    depend only on forward ones -- placed just before its first reader."""
    recomputed = set(recomputed)
    emitted: set[str] = set()
    schedule: list[str] = []

    def emit(root: str) -> None:
        pending, stack = set(), [root]
        while stack:
            node = stack.pop()
            if node in pending or node in emitted:
                continue
            pending.add(node)
            stack.extend(i for i in graph.inputs[node] if i in recomputed or graph.role[i] == "bw")
        for node in sorted(pending, key=graph.position.__getitem__):
            emitted.add(node)
            schedule.append(node)

    for name in graph.order:
        if graph.role[name] == "bw" and name in graph.tangent_dependent:
            emit(name)
    for name in graph.bw_outputs:
        if name in graph.role and (graph.role[name] == "bw" or name in recomputed):
            emit(name)
    return schedule


def plan_steps(graph: JointGraph, saved: list[str], recomputed: list[str],
               offloaded: dict[str, float] | None = None) -> tuple[list[Step], set[str], int]:
    """Steps of forward then backward, the keys that stay live to the end, and the boundary.

    ``offloaded`` maps saved tensors to the fraction alpha sent to the host. Its copy is modelled
    as the runtime does it: after the tensor's last forward reader, "o:x" allocates the kept part
    ((1 - alpha) of x's elements, a fresh tensor) and is x's last reader, so x's allocation is
    freed unless something else still lives in it; before the first backward reader, "r:x"
    allocates all of x's elements (a fresh dense tensor, views included) from the kept part, and
    the backward reads "r:x"."""
    offloaded = offloaded or {}
    kept = {n: graph.logical_bytes[n] - int(alpha * graph.logical_bytes[n])
            for n, alpha in offloaded.items()}
    steps: list[Step] = []
    forward = graph.forward_run(saved)
    last_fw_reader: dict[str, str] = {}
    for name in forward:
        for source in graph.inputs[name]:
            last_fw_reader[source] = name
    for name in forward:
        steps.append(_step(graph, name, "f:", lambda i: f"f:{i}"))
        for source in offloaded:
            if last_fw_reader.get(source, source) == name:
                steps.append(Step(f"o:{source}", kept[source], f"o:{source}", (f"f:{source}",)))
    boundary = len(steps)
    for name in graph.order:
        if graph.role[name] == "tangent":
            steps.append(Step(f"t:{name}", graph.nbytes[name], f"t:{name}", ()))
    recomputed_set = set(recomputed)
    reloaded: set[str] = set()

    def key(source: str) -> str:
        if source in recomputed_set or graph.role[source] == "bw":
            return f"b:{source}"
        if graph.role[source] == "tangent":
            return f"t:{source}"
        if source in offloaded:
            return f"r:{source}" if source in reloaded else f"o:{source}"
        return f"f:{source}"

    for name in backward_order(graph, recomputed):
        for source in graph.inputs[name]:
            if source in offloaded and source not in reloaded:
                steps.append(Step(f"r:{source}", graph.logical_bytes[source], f"r:{source}",
                                  (f"o:{source}",)))
                reloaded.add(source)
        steps.append(_step(graph, name, "b:", key))
    pinned = {f"f:{n}" for n in graph.fw_outputs if graph.role.get(n) == "fw"}
    pinned |= {key(n) for n in graph.bw_outputs if n in graph.role and graph.role[n] != "primal"}
    if graph.hold_backward_inputs:  # the backward's inputs: kept parts of offloaded tensors
        pinned |= {f"o:{n}" if n in offloaded else f"f:{n}" for n in saved if graph.role[n] == "fw"}
        pinned |= {f"t:{n}" for n in graph.order if graph.role[n] == "tangent"}
    return steps, pinned, boundary


def _step(graph: JointGraph, name: str, prefix: str, key) -> Step:
    inputs = tuple(key(i) for i in graph.inputs[name] if graph.role[i] != "primal")
    if name in graph.tuple_outputs:
        return Step(prefix + name, 0, prefix + name, inputs, graph.tuple_outputs[name],
                    graph.workspace.get(name, 0))
    if name in graph.getitem_of:
        parent, index = graph.getitem_of[name]
        return Step(prefix + name, 0, f"{key(parent)}#{index}", inputs)
    base = graph.view_of.get(name)
    if base is not None and graph.role[base] != "primal":
        return Step(prefix + name, 0, key(base), inputs)
    if base is not None:
        return Step(prefix + name, 0, f"in:{base}", inputs)
    return Step(prefix + name, graph.nbytes[name], prefix + name, inputs,
                workspace=graph.workspace.get(name, 0), kind=graph.kind.get(name, ""))


def evaluate(graph: JointGraph, saved: Iterable[str], offloaded: dict[str, Option] | None = None,
             budget: int = 0, choices: dict[str, Option] | None = None,
             groups: dict[str, tuple[str, ...]] | None = None) -> Plan:
    """The plan that saves ``saved`` (plus what correctness forces), simulated.

    ``offloaded`` maps a candidate to its offload option; ``groups`` names the saved tensors a
    candidate stands for (itself when absent): each of them is offloaded with the option's alpha."""
    offloaded = offloaded or {}
    groups = groups or {}
    saved, recomputed = recompute_closure(graph, saved)
    saved_set = set(saved)
    live_offloads = {n: o for n, o in offloaded.items()
                     if all(m in saved_set for m in groups.get(n, (n,)))}
    alphas = {m: o.alpha for n, o in live_offloads.items() for m in groups.get(n, (n,))}
    steps, pinned, boundary = plan_steps(graph, saved, recomputed, alphas)
    if graph.fuse_pointwise:
        steps = inline_pointwise(steps, pinned, boundary)
    timeline = simulate(steps, pinned, boundary=boundary)
    return Plan(saved=saved, recomputed=recomputed, offloaded=alphas, timeline=timeline,
                recompute_time_s=sum(graph.time_s[n] for n in recomputed),
                exposed_offload_s=sum(o.cost_s for o in live_offloads.values()),
                budget=budget, feasible=timeline.peak <= budget, choices=dict(choices or {}))


# --- stage 2: the choice under the budget -----------------------------------------------------------

def candidates(graph: JointGraph, base_saved: list[str],
               offload_options: dict[str, list[Option]] | None = None) -> list[Candidate]:
    """Every allocation the base plan's saved tensors hold that dropping them frees, with its
    options: keep, recompute every member, or offload (``offload_options`` keyed by the group's
    first member). A saved view is priced by its base's bytes, each allocation once."""
    offload_options = offload_options or {}
    _, base_recomputed = recompute_closure(graph, base_saved)
    available = set(base_saved) | set(base_recomputed)
    result = []
    for root, members in graph.freeable_groups(base_saved).items():
        freed = graph.storage_nbytes(root)
        options = [KEEP]
        if all(graph.recomputable[m] for m in members):
            chain, extra = recompute_chain(graph, members, available)
            options.append(Option("recompute", max(freed - extra, 0),
                                  sum(graph.time_s[n] for n in chain)))
        options += offload_options.get(members[0], [])
        if len(options) > 1 and freed > 0:
            result.append(Candidate(members[0], freed, tuple(options), tuple(members)))
    return result


def recompute_chain(graph: JointGraph, names: str | Iterable[str],
                    available: set[str]) -> tuple[list[str], int]:
    """Nodes recomputed to rebuild ``names`` (one node or several) when everything in
    ``available`` is at hand, and the bytes of values that cannot be recomputed on the way (they
    must then be saved)."""
    targets = {names} if isinstance(names, str) else set(names)
    chain, extra, stack, seen = [], 0, sorted(targets, key=graph.position.__getitem__), set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node not in targets and (node in available or graph.role[node] == "primal"
                                    or node in graph.symbolic):
            continue
        if not graph.recomputable[node]:
            extra += graph.nbytes[node]
            continue
        chain.append(node)
        stack.extend(i for i in graph.inputs[node] if graph.is_forward(i))
    return chain, extra


REFINE_ROUNDS = 8               # local-search rounds after the knapsack family (_refine)


def knapsack_family(items: list[Candidate], buckets: int = 256) -> list[dict[str, Option]]:
    """For every level r of bytes freed (in ``buckets`` steps), the cheapest choice of one option
    per candidate that frees at least r under the additive model (exact multiple-choice DP)."""
    total = sum(max(o.bytes_freed for o in c.options) for c in items)
    if total <= 0:
        return [{}]
    unit = max(1, -(-total // buckets))
    best = [0.0] + [INFINITE] * buckets
    picks: list[list[int]] = []
    for item in items:
        new = list(best)
        pick = [0] * (buckets + 1)
        for index, option in enumerate(item.options[1:], start=1):
            gain = option.bytes_freed // unit
            for level in range(buckets + 1):
                before = best[max(level - gain, 0)]
                if before + option.cost_s < new[level]:
                    new[level] = before + option.cost_s
                    pick[level] = index
        best = new
        picks.append(pick)
    family, seen = [], set()
    for level in range(buckets + 1):
        if best[level] == INFINITE:
            break
        choice, remaining = {}, level
        for item, pick in zip(reversed(items), reversed(picks)):
            index = pick[remaining]
            if index:
                option = item.options[index]
                choice[item.name] = option
                remaining = max(remaining - option.bytes_freed // unit, 0)
        key = tuple(sorted((n, o.kind, o.alpha) for n, o in choice.items()))
        if key not in seen:
            seen.add(key)
            family.append(choice)
    return family


def plan_under_budget(graph: JointGraph, budget: int, base_saved: list[str],
                      offload_options: dict[str, list[Option]] | None = None,
                      buckets: int = 256) -> tuple[Plan, list[Plan]]:
    """The cheapest plan of the family whose simulated peak fits ``budget`` (or, when none fits,
    the one with the lowest peak, marked infeasible), and every plan scored."""
    items = candidates(graph, base_saved, offload_options)
    # The additive model cannot tell where the peak is: an offload frees bytes only while the
    # tensor is on the host, a recomputation until its first backward use. So the family holds the
    # DP's choices over every option and over each kind alone -- still independent of the budget.
    families = [knapsack_family(items, buckets)]
    kinds = sorted({o.kind for c in items for o in c.options[1:]})
    for kind in kinds if len(kinds) > 1 else ():
        only = [dataclasses.replace(c, options=(KEEP, *[o for o in c.options[1:] if o.kind == kind]))
                for c in items]
        families.append(knapsack_family([c for c in only if len(c.options) > 1], buckets))
    groups = {c.name: c.names for c in items}
    scored, seen = [], set()
    for choice in (choice for family in families for choice in family):
        key = tuple(sorted((n, o.kind, o.alpha) for n, o in choice.items()))
        if key in seen:
            continue
        seen.add(key)
        scored.append(_score(graph, base_saved, budget, choice, groups))
    best = min(scored, key=_objective)
    return _refine(graph, best, items, base_saved, budget, groups, scored), scored


def _score(graph: JointGraph, base_saved: list[str], budget: int, choice: dict[str, Option],
           groups: dict[str, tuple[str, ...]]) -> Plan:
    freed = {m for n, o in choice.items() if o.kind == "recompute" for m in groups[n]}
    offloads = {n: o for n, o in choice.items() if o.kind == "offload"}
    saved = [n for n in base_saved if n not in freed]
    return evaluate(graph, saved, offloads, budget, choice, groups)


def _objective(plan: Plan) -> tuple:
    """The cheapest plan that fits; while none fits, the lowest peak."""
    return (0, plan.cost_s) if plan.feasible else (1, plan.peak, plan.cost_s)


def _refine(graph: JointGraph, plan: Plan, items: list[Candidate], base_saved: list[str],
            budget: int, groups: dict[str, tuple[str, ...]], scored: list[Plan]) -> Plan:
    """Local search from the family's best plan, one candidate's recomputation switched on or off
    per round, the best simulated move taken while it improves ``_objective``.

    The knapsack family is exact for the additive model only: a candidate whose recomputation is
    expensive (a chunked loss's gradient, rebuilt in backward) is dropped there only at the highest
    levels of bytes freed, together with everything else, whose recomputations then meet in the
    backward and raise its peak. One at a time, such a candidate can still lower the peak (while no
    plan fits) or keeping one can save its recomputation (once a plan fits).

    The search starts from, and stays within, plans that depend on the budget, so "more budget never
    means more recompute" is not true by construction here; the tests check it over budgets on
    random MLPs and transformers and on a chunked-loss Llama. (A descent on peak alone, the same for
    every budget, would make it so, but measured 1.2-2x more recompute at mid budgets on that Llama.)"""
    recompute = {c.name: next((o for o in c.options[1:] if o.kind == "recompute"), None) for c in items}
    for _ in range(REFINE_ROUNDS):
        moves = []
        for name, option in recompute.items():
            current = plan.choices.get(name)
            if current is not None and current.kind == "recompute":
                moves.append({n: o for n, o in plan.choices.items() if n != name})
            elif current is None and option is not None:
                moves.append({**plan.choices, name: option})
        tried = [_score(graph, base_saved, budget, choice, groups) for choice in moves]
        scored.extend(tried)
        best = min(tried, key=_objective, default=None)
        if best is None or _objective(best) >= _objective(plan):
            return plan
        plan = best
    return plan
