"""Symmetric-memory workspaces for the tile-triggered kernel and the copy-engine runtime.

A workspace holds, on every rank of a group, at the same shape:
- ``partial``: the rank's un-reduced GEMM output [M, N] (the kernel's GEMM CTAs write tiles here);
- ``flags``: [P, tiles] int32; when rank p's GEMM CTA has written tile t it stores the current epoch
  into ``flags[p][t]`` of EVERY rank (release, system scope); a communication CTA waits on its own
  rank's copy (acquire, a local poll) until all P entries equal the epoch, then reads the tiles;
- ``epoch``: a device int32 bumped on the stream before every call, so flags never need resetting
  and no host value changes between calls (CUDA-graph safe: no host sync, no new allocation);
- ``partial_ptrs`` / ``flag_ptrs``: device arrays of every rank's base pointers (peer P2P mappings).

Workspaces are cached by (group, shape, dtype, device) and reused across calls. Before each call the
kernel's caller runs the symmetric-memory barrier, so no rank overwrites ``partial`` while a peer may
still read the previous call's tiles. NVLink multicast is never used.

Bounded: at most ``MAX_WORKSPACES`` workspaces are kept (dynamic shapes make one per row count);
the least recently used goes first, after the device has finished its work, at the same call on
every rank (ranks make the same calls in the same order, so they evict the same one). The backend
drops them all when no graph graphopt compiled is alive (``clear_cache``).

Availability is feature-detected (``available()``): CUDA, torch's ``_symmetric_memory`` with
``empty``/``rendezvous``, and triton. Where it is False the cost model never picks the tile runtime.

The copy-engine runtime (``graphopt.ops.matmul_collectives``, mode "copy_engine") needs less: one
symmetric [M, N] buffer per rank and its peers' views (``copy_engine_workspace``), a high-priority
communication stream, and a stream-ordered barrier (``copy_engine_available()``: no triton needed):
symmetric flags written and waited by the CUDA driver's stream memory operations, or, where the
driver's entry points cannot be found, the handle's signal-pad barrier kernel.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
from typing import Optional

import torch

from graphopt import _compat
from graphopt.distributed import cuda_driver, graph_replay

log = logging.getLogger("graphopt.distributed.symm_mem")


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """True where the tile-triggered runtime can run (CUDA + symmetric memory + triton)."""
    if not torch.cuda.is_available():
        return False
    module = _compat.symmetric_memory()
    if module is None or not all(hasattr(module, name) for name in ("empty", "rendezvous")):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@dataclasses.dataclass
class TileWorkspace:
    partial: torch.Tensor
    flags: torch.Tensor
    epoch: torch.Tensor
    partial_ptrs: torch.Tensor
    flag_ptrs: torch.Tensor
    handle: object
    rank: int
    world_size: int

    def barrier(self) -> None:
        """All ranks have finished reading the previous call's tiles (a device-side barrier)."""
        self.handle.barrier(channel=0)

    def next_epoch(self) -> torch.Tensor:
        self.epoch.add_(1)
        return self.epoch


_WORKSPACES: collections.OrderedDict[tuple, object] = collections.OrderedDict()
# Workspaces kept (each a symmetric [M, N] buffer plus flags, and its CUDA graphs): the sites of a
# model's layer in forward and backward fit many times over.
MAX_WORKSPACES = 32


def _cached(key: tuple, allocate) -> object:
    """The workspace under ``key``, allocated (a collective) on a miss; the least recently used
    beyond ``MAX_WORKSPACES`` is dropped once the device is idle."""
    workspace = _WORKSPACES.get(key)
    if workspace is not None:
        _WORKSPACES.move_to_end(key)
        return workspace
    if len(_WORKSPACES) >= MAX_WORKSPACES:
        torch.cuda.synchronize()  # no queued kernel or copy still reads the evicted buffers
        evicted, _ = _WORKSPACES.popitem(last=False)
        log.info("symmetric workspace %s evicted (%d kept at most)", evicted, MAX_WORKSPACES)
    workspace = _WORKSPACES[key] = allocate()
    return workspace


def tile_workspace(group_name: str, m: int, n: int, dtype: torch.dtype, device: torch.device,
                   num_tiles: int) -> TileWorkspace:
    """The cached workspace for this group and shape (a collective call the first time)."""
    if not available():
        raise RuntimeError("symmetric memory is unavailable here (needs CUDA, torch "
                           "distributed._symmetric_memory and triton); use the chunked runtime")
    key = (group_name, m, n, dtype, device, num_tiles)
    return _cached(key, lambda: _allocate(group_name, m, n, dtype, device, num_tiles))


