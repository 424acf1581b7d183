"""Compile-time decisions that every rank running a graph shares: decided once, handed on.

A planner fed with inputs that differ between ranks (op times measured on each GPU) would make one
plan per rank. Here the lowest rank of the graph's process groups decides, and the others adopt its
payload through the default process group's key-value store::

    ranks  = the global ranks of every process group the graph's collectives name (group_name)
    leader = min(ranks)
    key(r) = graphopt/<topic>/<fingerprint>/<r>
    leader:  payload = decide();  store[key(leader)] = payload
    others:  wait for store[key(leader)] (at most timeout_s);  store[key(self)] = payload
    then every rank keeps the payload: a later compile of the same graph reuses it untouched

- **The store, not a collective.** A rank that compiles while its peers run the graph's real
  collectives (a recompile on one rank only) must not pair its exchange with theirs: it waits on a
  key, and after ``timeout_s`` goes on without a payload (the caller decides alone and says so).
- **Handing on.** On a 2 x 2 tensor x data parallel mesh, rank 3's groups hold ranks {1, 3} and
  {2, 3}: its leader is rank 1, which holds what rank 0 decided. In a grid mesh every rank but
  rank 0 has a lower rank in one of its groups, so every chain ends at rank 0. Ranks that the
  graph's groups do not connect (tensor-parallel groups of a graph whose data-parallel reduction
  runs outside it) follow one leader per connected set.
- **The fingerprint** names the graph's structure (ops, shapes, dtypes), so a rank that compiles
  another graph never reads this graph's payload; it waits and goes on alone.
- **Once per graph structure.** A payload is decided once per fingerprint and kept by every rank,
  so a recompile of the same graph on some ranks only (a guard that failed on one rank) finds it
  at once, on the leader and on the others, and every compile of that graph uses the same one.
- A graph without collectives has no known set of ranks running it (under pipeline parallelism
  other ranks run other graphs): ``graph_group_ranks`` returns () and nothing is exchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import re
import time
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
import torch.fx as fx

from graphopt import _compat
from graphopt.analysis import op_facts
from graphopt.distributed import faults

log = logging.getLogger("graphopt.measure.agreement")

_kept: dict[tuple[str, str], Agreement] = {}


@dataclasses.dataclass(frozen=True)
class Agreement:
    """The payload this rank uses (None: there was none to adopt) and where it came from."""

    payload: str | None
    leader: int
    why: str


def graph_group_ranks(gm: fx.GraphModule) -> tuple[int, ...]:
    """Sorted global ranks of the process groups named by ``gm``'s ops (``group_name`` arguments);
    () outside a run of several ranks or where the graph names no group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return ()
    ranks: set[int] = set()
    for name in sorted(set(_group_names(gm.graph.nodes))):
        try:
            ranks.update(dist.get_process_group_ranks(_compat.resolve_process_group(name)))
        except (ValueError, RuntimeError) as error:  # a group this process does not know
            log.info("group %r of the graph is not known here (%s): no agreement", name, error)
            return ()
    return tuple(sorted(ranks))


def canonical_group_names(nodes: Iterable[fx.Node]) -> dict[str, str]:
    """Each group name the nodes carry -> ``group<i>``, numbered by first use. The same program on
    two ranks of a mesh names other groups (rank 0's tensor-parallel group is not rank 2's), so a
    fingerprint of the graph's structure uses these instead."""
    names: dict[str, str] = {}
    for name in _group_names(nodes):
        names.setdefault(name, f"group{len(names)}")
    return names


def _group_names(nodes: Iterable[fx.Node]) -> list[str]:
    """The ``group_name`` argument of every op that has one, in graph order."""
    values = (op_facts.argument(node, "group_name") for node in nodes
              if node.op == "call_function" and hasattr(node.target, "_schema"))
    return [value for value in values if isinstance(value, str)]


