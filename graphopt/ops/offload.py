"""Offload and reload of saved activations through one static pinned host pool per plan.

A plan (``graphopt.passes.offload_activations``) gives every offloaded activation a slot: a byte
range of one pinned host buffer, the *pool*. The pool is allocated once, at the first step, with the
size the plan asked for, and reused by every later step, so offload never allocates pinned memory
per step and never fragments it.

An activation ``x`` is laid out as the plan's ``stride`` says (its own strides when its memory
is dense; a view with gaps is first copied into that packed layout on the device) and, as
``numel`` elements in memory order, split along its outermost memory dimension -- the token
dimension of ``[B, S, ...]`` activations: the first ``kept_numel`` elements stay on the device,
the rest go to the host. The reload comes back dense, in that layout.

Forward (the compute stream never waits on the host)::

    ticket = graphopt::offload(x, pool, pool_nbytes, offset, kept_numel, stride)
        # side stream waits for the compute stream, copies x[kept_numel:] -> pool[offset:]
    kept = graphopt::offload_wait(ticket, x, pool, offset, kept_numel, stride)
        # compute stream waits for the copy's event; kept = x[:kept_numel] (a fresh tensor)
        # x's last use: its memory goes back to the allocator, ordered after the copy

Backward::

    ticket = graphopt::reload(kept, pool, pool_nbytes, offset, numel)
        # allocates x's memory on the compute stream, copies kept into its head there; the
        # reload stream waits for the compute stream and copies pool[offset:] into the tail
    x = graphopt::reload_wait(ticket, pool, offset, shape, stride)
        # compute stream waits for the reload's event; x is the reloaded tensor

Tickets are empty tensors that carry the data dependencies (so no compiler drops or hoists a wait
above its copy) and the dtype. CPU tensors run the same function synchronously: the copy goes to a
separate host buffer, so CPU tests check the numerics.

A slot belongs to one forward until its activation's ``kept`` tensor dies (its autograd graph was
freed). A second forward of the same compiled graph while the first one's graph is alive would
overwrite the slot; ``offload`` refuses that with an error instead of corrupting gradients.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from typing import Optional

import torch
from torch import Tensor

from graphopt import _compat

log = logging.getLogger("graphopt.ops.offload")

__all__ = ["SLOT_ALIGNMENT", "HostPool", "pool_stats", "release_pool", "release_pools", "offload", "offload_wait",
           "reload", "reload_wait"]

SLOT_ALIGNMENT = 512  # bytes; every slot starts at a multiple, so any dtype view of a slot is aligned


class HostPool:
    """One host byte buffer (pinned where CUDA exists) carved into the plan's slots by offset."""

    def __init__(self, name: str, nbytes: int):
        pin = torch.cuda.is_available()
        self.name = name
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        self.pinned = pin
        _STATS["pool_allocations"] += 1
        _STATS["host_bytes"] += nbytes
        log.info("offload pool %s: %d bytes of %s host memory", name, nbytes,
                 "pinned" if pin else "pageable")

    def slot(self, offset: int, numel: int, dtype: torch.dtype) -> Tensor:
        nbytes = numel * dtype.itemsize
        if offset % SLOT_ALIGNMENT or offset + nbytes > self.buffer.numel():
            raise RuntimeError(
                f"offload slot [{offset}, {offset + nbytes}) does not fit pool {self.name} of "
                f"{self.buffer.numel()} bytes (or is not {SLOT_ALIGNMENT}-byte aligned); the plan and "
                "the compiled graph disagree -- recompile (torch._dynamo.reset()) after changing it")
        return self.buffer[offset:offset + nbytes].view(dtype)