def _allocate(group_name: str, m: int, n: int, dtype: torch.dtype, device: torch.device,
              num_tiles: int) -> TileWorkspace:
    partial, partial_handle, partial_peers = _compat.symmetric_tensor((m, n), dtype, device, group_name)
    flags, _, flag_peers = _compat.symmetric_tensor((num_tiles,), torch.int32, device, group_name)
    flags.zero_()
    torch.cuda.synchronize(device)
    partial_handle.barrier(channel=0)  # every rank's flags are zero before anyone publishes
    pointers = functools.partial(torch.tensor, dtype=torch.int64, device=device)
    log.info("symmetric workspace for group %s: [%d, %d] %s, %d tiles", group_name, m, n, dtype,
             num_tiles)
    return TileWorkspace(
        partial=partial, flags=flags, epoch=torch.zeros(1, dtype=torch.int32, device=device),
        partial_ptrs=pointers([t.data_ptr() for t in partial_peers]),
        flag_ptrs=pointers([t.data_ptr() for t in flag_peers]),
        handle=partial_handle, rank=partial_handle.rank, world_size=partial_handle.world_size)


@functools.lru_cache(maxsize=1)
def copy_engine_available() -> bool:
    """True where the copy-engine runtime can run (CUDA + symmetric memory with a barrier)."""
    if not torch.cuda.is_available():
        return False
    module = _compat.symmetric_memory()
    return module is not None and all(hasattr(module, name) for name in ("empty", "rendezvous"))


# Signal-pad channel of the fallback barrier (the tile workspace uses channel 0 of its own buffer).
COPY_ENGINE_CHANNEL = 1
# Synchronisations (barriers and hand-offs) one copy-engine call may use: (P - 1) * chunks +
# chunks + 1 at most (at any taper).
MAX_SYNCS = 128
# Enqueue a barrier's 3 (P - 1) stream memory operations in one driver call (cuStreamBatchMemOp)
# where the driver takes it (``cuda_driver.stream_memops`` falls back by itself); the bench sets
# False to time one call each.
BATCH_MEMOPS = True
# Phase-1 steps of the copy-engine runtime hand off between two ranks (``handoff``); False runs a
# barrier of every rank there instead, as before hand-offs existed (the bench times both at P > 2).
HANDOFFS = True


@dataclasses.dataclass
class CopyEngineWorkspace:
    """One rank's symmetric [M, N] buffer, every rank's view of it, the communication stream, and
    symmetric flags ``[MAX_SYNCS, P]``, one row per synchronisation of a call: barrier s sets
    ``flags[s][r]`` to 1 on every peer, waits until its own ``flags[s][q]`` is 1 for every peer q,
    and resets them to 0; hand-off s does the same with one destination and one source. A slot is
    written again only in the next call, after barriers that follow the reset on every rank (so a
    call must end with a barrier after its hand-offs; every copy-engine call does)."""

    partial: torch.Tensor
    peers: list[torch.Tensor]
    handle: object
    comm_stream: torch.cuda.Stream
    rank: int
    world_size: int
    flag_ptrs: Optional[list[int]]    # every rank's flags base address; None: handle.barrier
    flags: Optional[torch.Tensor] = None
    next_sync: int = 0
    events: list = dataclasses.field(default_factory=list)   # reused by every call, in order
    _barrier_cache: dict = dataclasses.field(default_factory=dict)
    # CUDA graphs of this workspace's calls (graph_replay); they bake in its buffers and flags, so
    # they live and die with it.
    graphs: graph_replay.GraphReplay = dataclasses.field(default_factory=graph_replay.GraphReplay)

    def begin_call(self) -> None:
        self.next_sync = 0

    def barrier(self, stream: Optional[torch.cuda.Stream] = None) -> None:
        """Stream-ordered barrier on ``stream`` (default: the current one; the caller passes it to
        save the lookup on every barrier): what follows runs once every rank has reached it. With
        the driver's stream memory operations it occupies no SM (a barrier kernel queued behind a
        GEMM that holds every SM would wait for the whole GEMM)."""
        self._sync(self._barrier_ops, stream)

    def handoff(self, dest: int, source: int, stream: Optional[torch.cuda.Stream] = None) -> None:
        """Stream-ordered hand-off on ``stream``: signal ``dest`` (this stream's earlier writes are
        visible to it), then wait for ``source``'s signal of the same slot. Where P = 2 (dest ==
        source) it is the barrier; without stream memory operations it falls back to one."""
        if not HANDOFFS:
            self.barrier(stream)
            return
        self._sync(lambda slot: self._handoff_ops(slot, dest, source), stream)

    def _sync(self, ops_of_slot, stream: Optional[torch.cuda.Stream]) -> None:
        """Enqueue the next slot's memory operations (or the signal-pad barrier without them)."""
        if self.flag_ptrs is None:
            self.handle.barrier(channel=COPY_ENGINE_CHANNEL)
            return
        slot = self.next_sync
        if slot >= MAX_SYNCS:
            raise RuntimeError(f"a copy-engine call used more than {MAX_SYNCS} barriers; use fewer chunks")
        self.next_sync += 1
        cuda_driver.stream_memops(stream or torch.cuda.current_stream(), ops_of_slot(slot),
                              batch=BATCH_MEMOPS)

    def _handoff_ops(self, slot: int, dest: int, source: int) -> list[tuple[int, int, int, bool]]:
        """Hand-off ``slot``'s stream memory operations: set ``flags[slot][rank]`` on ``dest``
        (fenced: the rows written before it are visible first), wait until ``flags[slot][source]``
        here is 1 and reset it. The reset is next overwritten by ``source`` in the next call, after
        the call's closing barriers, whose fenced signals follow it."""
        key = (slot, dest, source)
        ops = self._barrier_cache.get(key)
        if ops is None:
            row = slot * self.world_size
            mine = self.flag_ptrs[self.rank] + 4 * (row + source)
            ops = [(cuda_driver.MEMOP_WRITE_32, self.flag_ptrs[dest] + 4 * (row + self.rank), 1, True),
                   (cuda_driver.MEMOP_WAIT_32, mine, 1, False), (cuda_driver.MEMOP_WRITE_32, mine, 0, False)]
            self._barrier_cache[key] = ops
        return ops

    def _barrier_ops(self, slot: int) -> list[tuple[int, int, int, bool]]:
        """Barrier ``slot``'s stream memory operations: signal every peer, wait for every peer's
        signal, reset them. Only the first signal carries a memory fence: it makes this stream's
        earlier writes (the GEMM rows the peers will pull) visible system-wide, and the signals and
        resets after it are ordered behind it on the stream. A reset is next overwritten by a peer's
        signal in the next call, after barriers whose fenced signals follow it."""
        ops = self._barrier_cache.get(slot)
        if ops is None:
            row = slot * self.world_size
            peers = [peer for peer in range(self.world_size) if peer != self.rank]
            ops = [(cuda_driver.MEMOP_WRITE_32, self.flag_ptrs[peer] + 4 * (row + self.rank), 1,
                    index == 0) for index, peer in enumerate(peers)]
            for peer in peers:
                mine = self.flag_ptrs[self.rank] + 4 * (row + peer)
                ops += [(cuda_driver.MEMOP_WAIT_32, mine, 1, False), (cuda_driver.MEMOP_WRITE_32, mine, 0, False)]
            self._barrier_cache[slot] = ops
        return ops


