"""Cost model for GEMM + collective overlap: sequential, chunked streams or tile-triggered.

For one site (a GEMM of M x N x K feeding an all-reduce or reduce-scatter over P ranks, or an
all-gather feeding a GEMM) it estimates, from the device profile:

    t_gemm  = 2 M N K / matmul_flops + launch
    t_comm  = bytes_on_the_wire / bus_bandwidth + latency     (ring: AR moves 2(P-1)/P, RS/AG (P-1)/P)
    sequential = t_gemm + t_comm
    chunked(c) = max(t_gemm * (1 + a), t_comm * (1 + a)) + min(t_gemm, t_comm) / c + c * chunk_cost
    tile(s)    = max(t_gemm * SMs / (SMs - s) / triton_eff, remote_bytes / min(p2p, s * sm_bw))
                 + t_comm_of_one_tile_row + barrier

``a`` is the slowdown a GEMM and NCCL inflict on each other when they share the GPU (fitted to the
naive 4-chunk column of ../shared/GPU.md, which loses to sequential on two of three shapes, and
matching bench/results/matmul_allreduce.json within ~5%); ``triton_eff`` is the persistent Triton
GEMM's per-SM speed relative to cuBLAS and ``sm_bw`` what one communication CTA pulls over NVLink,
both fitted to the tile-kernel columns of bench/results/matmul_allreduce.json (2 x H100).

The choice keeps the graph unchanged (sequential) unless the best overlapped estimate beats
sequential by ``MARGIN``: the estimates are only estimates, and the rewrite must never lose.
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


@dataclasses.dataclass(frozen=True)
class OverlapChoice:
    mode: str                 # "sequential", "chunked" or "tile"
    chunks: int               # chunks of the chunked runtime (1 for the others)
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
    return wire / (profile.allreduce_bus_gbps * 1e9) + profile.collective_latency_s


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


def estimate(kind: str, m: int, n: int, k: int, itemsize: int, world: int,
             profile: DeviceProfile, *, tile_ok: bool, chunks: int = 0) -> dict[str, float]:
    """Estimated seconds of every candidate plan (keys 'sequential', 'chunked:c', 'tile:s')."""
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
                   mode: str = "auto", chunks: int = 0,
                   hints: Optional[Mapping[Any, int]] = None) -> OverlapChoice:
    """The plan for one site. ``mode`` (config.overlap_mode) forces a runtime; ``chunks``
    (config.overlap_chunks) fixes the chunk count of the chunked candidate (0: the model picks)."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}")
    m, n, k = (concrete(size, hints) for size in (m, n, k))
    tile_why_not = tile_supported(kind, m, n, k, itemsize, world, is_cuda, symmetric_memory)
    times = estimate(kind, m, n, k, itemsize, world, profile, tile_ok=tile_why_not is None,
                     chunks=chunks)
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

    candidates = [(times[key], key) for key in times if key.startswith(("chunked:", "tile:"))]
    best_time, best_key = min(candidates)
    if best_time > sequential * (1 - MARGIN):
        return OverlapChoice(
            "sequential", 1, 0,
            f"best overlap {best_key} estimated {best_time * 1e3:.3f} ms vs sequential "
            f"{sequential * 1e3:.3f} ms: gain below {MARGIN:.0%}", times)
    name, value = best_key.split(":")
    reason = f"{best_key} estimated {best_time * 1e3:.3f} ms vs sequential {sequential * 1e3:.3f} ms"
    if name == "chunked":
        return OverlapChoice("chunked", int(value), 0, reason, times)
    return OverlapChoice("tile", 1, int(value), reason, times)


def _best(times: dict[str, float], prefix: str) -> tuple[float, int]:
    options = [(value, int(key.split(":")[1])) for key, value in times.items() if key.startswith(prefix)]
    return min(options) if options else (float("inf"), 0)
