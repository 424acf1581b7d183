"""The step schedule of sequence-parallel attention: which rank computes which block, and when.

Rank r of P holds the contiguous query/key/value chunk r of a sequence. Attention over the whole
sequence is the set of blocks (i, j): queries of chunk i against keys/values of chunk j. Causal
attention needs the blocks j <= i: P diagonal blocks (half a block of work each, masked) and
P(P-1)/2 full off-diagonal blocks. Left where they fall (the plain ring), rank r computes r + 1/2
units of work while rank 0 computes 1/2, and the step count is P.

Every step here has one ``shift`` d: each rank r sends to (r + d) % P and receives from
(r - d) % P, so a step is one P2P exchange, and what travels is the sender's own data (nothing is
forwarded), so every transfer can start a step ahead of its use. The balanced causal schedule
(DISTFLASHATTN) pairs the blocks at distance d (i - j = d, P - d of them) with those at distance
P - d (d of them): one step of P blocks, one per rank.

    distance d, rank i >= d   "owner":  receives k/v of chunk i - d, computes (q_i, kv_{i-d})
    distance P-d, rank j < d  "helper": receives q of chunk j - d + P, computes it against its own
                                        k/v, sends (out, lse) back (the owner merges in float32)

For P even, distance P/2 has only P/2 blocks: each is split by query rows, the owner computing the
first half and the helper the second. Steps: 1 + ceil((P - 1) / 2) + (1 if P is even, the split
step) -- about P/2 + 1 -- and every rank does (P + 1) / 2 blocks of work, where the ring's busiest
rank does P - 1/2. Non-causal attention is the plain ring (every rank does P blocks, balanced).

The backward pass runs the same steps: the owner of a block receives k/v again and returns
dk/dv partials; a helper receives (q, dout, lse, delta) and returns dq partials.

The runtime opens and closes with the diagonal (``split_diagonal``): half of its key columns
first, to hide the first step's inputs in flight, the other half last, to hide the last partial
results on their way back.

``build_schedule`` is a pure function of (P, causal, load_balance); ``work_per_rank`` and
``blocks_covered`` let tests check a schedule without running it.
"""

from __future__ import annotations

import dataclasses
import functools
from fractions import Fraction

DIAGONAL = "diagonal"  # own queries against own keys/values (masked when causal)
OWNER = "owner"        # own queries (``rows`` of them) against the k/v received from the source
HELPER = "helper"      # the source's queries (``rows`` of them) against own k/v; result goes back
IDLE = "idle"

ALL_ROWS = (Fraction(0), Fraction(1))
FIRST_HALF = (Fraction(0), Fraction(1, 2))
SECOND_HALF = (Fraction(1, 2), Fraction(1))


def index_range(part: tuple[Fraction, Fraction], chunk_len: int) -> tuple[int, int]:
    """A fraction range of a chunk as [start, stop) indices into ``chunk_len`` positions."""
    start, stop = part
    return int(start * chunk_len), int(stop * chunk_len)


@dataclasses.dataclass(frozen=True)
class Task:
    """What one rank computes in one step. ``rows`` are fractions of a chunk's query rows,
    ``keys`` of its key columns (only a split diagonal takes part of the keys)."""

    kind: str
    rows: tuple[Fraction, Fraction] = ALL_ROWS
    keys: tuple[Fraction, Fraction] = ALL_ROWS

    def row_range(self, chunk_len: int) -> tuple[int, int]:
        """The rows as [start, stop) indices into a chunk of ``chunk_len`` queries."""
        return index_range(self.rows, chunk_len)

    def key_range(self, chunk_len: int) -> tuple[int, int]:
        """The keys as [start, stop) indices into a chunk of ``chunk_len`` keys."""
        return index_range(self.keys, chunk_len)