def agree(topic: str, fingerprint: str, ranks: tuple[int, ...], decide: Callable[[], str],
          timeout_s: float) -> Agreement:
    """The leader of ``ranks`` runs ``decide`` and publishes its payload; every other rank waits
    for its leader's (at most ``timeout_s``), adopts it and publishes it for the ranks that lead
    from it. Returns this rank's payload, or a None payload with the reason."""
    rank = dist.get_rank()
    if rank not in ranks:
        raise ValueError(f"rank {rank} is not one of the ranks {ranks} that run the graph; pass the "
                         "ranks of the graph's own process groups (graph_group_ranks)")
    leader = min(ranks)
    kept = _kept.get((topic, fingerprint))
    if kept is not None:
        return kept
    prefix = f"graphopt/{topic}/{fingerprint}"
    store = _compat.default_store()
    if rank == leader:
        payload = decide()
        why = f"decided on rank {rank} for ranks {_span(ranks)}"
        try:
            store.set(f"{prefix}/{rank}", payload)
        except Exception as error:  # a store that takes no keys (fake process groups)
            why += f"; not published ({type(error).__name__}: {error})"
        return _keep(topic, fingerprint, Agreement(payload, leader, why))
    try:
        arrived = _await(store, [f"{prefix}/{leader}"], timeout_s, f"rank {leader}'s {topic}", ranks)
        payload = store.get(f"{prefix}/{leader}").decode() if arrived else None
    except RankDisagreement:
        raise  # the leader failed: there is nothing to wait for
    except Exception as error:  # a store that cannot check keys
        arrived, payload = False, f"{type(error).__name__}: {error}"
    if not arrived:
        return Agreement(None, leader, (
            f"rank {leader} published nothing for this graph within {timeout_s:g} s "
            f"({payload or 'timeout'}); it may compile another graph"))
    store.set(f"{prefix}/{rank}", payload)
    return _keep(topic, fingerprint,
                 Agreement(payload, leader, f"adopted from rank {leader} (ranks {_span(ranks)})"))


def _keep(topic: str, fingerprint: str, agreement: Agreement) -> Agreement:
    _kept[(topic, fingerprint)] = agreement
    return agreement


def _span(ranks: tuple[int, ...]) -> str:
    if ranks == tuple(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    return ", ".join(map(str, ranks))


def describe_graph(gm: fx.GraphModule, constants: bool = True) -> list[str]:
    """One line per node of ``gm``: its op, target, arguments (nodes by position, process groups by
    their canonical name, devices by type; numbers as ``#`` without ``constants``) and value
    (dtype, shape with symbols, device type). The same for the same program in every process and
    on every rank: no object addresses, device indices or group names of this rank. Without
    ``constants``, symbolic integer inputs are left out (a rank whose input is a slice at a
    non-zero offset gets one more: its storage offset) and symbols are numbered by first use."""
    nodes = _described_nodes(gm, constants)
    index = {node: i for i, node in enumerate(nodes)}
    groups = canonical_group_names(nodes)

    def show(value: Any) -> str:
        if isinstance(value, fx.Node):
            return f"%{index[value]}" if value in index else "#"
        if isinstance(value, (list, tuple)):
            inner = ", ".join(show(v) for v in value)
            return f"[{inner}]" if isinstance(value, list) else f"({inner})"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k}={show(v)}" for k, v in value.items()) + "}"
        if isinstance(value, str):
            return repr(groups.get(value, value))
        if isinstance(value, torch.device):
            return f"device({value.type})"
        if isinstance(value, torch.Tensor):
            return _value(value)
        if callable(value) or isinstance(value, type):
            return _target(value)
        if not constants and isinstance(value, (int, float)) and not isinstance(value, bool):
            return "#"
        return repr(value) if isinstance(value, (int, float, bool, type(None), torch.dtype,
                                                 torch.SymInt, torch.layout, torch.memory_format)) \
            else type(value).__name__

    lines = [f"{node.op} {_target(node.target) if node.op != 'placeholder' else ''}"
             f"({show(node.args)[1:-1]}{', ' if node.args and node.kwargs else ''}"
             f"{show(node.kwargs)[1:-1]}) -> {_value(node.meta.get('val', node.meta.get('example_value')))}"
             for node in nodes]
    if constants:
        return lines
    numbers: dict[str, str] = {}
    return [_SYMBOL.sub(lambda m: numbers.setdefault(m.group(0), f"{m.group(0)[0]}{len(numbers)}"), line)
            for line in lines]


