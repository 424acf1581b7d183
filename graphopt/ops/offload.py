"""Offload and reload of saved activations through a pinned host pool per plan.

A plan (``graphopt.passes.offload_activations``) gives every offloaded activation a slot: an index
and a byte range of the plan's host *pool*. The pool holds one pinned buffer (a *generation*) per
forward in flight, allocated at the first step with the size the plan asked for and reused by every
later step, so offload never allocates pinned memory per step and never fragments it. Under
dynamic shapes the plan's offsets and sizes are expressions of the graph's symbols, evaluated per
step: a generation grows (once) to the largest size a step asks for.

An activation ``x`` is laid out as the plan's ``stride`` says (its own strides when its memory
is dense; a view with gaps is first copied into that packed layout on the device) and, as
``numel`` elements in memory order, split along its outermost memory dimension -- the token
dimension of ``[B, S, ...]`` activations: the first ``kept_numel`` elements stay on the device,
the rest go to the host. The reload comes back dense, in that layout.

Forward (the compute stream never waits on the host)::

    ticket = graphopt::offload(x, pool, pool_nbytes, slot, offset, kept_numel, stride)
        # side stream waits for the compute stream, copies x[kept_numel:] -> pool[offset:]
    kept = graphopt::offload_wait(ticket, x, pool, slot, kept_numel, stride)
        # compute stream waits for the copy's event; kept = x[:kept_numel] (a fresh tensor)
        # x's last use: its memory goes back to the allocator, ordered after the copy

Backward::

    ticket = graphopt::reload(kept, pool, slot, numel)
        # allocates x's memory on the compute stream, copies kept into its head there; the
        # reload stream waits for the compute stream and copies the slot's bytes into the tail
    x = graphopt::reload_wait(ticket, pool, slot, shape, stride)
        # compute stream waits for the reload's event; x is the reloaded tensor

Tickets are empty tensors that carry the data dependencies (so no compiler drops or hoists a wait
above its copy) and the dtype; each wait finds its copy by its ticket. CPU tensors run the same
function synchronously: the copy goes to a separate host buffer, so CPU tests check the numerics.

**Forwards in flight.** A slot's bytes belong to one forward until that forward's ``kept`` tensor
dies (its autograd graph was freed, by its backward or by the caller dropping it). A second
forward of the same graph before the first one's backward (a siamese loss, two instances of one
architecture sharing a compiled graph) gets the next generation of the pool: each activation goes
to the first generation whose bytes at its range no live forward holds, and the reload finds it by
its ``kept`` tensor. At most ``MAX_FORWARDS_IN_FLIGHT`` generations: one more raises, naming the fix.

**A step that raises** between a copy and its wait (an out-of-memory error caught by a
batch-size search) drops the copy's ticket with the graph's frames: the cell lets go of its claim
and of the device memory the copy used, so the next step finds its slots free
(``pool_stats()["abandoned_copies"]`` counts them).

**Lifetime.** A pool is named ``<owner>/<layout>``: the owner is the compiled graph's content key
(the same in every process, so code from Inductor's cache names the same pools) and the layout a
digest of its slots. The backend ``hold``s an owner for as long as a compiled graph of it lives
(``torch._dynamo.reset()``, garbage collection of the compiled model); when the last holder goes,
the owner's pools are freed -- at once where idle, else when the last live forward's ``kept``
tensors die. Pools of owners nobody holds (the ops called directly) live until ``release_pool``.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from typing import Callable, Optional

import torch
from torch import Tensor

from graphopt import _compat

log = logging.getLogger("graphopt.ops.offload")

__all__ = ["SLOT_ALIGNMENT", "MAX_FORWARDS_IN_FLIGHT", "HostPool", "hold", "pool_owner", "pool_stats",
           "release_pool", "release_pools", "offload", "offload_wait", "reload", "reload_wait"]

SLOT_ALIGNMENT = 512  # bytes; every slot starts at a multiple, so any dtype view of a slot is aligned
# Generations of one pool: forwards of one compiled graph whose backward has not run yet. Each holds
# the plan's pool bytes of pinned memory; a training step has one or two (siamese losses).
MAX_FORWARDS_IN_FLIGHT = 8


@dataclasses.dataclass(eq=False)
class _Cell:
    """One slot of one generation: the bytes of one offloaded activation of one forward."""

    generation: "_Generation"
    start: int = 0
    end: int = 0
    pending: bool = False                 # offload issued, offload_wait not yet run
    owner: Optional[weakref.ref] = None   # the forward's kept tensor; the bytes are held while it lives
    # the offload's or the reload's ticket (weakly: a step that raises before the wait drops it,
    # and with it the cell's claim), until its wait
    ticket: Optional[weakref.ref] = None
    offload_event: object = None          # torch.cuda.Event of the last device -> host copy
    reload_event: object = None           # torch.cuda.Event of the last host -> device copy
    issue_event: object = None            # torch.cuda.Event a copy stream waits on before a copy
    reloaded: Optional[Tensor] = None     # flat device memory between reload and reload_wait
    # x copied into the planned layout (when its own is another): the side stream reads it, so it
    # lives until offload_wait has ordered the compute stream after the copy
    staged: Optional[Tensor] = None

    @property
    def busy(self) -> bool:
        return self.pending or (self.owner is not None and self.owner() is not None)


@dataclasses.dataclass(eq=False)
class _Generation:
    buffer: Tensor
    cells: dict[int, _Cell] = dataclasses.field(default_factory=dict)  # slot -> its cell here

    def busy_cells(self) -> list[_Cell]:
        return [cell for cell in self.cells.values() if cell.busy]


class HostPool:
    """One plan's host memory (pinned where CUDA exists): a buffer per forward in flight, carved
    into the plan's slots by offset."""

    def __init__(self, name: str):
        self.name = name
        self.pinned = torch.cuda.is_available()
        self.generations: list[_Generation] = []

    @property
    def owner(self) -> str:
        return self.name.rpartition("/")[0]

    @property
    def nbytes(self) -> int:
        return sum(generation.buffer.numel() for generation in self.generations)

    def idle(self) -> bool:
        return not any(generation.busy_cells() for generation in self.generations)

    def _buffer(self, nbytes: int) -> Tensor:
        buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)
        _STATS["pool_allocations"] += 1
        log.info("offload pool %s, generation %d: %d bytes of %s host memory", self.name,
                 len(self.generations), nbytes, "pinned" if self.pinned else "pageable")
        return buffer

    def claim(self, slot: int, start: int, end: int, pool_nbytes: int) -> _Cell:
        """The cell of ``slot`` in the first generation where no live forward holds bytes in
        [start, end) and whose buffer holds ``pool_nbytes`` (an idle one grows to it)."""
        if start % SLOT_ALIGNMENT or end > pool_nbytes:
            raise RuntimeError(
                f"offload slot {slot} [{start}, {end}) does not fit pool {self.name} of {pool_nbytes} "
                f"bytes (or is not {SLOT_ALIGNMENT}-byte aligned); the plan and the compiled graph "
                "disagree -- recompile (torch._dynamo.reset()) after changing it")
        for generation in self.generations:
            held = generation.busy_cells()
            mine = generation.cells.get(slot)
            if (mine is not None and mine.busy
                    or any(cell.start < end and start < cell.end for cell in held)):
                continue
            if generation.buffer.numel() < pool_nbytes:
                if held:
                    continue  # growing would move bytes a live forward holds
                generation.buffer = self._buffer(pool_nbytes)  # a larger step (dynamic shapes)
            return self._cell(generation, slot, start, end)
        if len(self.generations) >= MAX_FORWARDS_IN_FLIGHT:
            raise RuntimeError(
                f"offload pool {self.name}: {len(self.generations)} forwards of this compiled graph "
                f"hold offloaded activations (at most {MAX_FORWARDS_IN_FLIGHT} are kept in flight, "
                f"{self.generations[0].buffer.numel()} pinned bytes each) and another one started "
                "before any of their backwards ran. Run backward (or drop the earlier outputs) "
                "before the next forward, run extra forwards under torch.no_grad(), or set "
                "graphopt.config.offload_activations=False")
        generation = _Generation(self._buffer(pool_nbytes))
        self.generations.append(generation)
        return self._cell(generation, slot, start, end)

    @staticmethod
    def _cell(generation: _Generation, slot: int, start: int, end: int) -> _Cell:
        cell = generation.cells.get(slot)
        if cell is None:
            cell = generation.cells[slot] = _Cell(generation)
        cell.start, cell.end, cell.pending, cell.owner = start, end, True, None
        return cell

    def bytes_of(self, cell: _Cell, dtype: torch.dtype) -> Tensor:
        return cell.generation.buffer[cell.start:cell.end].view(dtype)

    def by_ticket(self, slot: int, ticket: Tensor, what: str) -> _Cell:
        for generation in self.generations:
            cell = generation.cells.get(slot)
            if cell is not None and cell.ticket is not None and cell.ticket() is ticket:
                return cell
        raise RuntimeError(f"graphopt::{what} for slot {slot} of pool {self.name} has no copy in "
                           "flight with its ticket; the graph's order of offload ops is broken")

    def by_owner(self, slot: int, kept: Tensor) -> _Cell:
        """The cell whose forward saved ``kept``; where saved-tensor hooks handed back another
        Python object for it, the one live forward holding this slot."""
        cells = [g.cells[slot] for g in self.generations if slot in g.cells and g.cells[slot].busy]
        for cell in cells:
            if cell.owner is not None and cell.owner() is kept:
                return cell
        if len(cells) == 1:
            log.debug("reload of slot %d of pool %s with a kept tensor it did not record", slot,
                      self.name)
            return cells[0]
        raise RuntimeError(
            f"graphopt::reload of slot {slot} of pool {self.name}: {len(cells)} forwards in flight "
            "hold this slot and none saved this tensor (saved-tensor hooks replaced it?); "
            "run one forward per backward with offload_activations, or switch it off")