_COMM_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def comm_stream(device: torch.device) -> torch.cuda.Stream:
    """The device's communication stream, shared by the runtimes. High priority: a copy or a
    communication kernel waiting behind GEMM blocks gets the next free SM."""
    stream = _COMM_STREAMS.get(device)
    if stream is None:
        stream = _COMM_STREAMS[device] = torch.cuda.Stream(device, priority=-1)
    return stream


def copy_engine_workspace(group_name: str, m: int, n: int, dtype: torch.dtype,
                          device: torch.device) -> CopyEngineWorkspace:
    """The cached copy-engine workspace for this group and shape (a collective call the first time)."""
    if not copy_engine_available():
        raise RuntimeError("mode='copy_engine' needs CUDA and torch.distributed._symmetric_memory "
                           "(empty, rendezvous); use mode='chunked' here")
    return _cached(("copy_engine", group_name, m, n, dtype, device),
                   lambda: _allocate_copy_engine(group_name, m, n, dtype, device))


def _allocate_copy_engine(group_name: str, m: int, n: int, dtype: torch.dtype,
                          device: torch.device) -> CopyEngineWorkspace:
    partial, handle, peers = _compat.symmetric_tensor((m, n), dtype, device, group_name)
    stream = comm_stream(device)
    flags = flag_ptrs = None
    if cuda_driver.stream_memops_available():
        flags, flag_handle, flag_peers = _compat.symmetric_tensor(
            (MAX_SYNCS, handle.world_size), torch.int32, device, group_name)
        flags.zero_()
        flag_handle.barrier(channel=0)   # every rank's flags are zero before anyone signals
        flag_ptrs = [t.data_ptr() for t in flag_peers]
    log.info("copy-engine workspace for group %s: [%d, %d] %s, barriers: %s", group_name, m, n,
             dtype, "stream memory operations" if flag_ptrs else "signal-pad kernel")
    return CopyEngineWorkspace(
        partial=partial, peers=peers, handle=handle, comm_stream=stream, rank=handle.rank,
        world_size=handle.world_size, flag_ptrs=flag_ptrs, flags=flags)


def replay_stats() -> dict[str, int]:
    """CUDA-graph replay counts of every cached copy-engine workspace, summed (eager, captured,
    replayed, evicted, wasted), and how many workspaces gave up replaying."""
    total = dataclasses.asdict(graph_replay.ReplayStats())
    total["disabled"] = 0
    for workspace in _WORKSPACES.values():
        graphs = getattr(workspace, "graphs", None)
        if graphs is not None:
            for key, value in dataclasses.asdict(graphs.stats).items():
                total[key] += value
            total["disabled"] += graphs.disabled is not None
    return total


def clear_cache() -> None:
    """Drop every cached workspace, and with it the CUDA graphs of its calls, once the device has
    finished the work queued on them (the backend, when no compiled graph is alive; tests)."""
    if _WORKSPACES and torch.cuda.is_available():
        torch.cuda.synchronize()
    _WORKSPACES.clear()