@dataclasses.dataclass
class _Slot:
    owner: Optional[weakref.ref] = None   # the forward's kept tensor; the slot is busy while it lives
    offload_event: object = None          # torch.cuda.Event of the last device -> host copy
    reload_event: object = None           # torch.cuda.Event of the last host -> device copy
    issue_event: object = None            # torch.cuda.Event a copy stream waits on before a copy
    reloaded: Optional[Tensor] = None     # flat device memory between reload and reload_wait
    # x copied into the planned layout (when its own is another): the side stream reads it, so it
    # lives until offload_wait has ordered the compute stream after the copy
    staged: Optional[Tensor] = None


_POOLS: dict[str, HostPool] = {}
_SLOTS: dict[tuple[str, int], _Slot] = {}
_STREAMS: dict[torch.device, tuple] = {}
_STATS = {"pool_allocations": 0, "host_bytes": 0}


def release_pool(pool: str) -> None:
    """Free a plan's pool and slots (its compiled graph is gone)."""
    buffer = _POOLS.pop(pool, None)
    if buffer is not None:
        _STATS["host_bytes"] -= buffer.buffer.numel()
    for key in [key for key in _SLOTS if key[0] == pool]:
        del _SLOTS[key]


def release_pools() -> None:
    """Free every plan's pool and slots (for example between benchmark runs)."""
    for pool in list(_POOLS):
        release_pool(pool)
    _SLOTS.clear()


def pool_stats() -> dict[str, int]:
    """Pools allocated so far, host bytes they hold, slots in use and reloads in flight."""
    return {"pool_allocations": _STATS["pool_allocations"], "host_bytes": _STATS["host_bytes"],
            "pools": len(_POOLS), "slots": len(_SLOTS),
            "reloads_in_flight": sum(slot.reloaded is not None for slot in _SLOTS.values())}


def _pool(name: str, nbytes: int) -> HostPool:
    pool = _POOLS.get(name)
    if pool is None:
        pool = _POOLS[name] = HostPool(name, nbytes)
    elif pool.buffer.numel() != nbytes:
        raise RuntimeError(
            f"offload pool {name} holds {pool.buffer.numel()} bytes but the graph asks for {nbytes}; "
            "two plans share one name -- call graphopt.ops.offload.release_pool on the stale one")
    return pool


def _slot(pool: str, offset: int) -> _Slot:
    return _SLOTS.setdefault((pool, offset), _Slot())


def _flat(x: Tensor) -> Tensor:
    """x's dense memory as a 1-D tensor in memory order (x is non-overlapping and dense)."""
    return x.as_strided((x.numel(),), (1,), x.storage_offset())


def _planned_layout(x: Tensor, stride: list[int]) -> Tensor:
    """x with the strides the plan saw (a compiler may have picked another layout for it), so the
    memory order that offload splits is the one reload restores."""
    if list(x.stride()) == list(stride):
        return x
    return torch.empty_strided(x.shape, stride, dtype=x.dtype, device=x.device).copy_(x)