_POOLS: dict[str, HostPool] = {}
_HOLDERS: dict[str, int] = {}    # owner -> compiled graphs alive that name its pools
_STREAMS: dict[torch.device, tuple] = {}
_STATS = {"pool_allocations": 0, "abandoned_copies": 0, "staged_copies": 0, "staged_bytes": 0}


def pool_owner(content_key: str) -> str:
    """The owner part of the pool names a compiled graph of this content key uses."""
    return f"offload-{content_key}"


def hold(owner: str) -> Callable[[], None]:
    """Keep the pools of ``owner`` (a compiled graph's content key) while the caller lives; returns
    the release to call when it goes (the backend ties it to the compiled graph)."""
    _HOLDERS[owner] = _HOLDERS.get(owner, 0) + 1

    def release() -> None:
        _HOLDERS[owner] -= 1
        if _HOLDERS[owner] == 0:
            for pool in [pool for pool in _POOLS.values() if pool.owner == owner]:
                _free_if_orphaned(pool)
    return release


def _free_if_orphaned(pool: HostPool) -> None:
    """Free ``pool`` once no compiled graph holds its owner and no forward holds its bytes."""
    if _HOLDERS.get(pool.owner) == 0 and pool.idle() and _POOLS.get(pool.name) is pool:
        release_pool(pool.name)


