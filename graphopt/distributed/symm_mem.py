"""Symmetric-memory workspaces for the tile-triggered GEMM + collective kernel.

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

Availability is feature-detected (``available()``): CUDA, torch's ``_symmetric_memory`` with
``empty``/``rendezvous``, and triton. Where it is False the cost model never picks the tile runtime.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import torch

from graphopt import _compat

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


_WORKSPACES: dict[tuple, TileWorkspace] = {}


def tile_workspace(group_name: str, m: int, n: int, dtype: torch.dtype, device: torch.device,
                   num_tiles: int) -> TileWorkspace:
    """The cached workspace for this group and shape (a collective call the first time)."""
    if not available():
        raise RuntimeError("symmetric memory is unavailable here (needs CUDA, torch "
                           "distributed._symmetric_memory and triton); use the chunked runtime")
    key = (group_name, m, n, dtype, device, num_tiles)
    workspace = _WORKSPACES.get(key)
    if workspace is None:
        workspace = _WORKSPACES[key] = _allocate(group_name, m, n, dtype, device, num_tiles)
    return workspace


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


def clear_cache() -> None:
    """Drop every cached workspace (for tests and for freeing memory between phases)."""
    _WORKSPACES.clear()