def _streams(device: torch.device):
    """(device -> host stream, host -> device stream) of one GPU, created once."""
    streams = _STREAMS.get(device)
    if streams is None:
        streams = _STREAMS[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
    return streams


def _follow(stream, slot: _Slot, device: torch.device) -> None:
    """Order ``stream`` after the work queued so far on the compute stream (the slot's own event,
    recorded anew each time: a wait binds to the record before it)."""
    if slot.issue_event is None:
        slot.issue_event = torch.cuda.Event()
    slot.issue_event.record(torch.cuda.current_stream(device))
    stream.wait_event(slot.issue_event)


def _claim(slot: _Slot, pool: str, offset: int) -> None:
    if slot.owner is not None and slot.owner() is not None:
        raise RuntimeError(
            f"offload slot {offset} of pool {pool} still holds an activation of an earlier forward "
            "whose backward has not run; the offload plan keeps one forward per compiled graph in "
            "flight. Run backward (or drop the earlier outputs) before the next forward, run extra "
            "forwards under torch.no_grad(), or set graphopt.config.offload_activations=False")


# --- registration ---------------------------------------------------------------------------------

_LIB = torch.library.Library("graphopt", "FRAGMENT")
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


class _Op:
    """A ``graphopt::`` op registered with the dispatcher directly: a schema, a kernel per device
    and a fake (meta) implementation. ``torch.library.custom_op`` would add its autograd and
    aliasing checks to every call (the four calls of one offloaded tensor took 212 us of host time
    with them and 140 us without, measured on CPU), and these ops run only inside compiled graphs,
    where autograd is off and the schema says what aliases."""

    def __init__(self, schema: str, doc: str):
        self.name = schema.split("(", 1)[0]
        _LIB.define(schema)
        self.overload = getattr(torch.ops.graphopt, self.name).default
        self.__doc__ = doc

    def register_fake(self, fn):
        torch.library.register_fake(f"graphopt::{self.name}", fn, lib=_LIB)
        return fn

    def register_kernel(self, device: str):
        def register(fn):
            _LIB.impl(self.name, fn, _DISPATCH_KEYS[device])
            return fn
        return register

    def __call__(self, *args):
        return self.overload(*args)


# --- graphopt::offload ----------------------------------------------------------------------------

offload = _Op("offload(Tensor x, str pool, int pool_nbytes, int offset, int kept_numel, int[] stride) "
              "-> Tensor",
              "Start copying ``x``'s memory after its first ``kept_numel`` elements to the host slot.")


@offload.register_fake
def _(x, pool, pool_nbytes, offset, kept_numel, stride):
    return x.new_empty(0)


def _stage(slot: _Slot, x: Tensor, stride: list[int]) -> Tensor:
    """x in the planned layout; a copy, when one is needed, is kept in the slot for offload_wait."""
    staged = _planned_layout(x, stride)
    slot.staged = staged if staged is not x else None
    return staged


@offload.register_kernel("cpu")
def _(x, pool, pool_nbytes, offset, kept_numel, stride):
    slot = _slot(pool, offset)
    _claim(slot, pool, offset)
    tail = _flat(_stage(slot, x, stride))[kept_numel:]
    _pool(pool, pool_nbytes).slot(offset, tail.numel(), x.dtype).copy_(tail)
    return x.new_empty(0)


@offload.register_kernel("cuda")
def _(x, pool, pool_nbytes, offset, kept_numel, stride):
    slot = _slot(pool, offset)
    _claim(slot, pool, offset)
    tail = _flat(_stage(slot, x, stride))[kept_numel:]
    host = _pool(pool, pool_nbytes).slot(offset, tail.numel(), x.dtype)
    d2h, _ = _streams(x.device)
    _follow(d2h, slot, x.device)
    with torch.cuda.stream(d2h):
        host.copy_(tail, non_blocking=True)
        if slot.offload_event is None:
            slot.offload_event = torch.cuda.Event()
        slot.offload_event.record(d2h)
    return x.new_empty(0)


# --- graphopt::offload_wait -----------------------------------------------------------------------

offload_wait = _Op("offload_wait(Tensor ticket, Tensor x, str pool, int offset, int kept_numel, "
                   "int[] stride) -> Tensor",
                   "Order the compute stream after the copy; return the kept head of ``x`` as a fresh "
                   "tensor.")


@offload_wait.register_fake
def _(ticket, x, pool, offset, kept_numel, stride):
    return x.new_empty(kept_numel)


def _keep_head(x: Tensor, pool: str, offset: int, kept_numel: int, stride) -> Tensor:
    slot = _slot(pool, offset)
    staged, slot.staged = slot.staged, None
    kept = _flat(staged if staged is not None else _planned_layout(x, stride))[:kept_numel].clone()
    slot.owner = weakref.ref(kept)
    return kept


@offload_wait.register_kernel("cpu")
def _(ticket, x, pool, offset, kept_numel, stride):
    return _keep_head(x, pool, offset, kept_numel, stride)


@offload_wait.register_kernel("cuda")
def _(ticket, x, pool, offset, kept_numel, stride):
    slot = _slot(pool, offset)
    event = slot.offload_event
    if event is None:
        raise RuntimeError(f"graphopt::offload_wait for slot {offset} of pool {pool} ran before its "
                           "graphopt::offload; the graph's order of offload ops is broken")
    # The kept head is read before the wait (it does not depend on the copy); the staged layout,
    # which the copy reads, is released only after the wait is on the compute stream.
    staged = slot.staged
    kept = _keep_head(x, pool, offset, kept_numel, stride)
    torch.cuda.current_stream(x.device).wait_event(event)
    del staged
    return kept


# --- graphopt::reload -----------------------------------------------------------------------------

reload = _Op("reload(Tensor kept, str pool, int pool_nbytes, int offset, int numel) -> Tensor",
             "Allocate the activation's memory, fill its head from ``kept``, start the host -> device "
             "copy.")


@reload.register_fake
def _(kept, pool, pool_nbytes, offset, numel):
    return kept.new_empty(0)


def _begin_reload(kept: Tensor, pool: str, pool_nbytes: int, offset: int, numel: int):
    slot = _slot(pool, offset)
    if slot.owner is None or slot.owner() is not kept:
        # The pool may still hold the data (kept is a new Python object for the same tensor only
        # under saved-tensor hooks); the size check in HostPool.slot still guards the bounds.
        log.debug("reload of slot %d of pool %s with a kept tensor it did not record", offset, pool)
    flat = torch.empty(numel, dtype=kept.dtype, device=kept.device)
    flat[:kept.numel()].copy_(kept)
    host = _pool(pool, pool_nbytes).slot(offset, numel - kept.numel(), kept.dtype)
    slot.reloaded = flat
    return slot, flat[kept.numel():], host


@reload.register_kernel("cpu")
def _(kept, pool, pool_nbytes, offset, numel):
    _, tail, host = _begin_reload(kept, pool, pool_nbytes, offset, numel)
    tail.copy_(host)
    return kept.new_empty(0)


@reload.register_kernel("cuda")
def _(kept, pool, pool_nbytes, offset, numel):
    slot, tail, host = _begin_reload(kept, pool, pool_nbytes, offset, numel)
    _, h2d = _streams(kept.device)
    _follow(h2d, slot, kept.device)  # tail's block may be freshly reused
    with torch.cuda.stream(h2d):
        tail.copy_(host, non_blocking=True)
        if slot.reload_event is None:
            slot.reload_event = torch.cuda.Event()
        slot.reload_event.record(h2d)
    return kept.new_empty(0)


# --- graphopt::reload_wait ------------------------------------------------------------------------

reload_wait = _Op("reload_wait(Tensor ticket, str pool, int offset, int[] shape, int[] stride) -> Tensor",
                  "Order the compute stream after the reload; return the activation with its shape and "
                  "strides.")


@reload_wait.register_fake
def _(ticket, pool, offset, shape, stride):
    return torch.empty_strided(shape, stride, dtype=ticket.dtype, device=ticket.device)


def _finish_reload(pool: str, offset: int, shape, stride) -> Tensor:
    slot = _SLOTS.get((pool, offset))
    if slot is None or slot.reloaded is None:
        raise RuntimeError(f"graphopt::reload_wait for slot {offset} of pool {pool} has no reload in "
                           "flight; the graph's order of reload ops is broken")
    flat, slot.reloaded = slot.reloaded, None
    return flat.as_strided(shape, stride)


@reload_wait.register_kernel("cpu")
def _(ticket, pool, offset, shape, stride):
    return _finish_reload(pool, offset, shape, stride)


@reload_wait.register_kernel("cuda")
def _(ticket, pool, offset, shape, stride):
    event = _SLOTS[(pool, offset)].reload_event if (pool, offset) in _SLOTS else None
    if event is not None:
        torch.cuda.current_stream(ticket.device).wait_event(event)
    return _finish_reload(pool, offset, shape, stride)


for _op in (offload, offload_wait, reload, reload_wait):
    _compat.mark_side_effectful(_op.overload)
