"""Point-to-point exchanges for sequence-parallel attention, overlapped with compute.

An :class:`Exchanger` starts one batch of sends and receives (``torch.distributed.batch_isend_irecv``)
and hands back a :class:`Transfer`; ``Transfer.wait()`` makes the caller's stream wait for it. On
CUDA the batch is issued from a dedicated communication stream that first waits for the compute
stream (so every tensor sent is ready), which lets the next step's transfer run under the current
step's kernels; the receive buffers are allocated by the caller on the compute stream and are
recorded on the communication stream so the caching allocator does not reuse them early.

Deadlock freedom: every rank issues the batches of a schedule in the same order, and each batch
pairs a send on one rank with a receive on its peer, so the per-pair message order always matches
(NCCL and gloo both match point-to-point messages per peer in issue order).

A peer that never issues its side (it crashed, runs another graph, or skipped the call) must not
leave this rank waiting for the process group's timeout (30 minutes on gloo): on CPU a wait gives up
after ``timeout_s`` and raises :class:`PeerTimeout` naming the peers. (On CUDA the wait only orders
streams; NCCL's own watchdog bounds it.)
"""

from __future__ import annotations

import functools
from datetime import timedelta
from typing import Optional, Sequence

import torch
import torch.distributed as dist


class PeerTimeout(RuntimeError):
    """A peer did not take part in an exchange within the timeout; the message names it."""


def wait_for_peers(work, timeout_s: Optional[float], what: str) -> None:
    """``work.wait()``, giving up after ``timeout_s`` seconds (None: no limit) with a PeerTimeout."""
    if timeout_s is None:
        work.wait()
        return
    try:
        work.wait(timeout=timedelta(seconds=timeout_s))
    except RuntimeError as err:
        if "timed out" not in str(err).lower() and "timeout" not in str(err).lower():
            raise
        raise PeerTimeout(
            f"graphopt: rank {dist.get_rank()} waited {timeout_s:g} s for {what}, which never "
            "came: the peer runs another graph, skipped this call, or failed (see its error). "
            "Every rank of a sequence-parallel group must run the same compiled model on chunks "
            "of one batch; raise graphopt.config.sp_peer_timeout_s if ranks legitimately drift "
            "further apart (a slow first compile)") from err


class Transfer:
    """Sends and receives in flight; ``wait()`` before reading a receive buffer."""

    def __init__(self, works: list, keep_alive: list[torch.Tensor],
                 timeout_s: Optional[float] = None, peers: Sequence[int] = ()):
        self._works = works
        self._keep_alive = keep_alive  # sent tensors must outlive the send
        self._timeout_s = timeout_s
        self._peers = sorted(set(peers))

    def wait(self) -> None:
        for work in self._works:
            wait_for_peers(work, self._timeout_s, f"point-to-point transfers with global ranks "
                                                  f"{self._peers}")
        self._works = []
        self._keep_alive = []


class Exchanger:
    """Starts P2P batches over ``group`` (ranks given as group ranks)."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device):
        self.group = group
        self.device = device
        self._global = [dist.get_global_rank(group, r) for r in range(dist.get_world_size(group))]
        self._stream = torch.cuda.Stream(device=device) if device.type == "cuda" else None

    def start(self, sends: Sequence[tuple[torch.Tensor, int]],
              recvs: Sequence[tuple[torch.Tensor, int]],
              timeout_s: Optional[float] = None) -> Transfer:
        """Send each (tensor, peer) and receive into each (buffer, peer); returns the transfer,
        whose wait gives up after ``timeout_s`` on CPU."""
        if not sends and not recvs:
            return Transfer([], [])
        ops = [dist.P2POp(dist.isend, tensor, self._global[peer], self.group)
               for tensor, peer in sends]
        ops += [dist.P2POp(dist.irecv, buffer, self._global[peer], self.group)
                for buffer, peer in recvs]
        tensors = [t for t, _ in sends] + [b for b, _ in recvs]
        if self._stream is None:
            peers = [self._global[peer] for _, peer in list(sends) + list(recvs)]
            return Transfer(dist.batch_isend_irecv(ops), tensors, timeout_s, peers)
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            works = dist.batch_isend_irecv(ops)
        for tensor in tensors:
            tensor.record_stream(self._stream)
        return Transfer(works, tensors)


@functools.lru_cache(maxsize=None)
def exchanger_for(group: dist.ProcessGroup, device: torch.device) -> Exchanger:
    """One exchanger (and one communication stream) per group and device."""
    return Exchanger(group, device)
