"""Cost model for GEMM + collective overlap: sequential, chunked streams, copy engine or tile-triggered.

For one site (a GEMM of M x N x K feeding an all-reduce or reduce-scatter over P ranks, or an
all-gather feeding a GEMM) it estimates, from the device profile:

    t_gemm  = 2 M N K / matmul_flops + launch
    t_comm  = bytes_on_the_wire / bus_bandwidth + latency     (ring: AR moves 2(P-1)/P, RS/AG (P-1)/P)
    sequential = t_gemm + t_comm
    chunked(c) = max(t_gemm * (1 + a), t_comm * (1 + a)) + min(t_gemm, t_comm) / c + c * chunk_cost
    tile(s)    = max(t_gemm * SMs / (SMs - s) / triton_eff, remote_bytes / min(p2p, s * sm_bw))
                 + t_comm_of_one_tile_row + barrier
    copy_engine(c, q) = the two-stream timeline of graphopt.ops.matmul_collectives' copy-engine
                 schedule (P rank blocks x c sub-chunks, each about q times the one before; the
                 runtime's own bounds), walked step by step: cuBLAS sub-chunk GEMMs (a fill cost of
                 CE_FILL_ROWS rows each, a small slowdown from the copies' memory traffic) on one
                 stream; per sub-chunk a synchronisation (phase 1: a hand-off with the one
                 producing peer; all-reduce phase 2 and the reduce-scatter's end: a barrier) and
                 peer-to-peer pulls at the profile's p2p_gbps
                 (the copy engines) on the other; each own-block GEMM waits for its pull, each
                 all-reduce pull-back for its GEMM; the slower of that and the host's time to issue
                 the call (op by op, ``ce_host_time``), plus a share of the faster that shrinks as
                 they part (beyond 2 ranks, with the host near the GPU time: their sum).
                 With CUDA-graph replay (``replay``, the runtime's steady state from a call's
                 third repetition on) the host's part is the graph launch alone.
    tracked(c, s) = the tracked runtime's timeline (``graphopt.ops.tracked_collectives``): ONE
                 cuBLASLt GEMM (on SMs - s SMs where s communication CTAs run beside it) whose chunk
                 q of c is final at (q + 1) / c of it; per chunk, after it is final on every rank:
                 s > 0: the CTAs pull the peers' rows at min(p2p, s * sm_bw) and sum them in
                 registers; s = 0 (the copy engine): a barrier, copy-engine pulls at p2p, and a
                 summing kernel that gets SMs only once the GEMM ends. All-gather + GEMM: copy-engine
                 pulls in row order, the GEMM's chunk q starting once its rows landed.
                 Offered only where cuBLASLt takes the counters (``tracked_chunks``: the chunk
                 counts the caller found supported; none on cuBLAS >= 13, which removed them).

The copy-engine constants are fitted to the copy_engine columns of 2 x H200 runs of
bench/matmul_allreduce.py (the ratio estimate / sequential within ~5% on most shapes, ~10% on the
worst; the bench's ``copy_engine_profile`` records the measured pull bandwidth, barrier latency,
host issue time and sub-chunk GEMM speed they stand for): the GEMM slowdown and the host-issue terms
from the equal sub-chunk columns of one run, the one-wave floor from tapered schedules whose
128-256-row sub-chunks ran slower than their rows explain, the margin from four runs on three
machines. ``a`` is the slowdown a GEMM and NCCL inflict on each other when they share the GPU (fitted to the
naive 4-chunk column of ../shared/GPU.md, which loses to sequential on two of three shapes, and
matching bench/results/matmul_allreduce.json within ~5%); ``triton_eff`` is the persistent Triton
GEMM's per-SM speed relative to cuBLAS and ``sm_bw`` what one communication CTA pulls over NVLink,
both fitted to the tile-kernel columns of bench/results/matmul_allreduce.json (2 x H100).
Beyond 2 ranks (fitted to a 4 x H100 run of the hand-off runtime,
bench/results/matmul_allreduce_4gpu.json, and a 4 x H200 run of the barrier runtime before it, in
git history): a barrier waits for every peer (CE_BARRIER_PEER_S), phase-2 pulls and the tile
kernel's communication slow down per extra rank (CE_PULL_PEER_SLOWDOWN, TILE_PEER_PENALTY), the
host issues 3 (P - 1) driver calls per barrier, and a call whose host time comes near its GPU time
is priced without overlap of the two (CE_HOST_OVERLAP_LIMIT). A hand-off costs what a barrier
between 2 ranks does: so priced, the best schedule of each shape is estimated 0.997x (geomean)
with hand-offs of what it is with barriers of every rank, and measured 1.008x (4 x H100).

The choice keeps the graph unchanged (sequential) unless the best overlapped estimate beats
sequential by its runtime's margin (``MARGINS``; at least MARGIN_MULTI beyond 2 ranks): the
estimates are only estimates, and the rewrite must never lose.
Sizes may be ints, SymInts (their hints) or sympy expressions (substituted with ``hints``).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, Optional

import sympy

from graphopt import _compat
from graphopt.analysis.device_profile import DeviceProfile
from graphopt.analysis.overlap_schedule import copy_engine_blocks

log = logging.getLogger("graphopt.analysis.overlap_cost")

KINDS = ("all_reduce", "reduce_scatter", "all_gather")
MARGIN = 0.10                 # an overlapped plan must be estimated >= 10% faster than sequential
CONTENTION = 0.20             # GEMM / NCCL mutual slowdown when overlapped on one GPU
CHUNK_COST_S = 20e-6          # per-chunk launch + collective setup, per peer (NCCL's latency grows
                              # with P: on 4 x H200, 8 reduce-scatter chunks lost to sequential)
CHUNK_CHOICES = (2, 4, 8)
TRITON_GEMM_EFFICIENCY = 0.78  # per-SM speed of the persistent Triton GEMM relative to cuBLAS
SM_PULL_GBPS = 6.5             # NVLink bytes/s one communication CTA sustains (tile waits + reads)
COMM_SM_CHOICES = (8, 16, 24, 32)
# The tile kernel's communication CTAs at P = 4 pulled slower than at P = 2, per rank beyond 2:
# reduce-scatter 1.5x, all-reduce 1.1x the modelled time (4 x H200).
TILE_PEER_PENALTY = {"all_reduce": 0.05, "reduce_scatter": 0.25}
NUM_SMS = 132
TILE_M = 128                  # the tile kernel's BLOCK_M: tile row granularity
BARRIER_S = 15e-6             # symmetric-memory barrier before each tile-kernel call
# NCCL reduce-scatter / all-gather reach ~3/4 of the all-reduce bus bandwidth (2 GPUs, 32-128 MiB:
# the comm column of bench/results/matmul_allreduce.json).
RS_AG_BUS_FRACTION = 0.75
# Copy-engine schedules: (sub-chunks per rank block, taper). Taper 1: equal sub-chunks; q < 1:
# each about q times the one before, so the exposed tail (the last sub-chunk's communication) is short.
# One sub-chunk per block: at P > 2 phase 1 still overlaps P - 1 GEMM blocks with their pulls, with
# the fewest barriers and the least host work.
CE_SCHEDULES = ((1, 1.0), (2, 1.0), (4, 1.0), (2, 0.5), (3, 0.5), (3, 0.3), (4, 0.6))
CE_FILL_ROWS = 32             # a cuBLAS sub-chunk of r rows costs as much as r + CE_FILL_ROWS rows
CE_TILE_ROWS, CE_TILE_COLS = 128, 128   # a cuBLAS bf16 output tile on sm90 (one per SM per wave)
CE_GEMM_SLOWDOWN = 0.08       # GEMM slowdown while copies and another stream's work run beside it
# One stream-ordered barrier under load: signal every peer, wait for every peer; a base plus a cost
# per peer (idle GPUs: 13-20 us at P = 2, 22-40 us at P = 4, 4 x H200).
CE_BARRIER_BASE_S = 8e-6
CE_BARRIER_PEER_S = 12e-6
# Host time to issue a call (Python + launches): per call, per kernel launch (GEMM, local copy,
# staging add), per communication step (stream switch, event wait, the barrier's 3 (P - 1) driver
# calls), per peer pull. Fitted to host_us_per_rs_call_chunks* / host_us_per_ar_call_* of the bench's
# copy_engine_profile on 2 x H200. At P = 4 those figures disagree with each other (4 x H100:
# host_us_per_ar_call_* 0.79-0.89x these terms, host_us_per_rs_call_* 1.2-1.9x, though the
# all-reduce issues more), so the per-op costs stay those of P = 2; the barrier's driver calls
# (barrier_host_us: 4.6 us per call) grow with P, and the cost of the other ranks' issue is
# CE_HOST_OVERLAP_LIMIT's.
CE_HOST_CALL_S = 120e-6
CE_HOST_LAUNCH_S = 20e-6
CE_HOST_STEP_S = 15e-6
CE_HOST_MEMOP_S = 4.6e-6
CE_HOST_PULL_S = 10e-6
# Host time of a replayed copy-engine call (graphopt.distributed.graph_replay): the op's dispatch,
# its output allocation and graph lookup (the base), and the graph launch, which grows with its
# nodes (per driver memory operation of its barriers and hand-offs). Fitted to the bench's
# host_us_per_*_replayed: 85-104 us per call at P = 2 and 131-267 us at P = 4 (1 to 4 sub-chunks,
# 2 and 4 x H100), against 0.39-0.92 ms and 0.99-2.9 ms issued op by op in the same runs.
CE_REPLAY_HOST_S = 80e-6
CE_REPLAY_MEMOP_S = 2.5e-6
# Where host and GPU times are close, the GPU waits for ops still being issued: a call costs the
# slower of the two plus this share of the faster (fitted to the host-bound shapes, 2 x H200),
# scaled by faster / slower. Nothing in a call syncs the host, so where the GPU is the slower the
# host runs ahead and the GPU waits for issue only at the start. A constant share added 0.21 ms to
# the GEMM-bound all-reduce 70B down_proj M = 8192 c = 2 of the 4 x H100 run, whose GPU walk alone
# (1.756 ms) was what it measured (1.762); the GPU-bound variants of the 2-GPU runs ran
# 0.99-1.07x their GPU walk (median per band of host / GPU ratio), not more where the ratio is high.
CE_HOST_INTERFERENCE = 0.25
# Beyond 2 ranks a call whose host time is above this fraction of its GPU time is priced at their
# sum, as if issue and execution did not overlap. Every hand-off and barrier makes a rank's GPU wait
# for the other ranks' issue, so such a call moves with the host scheduling of P processes: the two
# 4-GPU runs (4 x H100 with hand-offs, 4 x H200 with barriers) timed the 67 schedules above it
# anywhere between the slower of host and GPU (faster run: median 1.07x of it) and about their sum
# (slower run: median 0.84x, up to 1.32x), 0.55-1.84x from one run to the other. E.g. RS o_proj
# M = 8192 c = 1 (host 0.69 of GPU): 0.808 ms on 4 x H100, 0.622 on 4 x H200, sequential 0.739 /
# 0.726; RS o_proj M = 4096 c = 1: 0.787 ms, and 0.486 timed again with barriers in the same run.
# The 59 schedules at or below 0.61 moved by 6% or less between the runs.
CE_HOST_OVERLAP_LIMIT = 0.62
# The all-reduce's phase-2 pulls, per rank beyond 2. Every rank pulls its peers' rows in rank
# order, so at first P - 1 ranks read rank 0 at once, then rank 1, ...: the busiest peer's
# outgoing links are shared by up to P - 1 readers. Fitted to the all-reduces of both 4-GPU runs
# below CE_HOST_OVERLAP_LIMIT (0.25: the comm-heavy o_proj M = 16384 and 16384x8192x4096 ones
# estimated 0.90-0.95x measured, mean error 7.8%; 0.4: 0.96-1.02x, mean error 3.0%, the same on
# both runs). Phase 1 pulls one peer per step, each peer read by one rank, and is not slowed: with
# this term on phase 1 too, the reduce-scatters of the 4 x H200 run were over-estimated by up to
# 1.48x (o_proj, M = 8192).
CE_PULL_PEER_SLOWDOWN = 0.4
# Copy engine: on the GEMM-bound shapes (K = 14336, comm <= 20% of the GEMM) the best schedule
# measured 0.89-1.004x of sequential and the estimated best up to 1.019x, over five bench runs on
# 2 x H200 (three machines), where the estimates said 0.92-0.96x: the sequential baseline and the
# GEMM under copies move by ~5% from run to run. A gain estimated below 7% is within that noise.
MARGINS = {"chunked": MARGIN, "tile": MARGIN, "copy_engine": 0.07, "tracked": MARGIN,
           "tracked_two_shot": MARGIN}
# Tracked runtime (not yet measured: priced from the profile and the terms above). Chunk counts the
# caller checks with cuBLASLt, communication CTAs beside the GEMM (0: the copy engine), the GEMM's
# slowdown from its counter atomics and from the algorithms that take counters, and the host time
# of one call (a barrier, a fill, a kernel launch and one cuBLASLt call through its bindings).
TRACKED_CHUNK_CHOICES = (4, 8, 16)
TRACKED_COMM_SMS = (0, 8, 16)
TRACKED_GEMM_OVERHEAD = 0.02
TRACKED_HOST_S = 150e-6
# Beyond 2 ranks every runtime's terms rest on three 4 x H200 runs and one 4 x H100 run: a gain
# estimated below 15% is not taken there. The copy-engine times that moved most between them (up
# to 1.8x) are those CE_HOST_OVERLAP_LIMIT now prices; below it they moved by 6% or less, and the
# estimates erred by 3% (all-reduce) and 7% (reduce-scatter, mostly under, as at P = 2) on
# average. 10% would also take RS 70B down_proj M = 8192 c = 2 (0.91 / 0.89 of sequential in the
# two runs); one run of the hand-off runtime is too few to lower it.
MARGIN_MULTI = 0.15


@dataclasses.dataclass(frozen=True)
class OverlapChoice:
    mode: str                 # "sequential", "chunked", "copy_engine", "tile", "tracked" or
                              # "tracked_two_shot"
    chunks: int               # chunks of the chunked runtime, sub-chunks per rank block of the
                              # copy-engine runtime, counters of the tracked one (per rank shard
                              # for the all-gather; 1 for the others)
    comm_sms: int             # communication CTAs of the tile kernel and the tracked runtime (0:
                              # none, the copy engine)
    reason: str
    estimates_s: dict[str, float]
    taper: float = 1.0        # copy-engine sub-chunk j is about taper**j of the first (1: equal)
    replay: bool = False      # the copy-engine call replays CUDA graphs of repeated calls

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
    t_comm = remote / (pull_gbps * 1e9) * (1 + TILE_PEER_PENALTY[kind] * (world - 2))
    t_compute = t_gemm * NUM_SMS / (NUM_SMS - comm_sms) / TRITON_GEMM_EFFICIENCY
    tail = t_comm * min(1.0, TILE_M * world / max(m, 1))
    return max(t_compute, t_comm) + tail + BARRIER_S


def copy_engine_key(chunks: int, taper: float = 1.0) -> str:
    """The estimate (and bench column) key of a copy-engine schedule: 'copy_engine:2' (equal
    sub-chunks), 'copy_engine:3x0.5' (3 sub-chunks, each about half the one before)."""
    return f"copy_engine:{chunks}" if taper >= 1.0 else f"copy_engine:{chunks}x{taper:g}"


def _parse_copy_engine_key(key: str) -> tuple[int, float]:
    chunks, _, taper = key.split(":")[1].partition("x")
    return int(chunks), float(taper) if taper else 1.0


def _copy_engine_time(kind: str, m: int, n: int, k: int, itemsize: int, world: int, chunks: int,
                      taper: float, profile: DeviceProfile, replay: bool = False) -> float:
    """The copy-engine schedule's timeline on rank 0 (every rank runs the same one, its blocks at
    most a row longer), walked over the runtime's own sub-chunk bounds, and never below the host's
    time to issue it (calls back to back run at the slower of the two)."""
    blocks = [[end - start for start, end in block]
              for block in copy_engine_blocks(m, world, chunks, taper)]
    flops = profile.matmul_tflops if itemsize <= 2 else profile.matmul_tflops_fp32

    one_wave = NUM_SMS * CE_TILE_ROWS * CE_TILE_COLS / n    # rows that fill every SM once

    def gemm(rows: int) -> float:
        # A sub-chunk too short to give every SM a tile still takes a whole wave (sub-chunks of
        # 128-256 rows ran slower than their rows alone explain on 2 x H200).
        rows = max(rows, one_wave) + CE_FILL_ROWS
        return 2.0 * rows * n * k / (flops * 1e12) * (1 + CE_GEMM_SLOWDOWN) + profile.kernel_launch_s

    def pull(rows: int, concurrent: bool = False) -> float:
        # Phase 1 pulls one peer's rows per step; phase 2 of the all-reduce pulls every peer's
        # at once, and only those share the rank's links with each other.
        slowdown = CE_PULL_PEER_SLOWDOWN * (world - 2) if concurrent else 0.0
        return rows * n * itemsize / (profile.p2p_gbps * 1e9) * (1 + slowdown)

    def local(rows: int) -> float:                      # staging add / own-rows copy kernel
        return 2 * rows * n * itemsize / (profile.hbm_gbps * 1e9)

    barrier, handoff = ce_barrier_time(world), ce_barrier_time(2)
    own = blocks[0]
    compute = comm = 0.0
    pulled = []
    for step in range(1, world):
        for j, (dest_rows, rows) in enumerate(zip(blocks[step], own)):
            compute += gemm(dest_rows)
            sync = barrier if (step, j, kind) == (1, 0, "all_reduce") else handoff
            comm = max(comm, compute) + sync + pull(rows) + (local(rows) if step > 1 else 0.0)
            if step == world - 1:
                pulled.append(comm)
    for j, rows in enumerate(own):
        compute = max(compute, pulled[j] if pulled else 0.0) + gemm(rows)
        if kind == "all_reduce":
            comm = max(comm, compute) + barrier + sum(pull(block[j], True) for block in blocks[1:])
            compute += local(rows)
    if kind == "reduce_scatter":
        comm += barrier
    gpu, host = max(compute, comm), ce_host_time(kind, world, len(own), replay)
    if world > 2 and host > CE_HOST_OVERLAP_LIMIT * gpu:
        return gpu + host
    faster, slower = min(gpu, host), max(gpu, host)
    return slower + CE_HOST_INTERFERENCE * faster * faster / slower


def ce_barrier_time(world: int) -> float:
    """GPU time of one copy-engine barrier among ``world`` ranks (a hand-off: ``world`` = 2, one
    peer signalled and one waited for)."""
    return CE_BARRIER_BASE_S + CE_BARRIER_PEER_S * (world - 1)


def ce_host_time(kind: str, world: int, count: int, replay: bool = False) -> float:
    """Host time to issue one copy-engine call with ``count`` sub-chunks per rank block: what
    ``copy_engine_pipeline`` issues, op by op, or (``replay``) the launch of its CUDA graph."""
    launches = world * count + (world - 2) * count      # GEMMs, staging adds of phase 1
    handoffs = (world - 1) * count                       # phase 1: a hand-off and a pull each
    pulls = (world - 1) * count
    barriers = 0
    if kind == "all_reduce":
        launches += count                                # own rows copied to the output
        handoffs -= 1                                    # phase 1 opens with a barrier
        barriers += 1 + count                            # phase 2: a barrier, P - 1 pulls
        pulls += (world - 1) * count
    else:
        barriers += 1                                    # the closing barrier
    memops = 3 * (handoffs + barriers * (world - 1))     # a barrier: 3 per peer; a hand-off: 3
    if replay:
        return CE_REPLAY_HOST_S + CE_REPLAY_MEMOP_S * memops
    return (CE_HOST_CALL_S + launches * CE_HOST_LAUNCH_S + (handoffs + barriers) * CE_HOST_STEP_S
            + memops * CE_HOST_MEMOP_S + pulls * CE_HOST_PULL_S)


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
             copy_engine_ok: bool = False, replay: bool = False,
             tracked_chunks: tuple[int, ...] = ()) -> dict[str, float]:
    """Estimated seconds of every candidate plan (keys 'sequential', 'chunked:c', 'tile:s',
    ``copy_engine_key(c, q)`` and ``tracked_key(...)``). ``chunks`` > 0 fixes the chunk count of the
    chunked and copy-engine candidates (every taper of CE_SCHEDULES is still tried); ``replay``:
    copy-engine calls replay CUDA graphs; ``tracked_chunks``: the chunk counts at which the tracked
    GEMM runs this site (none: no tracked candidate)."""
    t_gemm = _gemm_time(m, n, k, itemsize, profile)
    t_comm = _comm_time(kind, m, n, k, itemsize, world, profile)
    times = {"gemm": t_gemm, "comm": t_comm, "sequential": t_gemm + t_comm}
    for count in ((chunks,) if chunks > 0 else CHUNK_CHOICES):
        overlapped = max(t_gemm, t_comm) * (1 + CONTENTION)
        times[f"chunked:{count}"] = (overlapped + min(t_gemm, t_comm) / count
                                     + count * CHUNK_COST_S * (world - 1))
    if tile_ok:
        for comm_sms in COMM_SM_CHOICES:
            times[f"tile:{comm_sms}"] = _tile_time(kind, m, n, t_gemm, itemsize, world, comm_sms,
                                                   profile)
    if copy_engine_ok:
        schedules = ({(chunks, taper) for _, taper in CE_SCHEDULES} if chunks > 0 else CE_SCHEDULES)
        for count, taper in sorted(schedules):
            times[copy_engine_key(count, taper)] = _copy_engine_time(kind, m, n, k, itemsize, world,
                                                                     count, taper, profile, replay)
    for count in tracked_chunks:
        for mode in ("tracked", "tracked_two_shot") if kind == "all_reduce" and world > 2 else ("tracked",):
            for comm_sms in (0,) if kind == "all_gather" else TRACKED_COMM_SMS:
                if mode == "tracked_two_shot" and comm_sms == 0:
                    continue
                times[tracked_key(mode, count, comm_sms)] = _tracked_time(
                    kind, m, n, k, itemsize, world, count, comm_sms, mode == "tracked_two_shot",
                    profile)
    return times


def tracked_key(mode: str, chunks: int, comm_sms: int) -> str:
    """The estimate (and bench column) key of a tracked plan: 'tracked:8:sm16' (8 chunks, 16
    communication CTAs), 'tracked:8:ce' (the copy engine), 'tracked_two_shot:8:sm16'."""
    return f"{mode}:{chunks}:{f'sm{comm_sms}' if comm_sms else 'ce'}"


def parse_tracked_key(key: str) -> tuple[str, int, int]:
    mode, chunks, comm = key.split(":")
    return mode, int(chunks), 0 if comm == "ce" else int(comm[2:])


def tracked_chunk_ok(kind: str, m: int, world: int, chunks: int, two_shot: bool = False) -> bool:
    """Whether ``chunks`` counters fit the tracked runtime's layout: equal row chunks, whole rank
    blocks for the owner-reduced collectives, the all-gather's per-shard chunks."""
    if kind == "all_gather":      # m counts gathered rows: chunks per rank shard
        return m % world == 0 and (m // world) % chunks == 0
    if m % chunks:
        return False
    return chunks % world == 0 if kind == "reduce_scatter" or two_shot else True


def _tracked_time(kind: str, m: int, n: int, k: int, itemsize: int, world: int, chunks: int,
                  comm_sms: int, two_shot: bool, profile: DeviceProfile) -> float:
    """The tracked runtime's timeline on one rank (module docstring), never below its host time."""
    if not tracked_chunk_ok(kind, m, world, chunks, two_shot):
        return float("inf")
    flops = profile.matmul_tflops if itemsize <= 2 else profile.matmul_tflops_fp32
    sms_left = NUM_SMS - comm_sms
    t_gemm = (2.0 * m * n * k / (flops * 1e12) * NUM_SMS / sms_left * (1 + TRACKED_GEMM_OVERHEAD)
              + profile.kernel_launch_s)
    if kind == "all_gather":
        pieces = chunks * world
        piece_bytes = m // pieces * k * itemsize
        pulled = gemm = 0.0
        for q in range(pieces):
            if q // chunks != 0:      # rank 0's view: its own shard's chunks are ready at once
                pulled += piece_bytes / (profile.p2p_gbps * 1e9) + profile.kernel_launch_s
            gemm = max(gemm, pulled if q // chunks else 0.0) + t_gemm / pieces
        gpu = ce_barrier_time(world) + gemm + ce_barrier_time(world)
        return max(gpu, TRACKED_HOST_S + pieces * CE_HOST_PULL_S)
    chunk_bytes = m // chunks * n * itemsize
    rate = profile.p2p_gbps if comm_sms == 0 else min(profile.p2p_gbps, comm_sms * SM_PULL_GBPS)
    pull = chunk_bytes * (world - 1) / (rate * 1e9) * (1 + CE_PULL_PEER_SLOWDOWN * (world - 2))
    local_sum = world * chunk_bytes * 2 / (profile.hbm_gbps * 1e9)
    owned = range(world - 1, chunks, world) if kind == "reduce_scatter" or two_shot else range(chunks)
    comm = ce_barrier_time(world) if comm_sms else 0.0
    summed = 0.0
    for q in range(chunks):
        ready = t_gemm * (q + 1) / chunks
        if comm_sms:
            if q in owned:
                comm = max(comm, ready) + ce_barrier_time(2) + pull
            elif two_shot:      # a copy of the owner's reduced chunk, once it is reduced
                comm = max(comm, ready) + chunk_bytes / (rate * 1e9)
        else:
            comm = max(comm, ready) + ce_barrier_time(world) + (pull if q in owned else 0.0)
            if q in owned:      # the summing kernel waits for SMs until the GEMM is done
                summed = max(summed, comm, t_gemm) + local_sum + profile.kernel_launch_s
    gpu = max(t_gemm, comm, summed) + (ce_barrier_time(world) if comm_sms == 0 else 0.0)
    host = TRACKED_HOST_S + (0 if comm_sms else chunks * (CE_HOST_STEP_S + 3 * world * CE_HOST_MEMOP_S
                                                          + (world - 1) * CE_HOST_PULL_S))
    return max(gpu, host)


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
                   hints: Optional[Mapping[Any, int]] = None, replay: bool = False,
                   tracked_chunks: tuple[int, ...] = ()) -> OverlapChoice:
    """The plan for one site. ``mode`` (config.overlap_mode) forces a runtime; ``chunks``
    (config.overlap_chunks) fixes the chunk count of the chunked and copy-engine candidates (0: the
    model picks). ``symmetric_memory``: the site is a plain 2-D mm on CUDA with torch symmetric
    memory (copy-engine and tile runtimes); ``triton``: the tile kernel can also be built;
    ``replay`` (config.overlap_graph_replay): copy-engine calls replay CUDA graphs of repeated calls,
    so they are priced at the graph's launch instead of op-by-op issue; ``tracked_chunks``: the chunk
    counts at which cuBLASLt runs the tracked GEMM of this site (``graphopt.distributed.
    tracked_gemm.support``; empty where it is refused or absent, so no tracked plan is offered)."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}")
    m, n, k = (concrete(size, hints) for size in (m, n, k))
    tile_why_not = (tile_supported(kind, m, n, k, itemsize, world, is_cuda, symmetric_memory)
                    or (None if triton else "triton is unavailable"))
    ce_why_not = copy_engine_supported(kind, m, world, is_cuda, symmetric_memory)
    tracked_chunks = tuple(count for count in tracked_chunks if symmetric_memory and is_cuda)
    times = estimate(kind, m, n, k, itemsize, world, profile, tile_ok=tile_why_not is None,
                     chunks=chunks, copy_engine_ok=ce_why_not is None, replay=replay,
                     tracked_chunks=tracked_chunks)
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
        key = min((times[key], key) for key in times if key.startswith("copy_engine:"))[1]
        count, taper = _parse_copy_engine_key(key)
        return OverlapChoice("copy_engine", count, 0, f"forced copy_engine ({key})", times,
                             taper=taper, replay=replay)

    if mode == "tracked":
        options = [(times[key], key) for key in times if key.startswith("tracked")]
        if not options or min(options)[0] == float("inf"):
            return OverlapChoice("sequential", 1, 0, "overlap_mode='tracked' refused: cuBLASLt takes "
                                 "no chunk counters for this site (tracked_chunks empty or misfit)",
                                 times)
        key = min(options)[1]
        name, count, comm_sms = parse_tracked_key(key)
        return OverlapChoice(name, count, comm_sms, f"forced tracked ({key})", times)

    def margin(key: str) -> float:
        return max(MARGINS[key.split(":")[0]], MARGIN_MULTI if world > 2 else 0.0)

    candidates = [(times[key], key) for key in times if key.split(":")[0] in MARGINS]
    winners = [(t, key) for t, key in candidates if t <= sequential * (1 - margin(key))]
    if not winners:
        best_time, best_key = min(candidates)
        return OverlapChoice(
            "sequential", 1, 0,
            f"best overlap {best_key} estimated {best_time * 1e3:.3f} ms vs sequential "
            f"{sequential * 1e3:.3f} ms: gain below {margin(best_key):.0%}", times)
    best_time, best_key = min(winners)
    reason = f"{best_key} estimated {best_time * 1e3:.3f} ms vs sequential {sequential * 1e3:.3f} ms"
    if best_key.startswith("tracked"):
        name, count, comm_sms = parse_tracked_key(best_key)
        return OverlapChoice(name, count, comm_sms, reason, times)
    name, value = best_key.split(":")
    if name == "tile":
        return OverlapChoice("tile", 1, int(value), reason, times)
    if name == "copy_engine":
        count, taper = _parse_copy_engine_key(best_key)
        return OverlapChoice(name, count, 0, reason, times, taper=taper, replay=replay)
    return OverlapChoice(name, int(value), 0, reason, times)


def plan_key(choice: OverlapChoice) -> str:
    """The estimate (and bench column) key of a choice: 'sequential', 'chunked:4', 'tile:16',
    'copy_engine:3x0.5', ..."""
    if choice.mode == "sequential":
        return "sequential"
    if choice.mode == "copy_engine":
        return copy_engine_key(choice.chunks, choice.taper)
    if choice.mode.startswith("tracked"):
        return tracked_key(choice.mode, choice.chunks, choice.comm_sms)
    return f"{choice.mode}:{choice.comm_sms if choice.mode == 'tile' else choice.chunks}"


def _best(times: dict[str, float], prefix: str) -> tuple[float, int]:
    options = [(value, int(key.split(":")[1])) for key, value in times.items() if key.startswith(prefix)]
    return min(options) if options else (float("inf"), 0)