def release_pool(pool: str) -> None:
    """Free a plan's pool (its compiled graph is gone)."""
    _POOLS.pop(pool, None)


def release_pools() -> None:
    """Free every plan's pool (for example between benchmark runs)."""
    _POOLS.clear()


def pool_stats() -> dict[str, int]:
    """Pool buffers allocated so far, host bytes the pools hold now, pools, generations (forwards
    in flight at most so far), slots, slots a live forward holds, reloads in flight; and since the
    process started: copies whose step raised before their wait (``abandoned_copies``), and
    activations copied into the planned layout on the device first (``staged_copies``,
    ``staged_bytes``: the compiled tensor's strides were not the plan's, a device copy each step)."""
    cells = [cell for pool in _POOLS.values() for g in pool.generations for cell in g.cells.values()]
    return {"pool_allocations": _STATS["pool_allocations"],
            "host_bytes": sum(pool.nbytes for pool in _POOLS.values()), "pools": len(_POOLS),
            "generations": sum(len(pool.generations) for pool in _POOLS.values()),
            "slots": len(cells), "slots_held": sum(cell.busy for cell in cells),
            "reloads_in_flight": sum(cell.reloaded is not None for cell in cells),
            "abandoned_copies": _STATS["abandoned_copies"], "staged_copies": _STATS["staged_copies"],
            "staged_bytes": _STATS["staged_bytes"]}


def _pool(name: str) -> HostPool:
    pool = _POOLS.get(name)
    if pool is None:
        pool = _POOLS[name] = HostPool(name)
    return pool


def _ticket(cell: _Cell, like: Tensor) -> Tensor:
    """A new ticket for the cell's copy in flight. Where the ticket dies before its wait ran (the
    step raised in between and the graph's frames went), the cell lets go of the claim, the staged
    layout and the reload's device memory, so a failed step holds no slot and no memory; a reload
    still copying into that memory is waited for on the compute stream first, so the allocator
    cannot hand its block to new work while the copy writes it."""
    ticket = like.new_empty(0)

    def dropped(ref, cell=cell) -> None:
        if cell.ticket is not ref:
            return  # its wait ran
        _STATS["abandoned_copies"] += 1
        if cell.reloaded is not None and cell.reload_event is not None and cell.reloaded.is_cuda:
            torch.cuda.current_stream(cell.reloaded.device).wait_event(cell.reload_event)
        cell.ticket, cell.pending, cell.staged, cell.reloaded = None, False, None, None

    cell.ticket = weakref.ref(ticket, dropped)
    return ticket


