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

import dataclasses
import hashlib
import logging
from datetime import timedelta
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
import torch.fx as fx

from graphopt import _compat
from graphopt.analysis import op_facts

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
        store.wait([f"{prefix}/{leader}"], timedelta(seconds=timeout_s))
        payload = store.get(f"{prefix}/{leader}").decode()
    except Exception as error:  # timeout, or a store that cannot wait
        return Agreement(None, leader, (
            f"rank {leader} published nothing for this graph within {timeout_s:g} s "
            f"({type(error).__name__}); it may compile another graph"))
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


def describe_graph(gm: fx.GraphModule) -> list[str]:
    """One line per node of ``gm``: its op, target, arguments (nodes by position, process groups by
    their canonical name, devices by type) and value (dtype, shape with symbols, device type).
    The same for the same program in every process and on every rank: no object addresses, device
    indices or group names of this rank."""
    nodes = list(gm.graph.nodes)
    index = {node: i for i, node in enumerate(nodes)}
    groups = canonical_group_names(nodes)

    def show(value: Any) -> str:
        if isinstance(value, fx.Node):
            return f"%{index[value]}"
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
        return repr(value) if isinstance(value, (int, float, bool, type(None), torch.dtype,
                                                 torch.SymInt, torch.layout, torch.memory_format)) \
            else type(value).__name__

    return [f"{node.op} {_target(node.target) if node.op != 'placeholder' else ''}"
            f"({show(node.args)[1:-1]}{', ' if node.args and node.kwargs else ''}"
            f"{show(node.kwargs)[1:-1]}) -> {_value(node.meta.get('val', node.meta.get('example_value')))}"
            for node in nodes]


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