@dataclasses.dataclass(frozen=True)
class Step:
    """One exchange: rank r sends to (r + shift) % P, receives from (r - shift) % P, computes."""

    shift: int
    tasks: tuple[Task, ...]  # one per rank

    def source(self, rank: int) -> int:
        return (rank - self.shift) % len(self.tasks)

    def destination(self, rank: int) -> int:
        return (rank + self.shift) % len(self.tasks)


@functools.lru_cache(maxsize=None)
def build_schedule(world_size: int, causal: bool, load_balance: bool = True) -> tuple[Step, ...]:
    """The steps of attention over ``world_size`` contiguous chunks (step 0 is the diagonal)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    p = world_size
    steps = [Step(0, tuple(Task(DIAGONAL) for _ in range(p)))]
    if not causal:
        steps += [Step(d, tuple(Task(OWNER) for _ in range(p))) for d in range(1, p)]
    elif not load_balance:
        steps += [Step(d, tuple(Task(OWNER) if r >= d else Task(IDLE) for r in range(p)))
                  for d in range(1, p)]
    else:
        for d in range(1, (p + 1) // 2):
            steps.append(Step(d, tuple(Task(OWNER) if r >= d else Task(HELPER) for r in range(p))))
        if p % 2 == 0 and p > 1:
            half = p // 2
            steps.append(Step(half, tuple(Task(OWNER, FIRST_HALF) if r >= half
                                          else Task(HELPER, SECOND_HALF) for r in range(p))))
    return tuple(steps)


def split_diagonal(schedule: tuple[Step, ...]) -> tuple[Step, ...]:
    """``schedule`` with its diagonal step (the one that needs no transfer) split by key columns
    into a first and a last step: the first half of the keys (3/4 of a causal diagonal's work)
    runs while the next step's inputs travel, the second half while the last step's partial
    results travel back, so neither transfer waits uncovered. A single-rank schedule is returned
    as it is."""
    if len(schedule) == 1:
        return schedule
    diagonal, rest = schedule[0], schedule[1:]
    if diagonal.shift != 0 or any(task.kind != DIAGONAL for task in diagonal.tasks):
        raise ValueError("split_diagonal takes a schedule from build_schedule (diagonal first)")
    head, tail = (Step(0, tuple(Task(DIAGONAL, keys=keys) for _ in diagonal.tasks))
                  for keys in (FIRST_HALF, SECOND_HALF))
    return (head,) + rest + (tail,)


def local_blocks(task: Task, causal: bool) -> list[tuple[tuple[Fraction, Fraction],
                                                         tuple[Fraction, Fraction]]]:
    """A diagonal task as (rows, keys) blocks a kernel without offsets computes exactly: each is
    either a square on the causal diagonal or sees every key (the rows below the key columns)."""
    if task.kind != DIAGONAL:
        raise ValueError(f"local_blocks takes a diagonal task, got {task.kind}")
    start, stop = task.keys
    if not causal:
        return [(task.rows, task.keys)]
    if task.rows != ALL_ROWS:
        raise ValueError("a causal diagonal task is split by keys only")
    blocks = [((start, stop), (start, stop))]
    if stop < 1:
        blocks.append(((stop, Fraction(1)), (start, stop)))
    return blocks


def computed_block(step: Step, rank: int) -> tuple[int, int, tuple[Fraction, Fraction],
                                                   tuple[Fraction, Fraction]] | None:
    """(query chunk, key chunk, query rows, key columns) that ``rank`` computes in ``step``;
    None when idle."""
    task = step.tasks[rank]
    if task.kind == DIAGONAL:
        return rank, rank, task.rows, task.keys
    if task.kind == OWNER:
        return rank, step.source(rank), task.rows, task.keys
    if task.kind == HELPER:
        return step.source(rank), rank, task.rows, task.keys
    return None


def block_work(query_chunk: int, key_chunk: int, rows: tuple[Fraction, Fraction],
               causal: bool, keys: tuple[Fraction, Fraction] = ALL_ROWS) -> Fraction:
    """Work of a block in units of one full chunk x chunk block (a causal diagonal is 1/2)."""
    start, stop = rows
    first, last = keys
    if not (causal and query_chunk == key_chunk):
        return (stop - start) * (last - first)

    def below(x: Fraction) -> Fraction:  # area of rows [0, x) x keys [first, last) with key <= row
        if x <= first:
            return Fraction(0)
        if x <= last:
            return (x - first) ** 2 / 2
        return (last - first) ** 2 / 2 + (last - first) * (x - last)

    return below(stop) - below(start)


def work_per_rank(schedule: tuple[Step, ...], causal: bool) -> list[Fraction]:
    """Total block work each rank computes over the schedule."""
    work = [Fraction(0)] * len(schedule[0].tasks)
    for step in schedule:
        for rank in range(len(step.tasks)):
            block = computed_block(step, rank)
            if block is not None:
                query_chunk, key_chunk, rows, keys = block
                work[rank] += block_work(query_chunk, key_chunk, rows, causal, keys)
    return work


def blocks_covered(schedule: tuple[Step, ...]) -> dict[tuple[int, int], list[tuple[
        tuple[Fraction, Fraction], tuple[Fraction, Fraction]]]]:
    """For each (query chunk, key chunk), the (query rows, key columns) rectangles computed for
    it, in step order."""
    covered: dict[tuple[int, int], list] = {}
    for step in schedule:
        for rank in range(len(step.tasks)):
            block = computed_block(step, rank)
            if block is not None:
                covered.setdefault(block[:2], []).append(block[2:])
    return covered


# --- masked attention: sliding windows and packed documents -----------------------------------------
#
# A window or packed documents leave some blocks empty and make the others' work data-dependent:
# the schedule is built from the work of every block, counted from the mask. An empty block is
# neither computed nor sent. Every other block (i, j), i > j, is computed by its owner i (rows
# [0, f), k/v of chunk j travel at step i - j) and/or its helper j (rows [f, 1), queries of chunk i
# travel at step P - (i - j) and their partial results come back), with f chosen so that the ranks'
# work is as even as the owner/helper choices allow (diagonal blocks stay with their rank).

def visible_keys(world_size: int, chunk: int, window: int = 0, row_start=None):
    """[P (key chunk), P (query chunk), chunk] int64: how many keys of key chunk j each query row of
    chunk i sees under a causal mask narrowed by ``window`` and documents (``row_start`` [Bp, S]:
    where each position's document starts), summed over the batch rows."""
    import torch
    length = world_size * chunk
    positions = torch.arange(length)
    first = torch.zeros(1, length, dtype=torch.long)
    if window:
        first = torch.maximum(first, positions - window + 1)
    if row_start is not None:
        first = torch.maximum(first, row_start.to(torch.long))
    last = positions.expand_as(first)
    key_chunks = torch.arange(world_size)[:, None, None] * chunk  # [P, 1, 1]
    counts = []
    for row_first, row_last in zip(first, last):
        lo = torch.maximum(row_first[None], key_chunks[..., 0])   # [P, S]
        hi = torch.minimum(row_last[None], key_chunks[..., 0] + chunk - 1)
        counts.append((hi - lo + 1).clamp(min=0))
    return torch.stack(counts).sum(0).reshape(world_size, world_size, chunk)


def balance_shares(work: list[list[int]], diagonal: list[int], sweeps: int = 400) -> dict:
    """{(i, j): owner's share of block (i, j)'s work}, i > j, minimising the sum of squared rank
    loads (whose minimiser also has the least largest load) by coordinate descent: each block in
    turn evens out its two ranks as far as its work allows."""
    world = len(diagonal)
    shares = {(i, j): float(work[i][j]) for i in range(world) for j in range(i) if work[i][j] > 0}
    load = [float(d) for d in diagonal]
    for (i, j), share in shares.items():
        load[i] += share
    total = sum(load) or 1.0
    for _ in range(sweeps):
        moved = 0.0
        for (i, j), share in shares.items():
            w = float(work[i][j])
            rest_i, rest_j = load[i] - share, load[j] - (w - share)
            best = min(max((rest_j + w - rest_i) / 2, 0.0), w)
            if best != share:
                moved = max(moved, abs(best - share))
                load[i], load[j] = rest_i + best, rest_j + w - best
                shares[(i, j)] = best
        if moved < 1e-6 * total:
            break
    return shares


# A split below this fraction of a block's work costs a second transfer for little: it is not made.
MIN_SPLIT = 0.05


def build_masked_schedule(counts, load_balance: bool = True) -> tuple[Step, ...]:
    """The steps of causal attention whose per-row visible keys per block are ``counts`` (from
    ``visible_keys``): step 0 is the diagonal, empty blocks are left out, steps where every rank
    is idle are dropped."""
    world, chunk = counts.shape[0], counts.shape[2]
    work = [[int(counts[j, i].sum()) for j in range(world)] for i in range(world)]
    if load_balance:
        shares = balance_shares(work, [work[i][i] for i in range(world)])
    else:
        shares = {(i, j): float(work[i][j]) for i in range(world) for j in range(i)
                  if work[i][j] > 0}
    cuts = {}  # (i, j) -> owner rows [0, cut) of chunk i, helper rows [cut, chunk)
    for (i, j), share in shares.items():
        fraction = share / work[i][j]
        if fraction < MIN_SPLIT:
            cuts[(i, j)] = 0
        elif fraction > 1 - MIN_SPLIT:
            cuts[(i, j)] = chunk
        else:
            cumulative = counts[j, i].cumsum(0)
            cuts[(i, j)] = int((cumulative < share).sum()) + 1
            cuts[(i, j)] = min(max(cuts[(i, j)], 1), chunk - 1)
    steps = [Step(0, tuple(Task(DIAGONAL) for _ in range(world)))]
    for shift in range(1, world):
        tasks = []
        for rank in range(world):
            if rank >= shift:
                cut = cuts.get((rank, rank - shift), 0)
                tasks.append(Task(OWNER, (Fraction(0), Fraction(cut, chunk))) if cut
                             else Task(IDLE))
            else:
                cut = cuts.get((rank - shift + world, rank), chunk)
                tasks.append(Task(HELPER, (Fraction(cut, chunk), Fraction(1))) if cut < chunk
                             else Task(IDLE))
        if any(task.kind != IDLE for task in tasks):
            steps.append(Step(shift, tuple(tasks)))
    return tuple(steps)


def masked_work_per_rank(schedule: tuple[Step, ...], counts) -> list[int]:
    """Visible (query, key) pairs each rank computes over ``schedule`` (counts from
    ``visible_keys``)."""
    chunk = counts.shape[2]
    work = [0] * len(schedule[0].tasks)
    for step in schedule:
        for rank in range(len(step.tasks)):
            block = computed_block(step, rank)
            if block is None:
                continue
            query_chunk, key_chunk, rows, keys = block
            start, stop = index_range(rows, chunk)
            if keys != ALL_ROWS:  # a split diagonal: count the keys of its columns only
                key_start, key_stop = index_range(keys, chunk)
                work[rank] += _diagonal_part(counts, query_chunk, start, stop, key_start, key_stop)
            else:
                work[rank] += int(counts[key_chunk, query_chunk, start:stop].sum())
    return work


def _diagonal_part(counts, rank, start, stop, key_start, key_stop) -> int:
    """Pairs of diagonal rows [start, stop) with keys in columns [key_start, key_stop): rows see a
    contiguous run of keys ending at their own column."""
    import torch
    rows = torch.arange(start, stop)
    seen = counts[rank, rank, start:stop]
    first = rows - seen + 1
    lo = torch.maximum(first, torch.tensor(key_start))
    hi = torch.minimum(rows, torch.tensor(key_stop - 1))
    return int((hi - lo + 1).clamp(min=0).sum())
