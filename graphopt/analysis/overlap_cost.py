"""Cost model for GEMM + collective overlap: sequential, chunked streams, copy engine or tile-triggered.

For one site (a GEMM of M x N x K feeding an all-reduce or reduce-scatter over P ranks, or an
all-gather feeding a GEMM) it estimates, from the device profile:

    t_gemm  = 2 M N K / matmul_flops + launch
    t_comm  = bytes_on_the_wire / bus_bandwidth + latency     (ring: AR moves 2(P-1)/P, RS/AG (P-1)/P)
    sequential = t_gemm + t_comm
    chunked(c) = max(t_gemm * (1 + a), t_comm * (1 + a)) + min(t_gemm, t_comm) / c + c * chunk_cost
    tile(s)    = max(t_gemm * SMs / (SMs - s) / triton_eff, remote_bytes / min(p2p, s * sm_bw))
                 + t_comm_of_one_tile_row + barrier
    copy_engine(c) = the two-stream timeline of graphopt.ops.matmul_collectives' copy-engine
                 schedule (P rank blocks x c sub-chunks), walked step by step: cuBLAS sub-chunk GEMMs
                 (a fill cost of CE_FILL_ROWS rows each, a small slowdown from the copies' memory
                 traffic) on one stream; per sub-chunk a barrier and peer-to-peer pulls at the
                 profile's p2p_gbps (the copy engines) on the other; each own-block GEMM waits for
                 its pull, each all-gather pull for its GEMM.

The copy-engine constants are fitted to the copy_engine columns of a 2 x H200 run of
bench/matmul_allreduce.py (estimates within ~10% on 9 of 10 shapes, mostly above the measured time;
the bench's ``copy_engine_profile`` records the measured pull bandwidth, barrier latency and
sub-chunk GEMM speed they stand for). ``a`` is the slowdown a GEMM and NCCL inflict on each other when they share the GPU (fitted to the
naive 4-chunk column of ../shared/GPU.md, which loses to sequential on two of three shapes, and
matching bench/results/matmul_allreduce.json within ~5%); ``triton_eff`` is the persistent Triton
GEMM's per-SM speed relative to cuBLAS and ``sm_bw`` what one communication CTA pulls over NVLink,
both fitted to the tile-kernel columns of bench/results/matmul_allreduce.json (2 x H100).

The choice keeps the graph unchanged (sequential) unless the best overlapped estimate beats
sequential by its runtime's margin (``MARGINS``): the estimates are only estimates, and the rewrite
must never lose. The copy-engine timeline has no NCCL / GEMM contention term to guess, so its
margin is smaller.
Sizes may be ints, SymInts (their hints) or sympy expressions (substituted with ``hints``).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, Optional

import sympy

from graphopt import _compat
from graphopt.analysis.device_profile import DeviceProfile

log = logging.getLogger("graphopt.analysis.overlap_cost")

KINDS = ("all_reduce", "reduce_scatter", "all_gather")
MARGIN = 0.10                 # an overlapped plan must be estimated >= 10% faster than sequential
CONTENTION = 0.20             # GEMM / NCCL mutual slowdown when overlapped on one GPU
CHUNK_COST_S = 20e-6          # per-chunk launch + collective setup
CHUNK_CHOICES = (2, 4, 8)
TRITON_GEMM_EFFICIENCY = 0.78  # per-SM speed of the persistent Triton GEMM relative to cuBLAS
SM_PULL_GBPS = 6.5             # NVLink bytes/s one communication CTA sustains (tile waits + reads)
COMM_SM_CHOICES = (8, 16, 24, 32)
NUM_SMS = 132
TILE_M = 128                  # the tile kernel's BLOCK_M: tile row granularity
BARRIER_S = 15e-6             # symmetric-memory barrier before each tile-kernel call
# NCCL reduce-scatter / all-gather reach ~3/4 of the all-reduce bus bandwidth (2 GPUs, 32-128 MiB:
# the comm column of bench/results/matmul_allreduce.json).
RS_AG_BUS_FRACTION = 0.75
CE_CHUNK_CHOICES = (2, 4)     # sub-chunks per rank block of the copy-engine runtime
CE_FILL_ROWS = 32             # a cuBLAS sub-chunk of r rows costs as much as r + CE_FILL_ROWS rows
CE_GEMM_SLOWDOWN = 0.06       # GEMM slowdown while copies and another stream's work run beside it
CE_BARRIER_S = 30e-6          # one stream-ordered barrier under load (17 us on an idle GPU)
CE_CHUNK_COST_S = 5e-6        # per sub-chunk: launches, cross-stream event waits, pipeline bubbles
MARGINS = {"chunked": MARGIN, "tile": MARGIN, "copy_engine": 0.04}


@dataclasses.dataclass(frozen=True)
class OverlapChoice:
    mode: str                 # "sequential", "chunked", "copy_engine" or "tile"
    chunks: int               # chunks of the chunked runtime, sub-chunks per rank block of the
                              # copy-engine runtime (1 for the others)
    comm_sms: int             # communication CTAs of the tile kernel (0 for the others)
    reason: str
    estimates_s: dict[str, float]

    @property
    def rewrites(self) -> bool:
        return self.mode != "sequential"


def concrete(size: Any, hints: Optional[Mapping[Any, int]] = None, fallback: int = 8192) -> int:
    """An int for a size that may be a SymInt or a sympy expression (for estimates only)."""
    if isinstance(size, int):
        return size
    if isinstance(size, sympy.Basic):
        value = size.subs(dict(hints or {})) if size.free_symbols else size
        if value.free_symbols:
            value = value.subs({symbol: fallback for symbol in value.free_symbols})
        return int(value)
    return _compat.hint_int(size, fallback=fallback)


def _comm_time(kind: str, m: int, n: int, k: int, itemsize: int, world: int,
               profile: DeviceProfile) -> float:
    if kind == "all_reduce":
        wire = m * n * itemsize * 2 * (world - 1) / world
    elif kind == "reduce_scatter":
        wire = m * n * itemsize * (world - 1) / world
    else:  # all_gather: m counts gathered rows, the gathered operand is m x k
        wire = m * k * itemsize * (world - 1) / world
    bus = profile.allreduce_bus_gbps * (1.0 if kind == "all_reduce" else RS_AG_BUS_FRACTION)
    return wire / (bus * 1e9) + profile.collective_latency_s


def _gemm_time(m: int, n: int, k: int, itemsize: int, profile: DeviceProfile) -> float:
    flops = profile.matmul_tflops if itemsize <= 2 else profile.matmul_tflops_fp32
    return 2.0 * m * n * k / (flops * 1e12) + profile.kernel_launch_s


def _tile_time(kind: str, m: int, n: int, t_gemm: float, itemsize: int, world: int, comm_sms: int,
               profile: DeviceProfile) -> float:
    # One-shot: every rank reads the peers' partial tiles of the rows it owns.
    owned_rows = m if kind == "all_reduce" else m // world
    remote = owned_rows * n * itemsize * (world - 1)
    pull_gbps = min(profile.p2p_gbps, comm_sms * SM_PULL_GBPS)
    t_comm = remote / (pull_gbps * 1e9)
    t_compute = t_gemm * NUM_SMS / (NUM_SMS - comm_sms) / TRITON_GEMM_EFFICIENCY
    tail = t_comm * min(1.0, TILE_M * world / max(m, 1))
    return max(t_compute, t_comm) + tail + BARRIER_S


def _copy_engine_time(kind: str, m: int, n: int, k: int, itemsize: int, world: int, chunks: int,
                      profile: DeviceProfile) -> float:
    """The copy-engine schedule's timeline on one rank (all ranks run the same one)."""
    rows = max(m // (world * chunks), 1)
    flops = profile.matmul_tflops if itemsize <= 2 else profile.matmul_tflops_fp32
    gemm = (2.0 * rows * n * k * (1 + CE_FILL_ROWS / rows) / (flops * 1e12) * (1 + CE_GEMM_SLOWDOWN)
            + profile.kernel_launch_s + CE_CHUNK_COST_S)
    piece_bytes = rows * n * itemsize
    pull = piece_bytes / (profile.p2p_gbps * 1e9)
    local = 2 * piece_bytes / (profile.hbm_gbps * 1e9)         # staging add / own-rows copy kernel
    compute = comm = 0.0
    pulled = []
    for step in range(1, world):
        for _ in range(chunks):
            compute += gemm
            comm = max(comm, compute) + CE_BARRIER_S + pull + (local if step > 1 else 0.0)
            if step == world - 1:
                pulled.append(comm)
    for j in range(chunks):
        compute = max(compute, pulled[j] if pulled else 0.0) + gemm
        if kind == "all_reduce":
            comm = max(comm, compute) + CE_BARRIER_S + (world - 1) * pull
            compute += local
    if kind == "reduce_scatter":
        comm += CE_BARRIER_S
    return max(compute, comm)


def copy_engine_supported(kind: str, m: int, world: int, is_cuda: bool,
                          symmetric_memory: bool) -> Optional[str]:
    """None if the copy-engine runtime can run this site, else why not."""
    if not is_cuda:
        return "copy-engine runtime needs CUDA"
    if not symmetric_memory:
        return "torch symmetric memory is unavailable (or the site is not a plain 2-D mm)"
    if kind == "all_gather":
        return "copy-engine runtime covers GEMM -> all-reduce / reduce-scatter only"
    if m < world or (kind == "reduce_scatter" and m % world):
        return f"M={m} rows do not split into {world} equal rank blocks"
    return None


def estimate(kind: str, m: int, n: int, k: int, itemsize: int, world: int,
             profile: DeviceProfile, *, tile_ok: bool, chunks: int = 0,
             copy_engine_ok: bool = False) -> dict[str, float]:
    """Estimated seconds of every candidate plan (keys 'sequential', 'chunked:c', 'copy_engine:c',
    'tile:s')."""
    t_gemm = _gemm_time(m, n, k, itemsize, profile)
    t_comm = _comm_time(kind, m, n, k, itemsize, world, profile)
    times = {"gemm": t_gemm, "comm": t_comm, "sequential": t_gemm + t_comm}
    for count in ((chunks,) if chunks > 0 else CHUNK_CHOICES):
        overlapped = max(t_gemm, t_comm) * (1 + CONTENTION)
        times[f"chunked:{count}"] = overlapped + min(t_gemm, t_comm) / count + count * CHUNK_COST_S
    if tile_ok:
        for comm_sms in COMM_SM_CHOICES:
            times[f"tile:{comm_sms}"] = _tile_time(kind, m, n, t_gemm, itemsize, world, comm_sms,
                                                   profile)
    if copy_engine_ok:
        for count in ((chunks,) if chunks > 0 else CE_CHUNK_CHOICES):
            times[f"copy_engine:{count}"] = _copy_engine_time(kind, m, n, k, itemsize, world, count,
                                                              profile)
    return times


def tile_supported(kind: str, m: int, n: int, k: int, itemsize: int, world: int, is_cuda: bool,
                   symmetric_memory: bool) -> Optional[str]:
    """None if the tile-triggered kernel can run this site, else why not."""
    if not is_cuda:
        return "tile kernel needs CUDA"
    if not symmetric_memory:
        return "torch symmetric memory is unavailable"
    if kind == "all_gather":
        return "tile kernel covers GEMM -> all-reduce / reduce-scatter only"
    if itemsize != 2:
        return "tile kernel supports bf16 / fp16"
    if m % (TILE_M * world):
        return f"M={m} is not a multiple of {TILE_M} x world size {world}"
    return None


def choose_overlap(kind: str, m: Any, n: Any, k: Any, itemsize: int, world: int,
                   profile: DeviceProfile, *, is_cuda: bool, symmetric_memory: bool,
                   triton: bool = True, mode: str = "auto", chunks: int = 0,
                   hints: Optional[Mapping[Any, int]] = None) -> OverlapChoice:
    """The plan for one site. ``mode`` (config.overlap_mode) forces a runtime; ``chunks``
    (config.overlap_chunks) fixes the chunk count of the chunked and copy-engine candidates (0: the
    model picks). ``symmetric_memory``: the site is a plain 2-D mm on CUDA with torch symmetric
    memory (copy-engine and tile runtimes); ``triton``: the tile kernel can also be built."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}")
    m, n, k = (concrete(size, hints) for size in (m, n, k))
    tile_why_not = (tile_supported(kind, m, n, k, itemsize, world, is_cuda, symmetric_memory)
                    or (None if triton else "triton is unavailable"))
    ce_why_not = copy_engine_supported(kind, m, world, is_cuda, symmetric_memory)
    times = estimate(kind, m, n, k, itemsize, world, profile, tile_ok=tile_why_not is None,
                     chunks=chunks, copy_engine_ok=ce_why_not is None)
    sequential = times["sequential"]

    if mode == "sequential":
        return OverlapChoice("sequential", 1, 0, "config.overlap_mode='sequential'", times)
    if mode == "chunked":
        count = _best(times, "chunked:")[1]
        return OverlapChoice("chunked", count, 0, f"forced chunked ({count} chunks)", times)
    if mode == "tile":
        if tile_why_not is not None:
            return OverlapChoice("sequential", 1, 0, f"overlap_mode='tile' refused: {tile_why_not}",
                                 times)
        comm_sms = _best(times, "tile:")[1]
        return OverlapChoice("tile", 1, comm_sms, "forced tile", times)
    if mode == "copy_engine":
        if ce_why_not is not None:
            return OverlapChoice("sequential", 1, 0,
                                 f"overlap_mode='copy_engine' refused: {ce_why_not}", times)
        count = _best(times, "copy_engine:")[1]
        return OverlapChoice("copy_engine", count, 0, f"forced copy_engine ({count} sub-chunks)",
                             times)

    candidates = [(times[key], key) for key in times if key.split(":")[0] in MARGINS]
    winners = [(t, key) for t, key in candidates if t <= sequential * (1 - MARGINS[key.split(":")[0]])]
    if not winners:
        best_time, best_key = min(candidates)
        return OverlapChoice(
            "sequential", 1, 0,
            f"best overlap {best_key} estimated {best_time * 1e3:.3f} ms vs sequential "
            f"{sequential * 1e3:.3f} ms: gain below {MARGINS[best_key.split(':')[0]]:.0%}", times)
    best_time, best_key = min(winners)
    name, value = best_key.split(":")
    reason = f"{best_key} estimated {best_time * 1e3:.3f} ms vs sequential {sequential * 1e3:.3f} ms"
    if name == "tile":
        return OverlapChoice("tile", 1, int(value), reason, times)
    return OverlapChoice(name, int(value), 0, reason, times)


def plan_key(choice: OverlapChoice) -> str:
    """The estimate (and bench column) key of a choice: 'sequential', 'chunked:4', 'tile:16', ..."""
    if choice.mode == "sequential":
        return "sequential"
    return f"{choice.mode}:{choice.comm_sms if choice.mode == 'tile' else choice.chunks}"


def _best(times: dict[str, float], prefix: str) -> tuple[float, int]:
    options = [(value, int(key.split(":")[1])) for key, value in times.items() if key.startswith(prefix)]
    return min(options) if options else (float("inf"), 0)
