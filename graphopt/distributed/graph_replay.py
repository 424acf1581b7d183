"""Replay a runtime's call from a CUDA graph once the same tensors come back.

The copy-engine runtime (``graphopt.ops.matmul_collectives``) issues 10-80 host operations per call
(GEMMs, events, stream switches, driver memory operations for the barriers, peer copies). Issued one
by one they take 0.4-0.9 ms of host time at P = 2 and 1.0-2.9 ms at P = 4 on the lent H100 hosts,
more than the GPU needs for a 4096-row GEMM: calls back to back then run at the host's pace, and the
time moves with the host's scheduling. Replayed from a CUDA graph the whole op (dispatch, output
allocation, lookup, launch) takes 85-104 us at P = 2 and 131-267 us at P = 4
(bench/results/matmul_allreduce_2xh100.md, matmul_allreduce_4gpu.md).

A graph bakes in everything the call touched: the tensors' addresses, shapes and strides, the
workspace (symmetric buffers, flags, peers' mappings) and the schedule. ``GraphReplay`` keys each
graph by those (the caller builds the key) and replays it only for a call with the same key, so a
replay reads and writes exactly what the eager call would have: the tensors now at those addresses.
The device work of a replay is the eager call's, op for op, in the same order with the same flag
values, so ranks may mix replays and eager calls freely (one rank may capture while its peer
replays).

Policy, per key: the first call runs eagerly (it also warms cuBLAS and settles the driver's memory
operation mode); the second is captured, then replayed; later ones replay. A call on a stream that
is itself being captured (``torch.compile(mode="reduce-overhead")``, a user's ``torch.cuda.graph``)
runs eagerly, into the outer graph. At most ``capacity`` graphs are kept (least recently used go
first). Where addresses do not repeat (every call a new key), capturing would cost a capture per
call for nothing: once ``capacity`` graphs have been evicted without being replayed, capturing stops
and the reason is logged once. A capture that fails is logged, and the runtime issues eagerly from then
on: replay is a host-time saving, never a change of result.

All graphs of one cache (one workspace) share one memory pool: a graph keeps only call-local memory
(staging buffers, the cuBLAS workspace), never anything another call reads, and calls on one
workspace never run at the same time (they share its symmetric buffer already).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Callable, Hashable, Optional

import torch

log = logging.getLogger("graphopt.distributed.graph_replay")

CAPACITY = 512   # graphs kept per cache (an 80-layer model's forward and backward sites fit)


@dataclasses.dataclass
class ReplayStats:
    eager: int = 0       # calls issued op by op (first sighting, inside an outer capture, disabled)
    captured: int = 0    # calls captured (and then replayed once)
    replayed: int = 0    # calls that found their graph
    evicted: int = 0
    wasted: int = 0      # graphs evicted without a single replay after their capture


def _capture_cuda(issue: Callable[[], None], stream: torch.cuda.Stream, pool) -> torch.cuda.CUDAGraph:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        # thread_local: a capture on this thread does not forbid other threads' CUDA calls.
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        try:
            issue()
        finally:
            graph.capture_end()
    return graph


class GraphReplay:
    """CUDA graphs of one runtime's calls on one device, keyed by what a replay bakes in (module
    docstring). ``capture(issue)`` returns an object with ``replay()``; the default captures on a
    side stream of the current device (CPU tests pass a fake)."""

    def __init__(self, capacity: int = CAPACITY,
                 capture: Optional[Callable[[Callable[[], None]], object]] = None,
                 capturing: Optional[Callable[[], bool]] = None):
        self.capacity = capacity
        self.graphs: collections.OrderedDict[Hashable, object] = collections.OrderedDict()
        self._unused: set[Hashable] = set()     # captured graphs not replayed since
        self.seen: collections.OrderedDict[Hashable, None] = collections.OrderedDict()
        self.stats = ReplayStats()
        self.disabled: Optional[str] = None     # why this cache issues eagerly from now on
        self._capture = capture or self._capture_on_side_stream
        self._capturing = capturing or torch.cuda.is_current_stream_capturing
        self._stream: Optional[torch.cuda.Stream] = None
        self._pool = None

    def _capture_on_side_stream(self, issue: Callable[[], None]) -> torch.cuda.CUDAGraph:
        if self._stream is None:
            self._stream = torch.cuda.Stream()
            self._pool = torch.cuda.graph_pool_handle()
        return _capture_cuda(issue, self._stream, self._pool)

    def run(self, key: Hashable, issue: Callable[[], None]) -> str:
        """Run the call ``issue`` issues: replay its graph if ``key`` has one, else issue it
        eagerly or capture it (the policy in the module docstring). Returns what happened:
        "replayed", "captured" or "eager"."""
        capturing = self._capturing()
        graph = self.graphs.get(key)
        if graph is not None and not capturing:
            self.graphs.move_to_end(key)
            self._unused.discard(key)
            graph.replay()
            self.stats.replayed += 1
            return "replayed"
        if self.disabled or capturing or key not in self.seen:
            self._remember(key)
            issue()
            self.stats.eager += 1
            return "eager"
        try:
            graph = self._capture(issue)
        except Exception as error:   # noqa: BLE001  any capture failure: issue eagerly from now on
            self.disabled = f"capture failed: {error!r}"
            log.warning("copy-engine call could not be captured in a CUDA graph (%r); calls are "
                        "issued op by op from now on (same results, more host time)", error)
            issue()
            self.stats.eager += 1
            return "eager"
        self.graphs[key] = graph
        self._unused.add(key)
        self.stats.captured += 1
        while len(self.graphs) > self.capacity:
            evicted, _ = self.graphs.popitem(last=False)
            self.stats.evicted += 1
            if evicted in self._unused:
                self._unused.discard(evicted)
                self.stats.wasted += 1
        if self.stats.wasted >= self.capacity:
            self.disabled = (f"{self.stats.wasted} of {self.stats.captured} graphs captured were "
                             "never replayed: tensor addresses do not repeat between calls")
            self.clear()
            log.info("CUDA-graph replay off for this workspace: %s; calls are issued op by op",
                     self.disabled)
        graph.replay()
        return "captured"

    def _remember(self, key: Hashable) -> None:
        self.seen[key] = None
        self.seen.move_to_end(key)
        while len(self.seen) > 4 * self.capacity:
            self.seen.popitem(last=False)

    def clear(self) -> None:
        self.graphs.clear()
        self._unused.clear()
        self.seen.clear()
