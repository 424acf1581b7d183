"""The "tracked" runtime of the GEMM + collective ops: one cuBLAS-speed GEMM whose chunk counters
trigger the communication (``graphopt.distributed.tracked_gemm``), on symmetric memory, one host.

Where ``graphopt.ops.matmul_collectives``' copy-engine runtime cuts the GEMM into sub-GEMMs (each a
few percent slower, with a tail of the last one's communication), here the GEMM runs whole and sets
counter q when output chunk q (a block of M / chunks rows) is final. Per call, rank r of P:

    all-reduce / reduce-scatter, communication CTAs (``comm_sms`` > 0):
        compute:  barrier (no rank still reads the previous call's ``partial``); epoch += 1;
                  counters = 1
        comm:     (launched first, ``comm_sms`` CTAs) graphopt.kernels.counter_chunks.
                  reduce_ready_chunks: per chunk, wait for the counter, publish, wait for every
                  rank's flag, sum the P partials in rank order into ``out`` (one-shot: every chunk;
                  reduce-scatter: the chunks of block r; two-shot: the owner reduces, the others copy)
        compute:  partial = a @ b  (tracked GEMM, planned for the SMs the CTAs leave), then waits
                  for comm
    all-reduce / reduce-scatter, copy engine (``comm_sms`` = 0), on the communication stream:
        per chunk q: cuStreamWaitValue32(counter q == 0); barrier (every rank's chunk q is final);
                     pull the peers' chunk q (cudaMemcpy on the copy engines) into staging; sum in
                     rank order into ``out`` (all-reduce: every chunk; reduce-scatter: own block's)
        end:         barrier (the peers have read this rank's ``partial``); compute waits for comm
    all-gather + GEMM (copy engine only; the GEMM consumes, ``IN_COUNTERS``):
        compute:  own shard -> the symmetric shard buffer and the gathered rows; counters = 1, the
                  own rank's chunks 0
        comm:     barrier (every shard is in place); per peer chunk, in row order: pull it into the
                  gathered rows, then cuStreamWriteValue32(counter = 0) (fenced: the rows first)
        compute:  out = gathered @ b  (its CTAs start on chunk q once counter q is 0); waits for comm
        comm:     barrier at the end (the peers have pulled this rank's shard)

Why the all-gather has no CTA variant: its GEMM's CTAs spin on the counters while holding SMs; a
communication kernel that did not get an SM before them would never run. The copy engines and the
stream memory operations need no SM.

Every all-reduce sums the same operands in the same (rank) order on every rank: bitwise identical
results. Buffers (symmetric partial / shard, flags, counters, staging) are cached per group and
shape and reused; nothing syncs the host, so calls can be captured in a CUDA graph once the
workspace exists. Where cuBLASLt refuses the counters (cuBLAS 13 removed them; see
``tracked_gemm``), the call falls back to the copy-engine runtime, logged once with the reason.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import Tensor

from graphopt.analysis.overlap_schedule import chunk_bounds
from graphopt.distributed import cuda_driver, symm_mem, tracked_gemm

log = logging.getLogger("graphopt.ops.tracked_collectives")

_COUNTERS: dict[tuple, Tensor] = {}
_STAGING: dict[tuple, Tensor] = {}
_REFUSED: set[tuple] = set()


def _counters(device: torch.device, key: tuple, chunks: int) -> Tensor:
    found = _COUNTERS.get((device, key))
    if found is None or found.numel() < chunks:
        found = _COUNTERS[(device, key)] = torch.ones(chunks, dtype=torch.int32, device=device)
    return found[:chunks]


def fallback_reason(a: Tensor, b: Tensor, chunks: int, kind: str, collective: str,
                    a_rows: Optional[int] = None) -> Optional[str]:
    """None where the tracked runtime runs ``a @ b`` (``a_rows``: the GEMM's row count where ``a``
    is a shard of it, gathered into a fresh buffer), else why not; logged once per shape."""
    rows = a_rows or a.shape[0]
    a_matrix = (tracked_gemm.Matrix.of(a) if a_rows is None
                else tracked_gemm.contiguous(rows, a.shape[1]))
    reason = tracked_gemm.refusal(a.device.index or 0, a.dtype, a_matrix, tracked_gemm.Matrix.of(b),
                                  tracked_gemm.contiguous(rows, b.shape[1]), chunks, "rows", kind)
    if reason is None and not cuda_driver.stream_memops_available() and (kind == "in"):
        reason = "the all-gather's copy-engine triggers need the CUDA driver's stream memory operations"
    key = (collective, tuple(a.shape), tuple(b.shape), a.dtype, chunks)
    if reason is not None and key not in _REFUSED:
        _REFUSED.add(key)
        log.warning("tracked %s runtime unavailable for %s x %s (%d chunks): %s; running the "
                    "%s runtime instead", collective, tuple(a.shape), tuple(b.shape), chunks, reason,
                    "chunked" if kind == "in" else "copy-engine")
    return reason


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def matmul_reduce(a: Tensor, b: Tensor, group_name: str, chunks: int, comm_sms: int,
                  scatter: bool, two_shot: bool = False) -> Tensor:
    """all_reduce_sum(a @ b) (``scatter``: reduce_scatter_sum along rows) with the tracked GEMM;
    ``comm_sms`` > 0 communication CTAs, 0 the copy engine (module docstring)."""
    if comm_sms > 0:
        return _reduce_with_ctas(a, b, group_name, chunks, comm_sms, scatter, two_shot)
    return _reduce_with_copy_engine(a, b, group_name, chunks, scatter)


def _reduce_with_ctas(a: Tensor, b: Tensor, group_name: str, chunks: int, comm_sms: int,
                      scatter: bool, two_shot: bool) -> Tensor:
    from graphopt.kernels import counter_chunks

    m, n = a.shape[0], b.shape[1]
    workspace = symm_mem.tile_workspace(group_name, m, n, a.dtype, a.device,
                                        counter_chunks.flag_count(_world(group_name), chunks))
    world = workspace.world_size
    out = a.new_empty(m // world if scatter else m, n)
    counters = _counters(a.device, ("reduce", m, n), chunks)
    compute = torch.cuda.current_stream()
    comm = symm_mem.comm_stream(a.device)
    workspace.barrier()
    workspace.next_epoch()
    counters.fill_(tracked_gemm.COUNTER_PENDING)
    comm.wait_stream(compute)
    mode = "reduce_scatter" if scatter else "two_shot" if two_shot else "one_shot"
    with torch.cuda.stream(comm):   # first, so its CTAs hold their SMs before the GEMM takes the rest
        counter_chunks.reduce_ready_chunks(workspace, counters, out, chunks, "rows", mode, comm_sms)
    tracked_gemm.matmul(a, b, workspace.partial, counters, chunks, "rows", "out",
                        sm_count=_num_sms(a.device) - comm_sms)
    compute.wait_stream(comm)
    return out


def _world(group_name: str) -> int:
    from graphopt import _compat
    return _compat.resolve_process_group(group_name).size()


def _reduce_with_copy_engine(a: Tensor, b: Tensor, group_name: str, chunks: int,
                             scatter: bool) -> Tensor:
    m, n = a.shape[0], b.shape[1]
    workspace = symm_mem.copy_engine_workspace(group_name, m, n, a.dtype, a.device)
    if workspace.flag_ptrs is None:
        raise RuntimeError("the tracked copy-engine runtime waits on counters with the CUDA driver's "
                           "stream memory operations, which are unavailable here (install "
                           "cuda-bindings); use mode='copy_engine'")
    world, rank = workspace.world_size, workspace.rank
    if chunks + 1 > symm_mem.MAX_SYNCS:
        raise ValueError(f"{chunks} chunks need {chunks + 1} barriers; at most "
                         f"{symm_mem.MAX_SYNCS - 1} chunks")
    out = a.new_empty(m // world if scatter else m, n)
    counters = _counters(a.device, ("reduce", m, n), chunks)
    bounds = chunk_bounds(m, chunks)
    rows = max(end - start for start, end in bounds)
    staging_key = (a.device, a.dtype, rows, n, world)
    staging = _STAGING.get(staging_key)
    if staging is None:
        staging = _STAGING[staging_key] = a.new_empty(world, rows, n)
    own_start = rank * (m // world) if scatter else 0
    own_end = own_start + (m // world) if scatter else m
    compute, comm = torch.cuda.current_stream(), workspace.comm_stream
    workspace.begin_call()
    counters.fill_(tracked_gemm.COUNTER_PENDING)
    comm.wait_stream(compute)
    tracked_gemm.matmul(a, b, workspace.partial, counters, chunks, "rows", "out")
    with torch.cuda.stream(comm):
        for q, (start, end) in enumerate(bounds):
            cuda_driver.stream_memops(comm, [(cuda_driver.MEMOP_WAIT_32,
                                              counters.data_ptr() + 4 * q, 0, False)])
            workspace.barrier(comm)          # every rank's chunk q is final (and visible)
            if start >= own_end or end <= own_start:
                continue
            pieces = []
            for peer in range(world):
                if peer == rank:
                    pieces.append(workspace.partial[start:end])
                else:
                    staging[peer, :end - start].copy_(workspace.peers[peer][start:end])
                    pieces.append(staging[peer, :end - start])
            total = pieces[0].float()
            for piece in pieces[1:]:
                total += piece.float()
            out[start - own_start:end - own_start].copy_(total)
        workspace.barrier(comm)              # the peers have read this rank's partial
    compute.wait_stream(comm)
    return out


def all_gather_matmul(a_shard: Tensor, b: Tensor, group_name: str, chunks: int
                      ) -> tuple[Tensor, Tensor]:
    """(g, g @ b) with g = all_gather(a_shard) along rows; the GEMM's IN counters gate each chunk
    of gathered rows until its copy has landed (module docstring). ``chunks`` per rank shard."""
    s, k = a_shard.shape
    workspace = symm_mem.copy_engine_workspace(group_name, s, k, a_shard.dtype, a_shard.device)
    world, rank = workspace.world_size, workspace.rank
    gathered = a_shard.new_empty(world * s, k)
    out = a_shard.new_empty(world * s, b.shape[1])
    pieces = chunk_bounds(s, chunks)
    total = world * len(pieces)
    counters = _counters(a_shard.device, ("gather", s, k), total)
    compute, comm = torch.cuda.current_stream(), workspace.comm_stream
    workspace.begin_call()
    workspace.partial.copy_(a_shard)
    gathered[rank * s:(rank + 1) * s].copy_(a_shard)
    counters.fill_(tracked_gemm.COUNTER_PENDING)
    counters[rank * len(pieces):(rank + 1) * len(pieces)].fill_(tracked_gemm.COUNTER_READY)
    comm.wait_stream(compute)
    with torch.cuda.stream(comm):
        workspace.barrier(comm)              # every rank's shard is in its symmetric buffer
        for owner in range(world):
            if owner == rank:
                continue
            for j, (start, end) in enumerate(pieces):
                gathered[owner * s + start:owner * s + end].copy_(workspace.peers[owner][start:end])
                cuda_driver.stream_memops(comm, [(cuda_driver.MEMOP_WRITE_32,
                                                  counters.data_ptr() + 4 * (owner * len(pieces) + j),
                                                  tracked_gemm.COUNTER_READY, True)])
    tracked_gemm.matmul(gathered, b, out, counters, total, "rows", "in")
    with torch.cuda.stream(comm):
        workspace.barrier(comm)              # the peers have pulled this rank's shard
    compute.wait_stream(comm)
    return gathered, out


def clear_cache() -> None:
    _COUNTERS.clear()
    _STAGING.clear()
    _REFUSED.clear()