_SYMBOL = re.compile(r"\b[su]\d+\b")


def _described_nodes(gm: fx.GraphModule, constants: bool) -> list[fx.Node]:
    nodes = list(gm.graph.nodes)
    if constants:
        return nodes
    return [node for node in nodes if not (
        node.op == "placeholder" and isinstance(node.meta.get("example_value", node.meta.get("val")),
                                                (torch.SymInt, int)))]


def _target(target: Any) -> str:
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        return str(target)
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
    return f"{module}.{name}" if name else type(target).__name__


def _value(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype}{list(value.shape)}@{value.device.type}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_value(v) for v in value) + ")"
    if isinstance(value, (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool)):
        return type(value).__name__ if not isinstance(value, (int, float, bool)) else repr(value)
    return "" if value is None else type(value).__name__


def graph_fingerprint(gm: fx.GraphModule) -> str:
    """A short hash of ``describe_graph(gm)``."""
    return fingerprint(describe_graph(gm))


def fingerprint(parts: Iterable[object]) -> str:
    """A short hash of the ``repr`` of ``parts`` (a graph's structure, as the caller describes it)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(repr(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:24]


# --- ranks agree or fail together --------------------------------------------------------------------
#
# Before a compiled graph's first collective, every rank of the graph's process groups checks that
# it compiled the same graph with the same flags and took the same decisions, through the default
# store (never a collective, which could pair with a user's):
#
#     ranks = each set of graph_rank_sets(gm) that holds this rank (a process group its ops
#             name, a mesh of its DTensor values), in sorted order
#     key   = graphopt/ranks/<ranks>/<n>/<stage>   n: this graph's number among the new graphs
#                                                   these ranks compiled (the same on every rank)
#     every rank:  store[key/record/<rank>] = its record (flags, graph, or decisions)
#     others:      compare theirs with the leader's (the lowest rank); store[key/verdict/<rank>]
#     leader:      wait for every verdict; store[key/final] = the differences found, or ""
#     every rank:  a non-empty final is a RankDisagreement naming the flag or decision and ranks
#
# O(ranks) store operations a graph. A rank whose record equals one it agreed on already (a
# recompile of the same graph on some ranks only) checks nothing. A rank that fails meanwhile
# (a compile error, an uncaught exception: ``graphopt.distributed.faults``) ends every such wait
# at once with its message.
#
# A graph without collectives has no ranks to agree with (under pipeline parallelism other ranks
# run other graphs), but a flag that adds collectives can leave it without them on one rank only
# (sequence parallelism switched off in one rank's environment): the first such graph of a rank
# compares those flags with the ones rank 0 compiled its first graph with (waiting at most
# ``FLAGS_GRACE_S`` for them).

class RankDisagreement(RuntimeError):
    """Ranks that run a graph together compiled different graphs or flags, decided differently, or
    one of them failed."""


FLAGS_GRACE_S = 5.0         # a rank's first compile waits this long for rank 0's flags
# Flags that add collectives to a graph (graphopt's passes that communicate themselves).
COMMUNICATION_FLAGS = ("sequence_parallel_attention",)
_POLL_FIRST_S, _POLL_MAX_S = 0.005, 0.25
_sequence: dict[tuple[int, ...], int] = {}
_agreed: set[tuple[tuple[int, ...], str]] = set()
_flags_checked = False
# Raised on every rank involved, a disagreement ends the numbering of graphs: ranks that go on
# (a test, a retry) number their graphs afresh, under keys of the next epoch.
_epoch = 0


def graph_rank_sets(gm: fx.GraphModule) -> tuple[tuple[int, ...], ...]:
    """The sets of global ranks that must run ``gm`` together, one per process group its ops name
    (group name arguments of collectives and graphopt ops) and one per device mesh of its DTensor
    values, sorted; () outside a run of several real processes (a fake process group has no
    peers). Every member of a set computes the same set, which the union over a rank's groups is
    not: on a 2 x 2 mesh of process groups rank 0's groups span {0, 1, 2} and rank 3's {1, 2, 3}."""
    if not faults.several_ranks():
        return ()
    sets: set[tuple[int, ...]] = set()
    for node in gm.graph.nodes:
        value = node.meta.get("example_value", node.meta.get("val"))
        mesh = getattr(value, "device_mesh", None)
        if mesh is not None:
            sets.add(tuple(sorted(int(r) for r in mesh.mesh.flatten().tolist())))
        if not _communicates(node):
            continue
        for arg in (*node.args, *node.kwargs.values()):
            if isinstance(arg, str):
                try:
                    sets.add(tuple(sorted(dist.get_process_group_ranks(
                        _compat.resolve_process_group(arg)))))
                except (ValueError, RuntimeError, KeyError):
                    continue  # a string argument that names no group ("sum", a pool name)
    return tuple(sorted(ranks for ranks in sets if len(ranks) > 1))


def shared_flags(cfg) -> dict[str, str]:
    """The flags every rank must share, as text: all but the rank-local ones (dump folder, debug,
    timeouts); a process group as its size (on a 2 x 2 mesh rank 0's sequence group holds ranks
    {0, 2} and rank 1's {1, 3}: the groups differ by design, their sizes may not; which ranks a
    graph's collectives pair up with is checked by each group agreeing on its own), a device
    profile as a digest of its content."""
    from graphopt import config
    flags = config.flags()
    shared = {}
    for name, value in cfg.as_dict().items():
        if flags[name].rank_local:
            continue
        if name == "device_profile" and value:
            with open(value, "rb") as handle:
                value = f"profile {hashlib.sha256(handle.read()).hexdigest()[:12]}"
        elif isinstance(value, dist.ProcessGroup) or (name == "sp_group" and value is not None):
            value = f"a group of {len(dist.get_process_group_ranks(_compat.resolve_process_group(value)))} ranks"
        shared[name] = repr(value) if not isinstance(value, str) else value
    return shared


def graph_record(gm: fx.GraphModule, cfg) -> dict[str, Any]:
    """What a rank compiled, for its peers: the shared flags, a fingerprint of the graph's
    structure (scalar constants left out: code may fold its rank into one), and for the message
    its size, its inputs and its communicating ops."""
    lines = describe_graph(gm, constants=False)
    return {"flags": shared_flags(cfg), "graph": fingerprint(lines), "nodes": len(lines),
            "inputs": [line.split(" -> ")[-1] for line in lines if line.startswith("placeholder")][:16],
            "collectives": [line for line, node in zip(lines, _described_nodes(gm, False))
                            if _communicates(node)][:16]}


def _communicates(node: fx.Node) -> bool:
    """A collective or graphopt op, as an overload (aten graphs) or a packet (Dynamo's graphs)."""
    name = getattr(node.target, "_qualified_op_name", None) or getattr(
        getattr(node.target, "_overloadpacket", None), "_qualified_op_name", "")
    return node.op == "call_function" and name.split("::")[0] in (
        *op_facts.COMMUNICATING_NAMESPACES, op_facts.GRAPHOPT_NAMESPACE)


def check_graph(gm: fx.GraphModule, cfg, graph_id: str,
                pre_grad: dict[str, Any] | None = None) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Every rank running ``gm`` compiled it with the same flags and the pre_grad passes decided
    the same for it (``pre_grad``: pass -> what it decided; ``RankDisagreement`` where not). Each
    set of ranks (``graph_rank_sets``) that holds this rank agrees on its own, in the sets' sorted
    order, which is the same on every rank, so no two ranks wait on each other in opposite orders.
    Returns the (key, ranks) under which its later decisions are checked (``check_decisions``)."""
    if not (cfg.rank_agreement and faults.several_ranks()):
        return ()
    faults.install_excepthook()
    record = {**graph_record(gm, cfg), "pre_grad": _decision_digests(pre_grad or {})}
    rank = dist.get_rank()
    rank_sets = tuple(ranks for ranks in graph_rank_sets(gm) if rank in ranks)
    digest = fingerprint([json.dumps(record, sort_keys=True)])
    keys = []
    with _ending_the_epoch_on_disagreement():
        _check_flags_once(record["flags"], alone=not rank_sets, timeout_s=cfg.rank_agreement_timeout_s)
        for ranks in rank_sets:
            if (ranks, digest) in _agreed:
                log.info("[%s] ranks %s agreed on this graph already", graph_id, _span(ranks))
                continue
            number = _sequence[ranks] = _sequence.get(ranks, -1) + 1
            key = f"graphopt/ranks/{_epoch}/{_span(ranks)}/{number}"
            _exchange(f"{key}/graph", record, ranks, cfg.rank_agreement_timeout_s,
                      _graph_differences, f"graph {graph_id}")
            keys.append((key, ranks))
    _agreed.update((ranks, digest) for _, ranks in keys)
    return tuple(keys)


def check_decisions(agreed: tuple[tuple[str, tuple[int, ...]], ...], decisions: dict[str, Any] | None,
                    timeout_s: float, graph_id: str) -> None:
    """Every rank took the same decisions for the graph agreed under each key of ``agreed``
    (``check_graph``): ``decisions`` maps a pass to what it decided (None: this rank compiled
    nothing to decide, a cache hit; it is compared with no one)."""
    record = {"decisions": _decision_digests(decisions or {}), "decided": decisions is not None}
    with _ending_the_epoch_on_disagreement():
        for key, ranks in agreed:
            _exchange(f"{key}/decisions", record, ranks, timeout_s, _decision_differences,
                      f"graph {graph_id}")


@contextlib.contextmanager
def _ending_the_epoch_on_disagreement():
    global _epoch
    try:
        yield
    except RankDisagreement:
        _epoch += 1
        _sequence.clear()
        raise


def _check_flags_once(flags: dict[str, str], alone: bool, timeout_s: float) -> None:
    """Publish the flags of this rank's first compile; where that first graph has no collectives
    (``alone``), compare the flags that add collectives with rank 0's (waiting at most
    FLAGS_GRACE_S for them)."""
    global _flags_checked
    store, rank = _compat.default_store(), dist.get_rank()
    if not store.check([f"graphopt/ranks/flags/{rank}"]):
        store.set(f"graphopt/ranks/flags/{rank}", json.dumps(flags))
    first, _flags_checked = not _flags_checked, True
    if not (first and alone):  # later graphs without collectives may differ by design (a
        return                 # baseline compiled beside the sequence-parallel model)
    if rank == 0:
        return
    key = "graphopt/ranks/flags/0"
    if not _await(store, [key], min(FLAGS_GRACE_S, timeout_s), "rank 0's flags", (0,)):
        log.info("rank 0 compiled nothing within %g s; its flags are compared when it does",
                 FLAGS_GRACE_S)
        return
    theirs = json.loads(store.get(key))
    differences = _flag_differences({n: flags.get(n) for n in COMMUNICATION_FLAGS},
                                    {n: theirs.get(n) for n in COMMUNICATION_FLAGS}, rank, 0)
    if differences:
        raise RankDisagreement(_message(differences))  # the backend reports it to the peers


def _exchange(key: str, record: dict, ranks: tuple[int, ...], timeout_s: float,
              differences_of: Callable[[dict, dict, int, int], list[str]], what: str) -> None:
    """The protocol in the comment above, for one record."""
    store, rank, leader = _compat.default_store(), dist.get_rank(), min(ranks)
    store.set(f"{key}/record/{rank}", json.dumps(record))
    if rank != leader:
        _await_or_fail(store, [f"{key}/record/{leader}"], timeout_s,
                       f"rank {leader}'s record of {what}", ranks)
        leaders = json.loads(store.get(f"{key}/record/{leader}"))
        store.set(f"{key}/verdict/{rank}", "\n".join(differences_of(record, leaders, rank, leader)))
        _await_or_fail(store, [f"{key}/final"], timeout_s, f"rank {leader}'s verdict on {what}",
                       ranks)
        final = store.get(f"{key}/final").decode()
    else:
        verdicts = [f"{key}/verdict/{r}" for r in ranks if r != rank]
        _await_or_fail(store, verdicts, timeout_s, f"the records of {what} of ranks {_span(ranks)}",
                       ranks)
        final = "\n".join(text for text in (store.get(v).decode() for v in verdicts) if text)
        store.set(f"{key}/final", final)
    if final:
        raise RankDisagreement(_message(final.splitlines()))


def _await(store, keys: list[str], timeout_s: float, what: str,
           ranks: Iterable[int] | None = None) -> bool:
    """Whether every key came within ``timeout_s``; a failure report of one of ``ranks`` (default:
    any rank) ends the wait at once (``RankDisagreement`` with its message)."""
    deadline = time.monotonic() + timeout_s
    pause = _POLL_FIRST_S
    while not store.check(keys):
        failed = faults.failure(ranks)
        if failed:
            raise RankDisagreement(f"{failed} (this rank waited for {what})")
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 1.5, _POLL_MAX_S)
    return True


def _await_or_fail(store, keys: list[str], timeout_s: float, what: str,
                   ranks: tuple[int, ...]) -> None:
    if not _await(store, keys, timeout_s, what, ranks):
        raise RankDisagreement(
            f"graphopt: {what} did not come within {timeout_s:g} s (graphopt.config."
            f"rank_agreement_timeout_s): ranks {_span(ranks)} must compile the same graphs in the "
            "same order; one compiled another graph (a graph break or a recompile on some ranks "
            "only), is stuck, or runs with rank_agreement=False")


def _flag_differences(mine: dict, theirs: dict, rank: int, leader: int) -> list[str]:
    return [f"flag {name}: rank {rank} has {mine.get(name, 'no such flag')}, rank {leader} has "
            f"{theirs.get(name, 'no such flag')}" for name in sorted(set(mine) | set(theirs))
            if mine.get(name) != theirs.get(name)]


def _graph_differences(mine: dict, theirs: dict, rank: int, leader: int) -> list[str]:
    found = _flag_differences(mine["flags"], theirs["flags"], rank, leader)
    if not found:  # the same flags: a pre_grad pass that decided otherwise saw other inputs
        found = _differing(mine["pre_grad"], theirs["pre_grad"], rank, leader,
                           "with the same flags (the model's code or inputs differ between ranks)")
    if mine["graph"] != theirs["graph"]:
        detail = []
        if mine["inputs"] != theirs["inputs"]:
            detail.append(f"inputs {mine['inputs']} on rank {rank}, {theirs['inputs']} on rank "
                          f"{leader}")
        if mine["collectives"] != theirs["collectives"]:
            detail.append(f"{len(mine['collectives'])} communicating ops on rank {rank} "
                          f"({'; '.join(mine['collectives'][:3])}), {len(theirs['collectives'])} on "
                          f"rank {leader} ({'; '.join(theirs['collectives'][:3])})")
        detail.append(f"{mine['nodes']} nodes on rank {rank}, {theirs['nodes']} on rank {leader}")
        found.append(f"rank {rank} compiled another graph than rank {leader} (different shapes, "
                     f"or a graph break or recompile on some ranks only): {'; '.join(detail)}")
    return found


def _decision_digests(decisions: dict[str, Any]) -> dict[str, str]:
    return {name: fingerprint([json.dumps(value, sort_keys=True, default=str)])
            for name, value in decisions.items()}


def _decision_differences(mine: dict, theirs: dict, rank: int, leader: int) -> list[str]:
    if not (mine["decided"] and theirs["decided"]):
        return []  # one of them took its compiled code from the cache
    return _differing(mine["decisions"], theirs["decisions"], rank, leader,
                      "from the same graph and flags (a device profile or op times that differ "
                      "between ranks)")


def _differing(mine: dict[str, str], theirs: dict[str, str], rank: int, leader: int,
               cause: str) -> list[str]:
    return [f"{name}: rank {rank} decided otherwise than rank {leader} {cause}"
            for name in sorted(set(mine) | set(theirs))
            if mine.get(name) != theirs.get(name)]


def _message(differences: list[str]) -> str:
    return ("graphopt: the ranks that run this graph together disagree, so its collectives would "
            "not pair up: " + "; ".join(differences) + ". Give every rank the same flags (the "
            "GRAPHOPT_* environment, graphopt.backend(...), patches) and the same inputs; set "
            "graphopt.config.rank_agreement=False only if the ranks may differ by design")