def _flat(x: Tensor) -> Tensor:
    """x's dense memory as a 1-D tensor in memory order (x is non-overlapping and dense)."""
    return x.as_strided((x.numel(),), (1,), x.storage_offset())


def _planned_layout(x: Tensor, stride: list[int]) -> Tensor:
    """x with the strides the plan saw (a compiler may have picked another layout for it), so the
    memory order that offload splits is the one reload restores."""
    if list(x.stride()) == list(stride):
        return x
    _STATS["staged_copies"] += 1
    _STATS["staged_bytes"] += x.numel() * x.dtype.itemsize
    return torch.empty_strided(x.shape, stride, dtype=x.dtype, device=x.device).copy_(x)


def _streams(device: torch.device):
    """(device -> host stream, host -> device stream) of one GPU, created once."""
    streams = _STREAMS.get(device)
    if streams is None:
        streams = _STREAMS[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
    return streams


def _copy_after_compute(stream, cell: _Cell, dst: Tensor, src: Tensor, event: str,
                        device: torch.device) -> None:
    """``dst <- src`` on the copy ``stream``, ordered after the work queued so far on the compute
    stream (the cell's own issue event, recorded anew each time: a wait binds to the record before
    it); the cell's event named ``event`` records the copy's end."""
    if cell.issue_event is None:
        cell.issue_event = torch.cuda.Event()
    cell.issue_event.record(torch.cuda.current_stream(device))
    stream.wait_event(cell.issue_event)
    with torch.cuda.stream(stream):
        dst.copy_(src, non_blocking=True)
        if getattr(cell, event) is None:
            setattr(cell, event, torch.cuda.Event())
        getattr(cell, event).record(stream)


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

offload = _Op("offload(Tensor x, str pool, SymInt pool_nbytes, int slot, SymInt offset, "
              "SymInt kept_numel, SymInt[] stride) -> Tensor",
              "Start copying ``x``'s memory after its first ``kept_numel`` elements to the host slot.")


@offload.register_fake
def _(x, pool, pool_nbytes, slot, offset, kept_numel, stride):
    return x.new_empty(0)


def _begin_offload(x: Tensor, pool: str, pool_nbytes: int, slot: int, offset: int,
                   kept_numel: int, stride: list[int]):
    """Claim the slot's bytes for this forward; (cell, the tail to copy, its host bytes, ticket)."""
    host_pool = _pool(pool)
    tail_numel = x.numel() - kept_numel
    cell = host_pool.claim(slot, offset, offset + tail_numel * x.dtype.itemsize, pool_nbytes)
    staged = _planned_layout(x, stride)
    cell.staged = staged if staged is not x else None
    return cell, _flat(staged)[kept_numel:], host_pool.bytes_of(cell, x.dtype), _ticket(cell, x)


@offload.register_kernel("cpu")
def _(x, pool, pool_nbytes, slot, offset, kept_numel, stride):
    _, tail, host, ticket = _begin_offload(x, pool, pool_nbytes, slot, offset, kept_numel, stride)
    host.copy_(tail)
    return ticket


@offload.register_kernel("cuda")
def _(x, pool, pool_nbytes, slot, offset, kept_numel, stride):
    cell, tail, host, ticket = _begin_offload(x, pool, pool_nbytes, slot, offset, kept_numel, stride)
    d2h, _ = _streams(x.device)
    _copy_after_compute(d2h, cell, host, tail, "offload_event", x.device)
    return ticket


# --- graphopt::offload_wait -----------------------------------------------------------------------

offload_wait = _Op("offload_wait(Tensor ticket, Tensor x, str pool, int slot, SymInt kept_numel, "
                   "SymInt[] stride) -> Tensor",
                   "Order the compute stream after the copy; return the kept head of ``x`` as a fresh "
                   "tensor.")


@offload_wait.register_fake
def _(ticket, x, pool, slot, kept_numel, stride):
    return x.new_empty(kept_numel)


def _keep_head(cell: _Cell, pool: HostPool, x: Tensor, kept_numel: int, stride) -> Tensor:
    """The kept head of ``x``, a fresh tensor; from now on it holds the cell's bytes for this
    forward, until it dies."""
    staged, cell.staged = cell.staged, None
    kept = _flat(staged if staged is not None else _planned_layout(x, stride))[:kept_numel].clone()
    cell.ticket, cell.pending = None, False

    def freed(_ref, pool=pool) -> None:
        _free_if_orphaned(pool)

    cell.owner = weakref.ref(kept, freed)
    return kept


@offload_wait.register_kernel("cpu")
def _(ticket, x, pool, slot, kept_numel, stride):
    host_pool = _pool(pool)
    return _keep_head(host_pool.by_ticket(slot, ticket, "offload_wait"), host_pool, x, kept_numel,
                      stride)


@offload_wait.register_kernel("cuda")
def _(ticket, x, pool, slot, kept_numel, stride):
    host_pool = _pool(pool)
    cell = host_pool.by_ticket(slot, ticket, "offload_wait")
    # The kept head is read before the wait (it does not depend on the copy); the staged layout,
    # which the copy reads, is released only after the wait is on the compute stream.
    staged = cell.staged
    kept = _keep_head(cell, host_pool, x, kept_numel, stride)
    torch.cuda.current_stream(x.device).wait_event(cell.offload_event)
    del staged
    return kept


# --- graphopt::reload -----------------------------------------------------------------------------

reload = _Op("reload(Tensor kept, str pool, int slot, SymInt numel) -> Tensor",
             "Allocate the activation's memory, fill its head from ``kept``, start the host -> device "
             "copy.")


@reload.register_fake
def _(kept, pool, slot, numel):
    return kept.new_empty(0)


def _begin_reload(kept: Tensor, pool: str, slot: int, numel: int):
    host_pool = _POOLS.get(pool)
    if host_pool is None:
        raise RuntimeError(f"graphopt::reload of slot {slot}: offload pool {pool} was released while "
                           "a forward's activations were in it (graphopt.ops.offload.release_pool "
                           "called between forward and backward)")
    cell = host_pool.by_owner(slot, kept)
    flat = torch.empty(numel, dtype=kept.dtype, device=kept.device)
    flat[:kept.numel()].copy_(kept)
    cell.reloaded = flat
    return cell, flat[kept.numel():], host_pool.bytes_of(cell, kept.dtype), _ticket(cell, kept)


@reload.register_kernel("cpu")
def _(kept, pool, slot, numel):
    _, tail, host, ticket = _begin_reload(kept, pool, slot, numel)
    tail.copy_(host)
    return ticket


@reload.register_kernel("cuda")
def _(kept, pool, slot, numel):
    cell, tail, host, ticket = _begin_reload(kept, pool, slot, numel)
    _, h2d = _streams(kept.device)
    # after the compute stream's queued work: tail's block may be freshly reused
    _copy_after_compute(h2d, cell, tail, host, "reload_event", kept.device)
    return ticket


# --- graphopt::reload_wait ------------------------------------------------------------------------

reload_wait = _Op("reload_wait(Tensor ticket, str pool, int slot, SymInt[] shape, SymInt[] stride) "
                  "-> Tensor",
                  "Order the compute stream after the reload; return the activation with its shape and "
                  "strides.")


@reload_wait.register_fake
def _(ticket, pool, slot, shape, stride):
    return torch.empty_strided(shape, stride, dtype=ticket.dtype, device=ticket.device)


def _finish_reload(ticket: Tensor, pool: str, slot: int) -> _Cell:
    host_pool = _POOLS.get(pool)
    if host_pool is None:
        raise RuntimeError(f"graphopt::reload_wait for slot {slot}: offload pool {pool} is gone")
    cell = host_pool.by_ticket(slot, ticket, "reload_wait")
    cell.ticket = None
    return cell


@reload_wait.register_kernel("cpu")
def _(ticket, pool, slot, shape, stride):
    cell = _finish_reload(ticket, pool, slot)
    flat, cell.reloaded = cell.reloaded, None
    return flat.as_strided(shape, stride)


@reload_wait.register_kernel("cuda")
def _(ticket, pool, slot, shape, stride):
    cell = _finish_reload(ticket, pool, slot)
    torch.cuda.current_stream(ticket.device).wait_event(cell.reload_event)
    flat, cell.reloaded = cell.reloaded, None
    return flat.as_strided(shape, stride)


for _op in (offload, offload_wait, reload, reload_wait):
    _compat.mark_side_effectful(_op.overload)
