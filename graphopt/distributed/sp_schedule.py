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
from typing import Optional

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
    ``keys`` of its key columns (only a split diagonal takes part of the keys). ``assist``: rows of
    the source's own diagonal block (its queries against its keys) this rank computes too, for a
    source with more work than its peers (masked schedules only)."""

    kind: str
    rows: tuple[Fraction, Fraction] = ALL_ROWS
    keys: tuple[Fraction, Fraction] = ALL_ROWS
    assist: Optional[tuple[Fraction, Fraction]] = None

    @property
    def needs_source_kv(self) -> bool:
        return self.kind == OWNER or self.assist is not None

    def assist_range(self, chunk_len: int) -> tuple[int, int]:
        return index_range(self.assist, chunk_len)

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
    head, tail = (Step(0, tuple(Task(DIAGONAL, task.rows, keys) for task in diagonal.tasks))
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


def computed_blocks(step: Step, rank: int) -> list[tuple[int, int, tuple[Fraction, Fraction],
                                                         tuple[Fraction, Fraction]]]:
    """(query chunk, key chunk, query rows, key columns) of each block ``rank`` computes in
    ``step`` (an assisting rank computes two)."""
    task = step.tasks[rank]
    blocks = []
    if task.kind == DIAGONAL:
        blocks.append((rank, rank, task.rows, task.keys))
    elif task.kind == OWNER:
        blocks.append((rank, step.source(rank), task.rows, task.keys))
    elif task.kind == HELPER:
        blocks.append((step.source(rank), rank, task.rows, task.keys))
    if task.assist is not None:
        blocks.append((step.source(rank), step.source(rank), task.assist, ALL_ROWS))
    return blocks


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
            for query_chunk, key_chunk, rows, keys in computed_blocks(step, rank):
                work[rank] += block_work(query_chunk, key_chunk, rows, causal, keys)
    return work


def blocks_covered(schedule: tuple[Step, ...]) -> dict[tuple[int, int], list[tuple[
        tuple[Fraction, Fraction], tuple[Fraction, Fraction]]]]:
    """For each (query chunk, key chunk), the (query rows, key columns) rectangles computed for
    it, in step order."""
    covered: dict[tuple[int, int], list] = {}
    for step in schedule:
        for rank in range(len(step.tasks)):
            for block in computed_blocks(step, rank):
                covered.setdefault(block[:2], []).append(block[2:])
    return covered


# --- masked attention: sliding windows and packed documents -----------------------------------------
#
# A window or packed documents leave some blocks empty and make the others' work data-dependent:
# the schedule is built from the work of every block, counted from the mask. An empty block is
# neither computed nor sent. Block (i, j), i > j, may be computed by its owner i (rows [0, f), k/v
# of chunk j travel at step i - j) and/or its helper j (rows [f, 1), queries of chunk i travel at
# step P - (i - j) and partial results come back); rows of a diagonal block (i, i) by rank i or by
# any rank x, which then receives queries and keys/values of chunk i at step (x - i) mod P and sends
# partial results back (an "assist"). At every step a rank exchanges with one source, so all of
# its tasks at that step read the same peer's data. The shares are chosen so the ranks' work is as
# even as the granularity of rows allows -- with documents of unequal lengths, as even as torch's
# context parallel gets by splitting every document into head and tail pieces.

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
    key_chunks = torch.arange(world_size)[:, None] * chunk  # [P, 1]
    counts = []
    for row_first, row_last in zip(first, last):
        lo = torch.maximum(row_first[None], key_chunks)   # [P, S]
        hi = torch.minimum(row_last[None], key_chunks + chunk - 1)
        counts.append((hi - lo + 1).clamp(min=0))
    return torch.stack(counts).sum(0).reshape(world_size, world_size, chunk)


def balance_shares(work: list[list[int]], min_share: float = 0.0, sweeps: int = 400) -> dict:
    """{(i, j): {rank: share of block (i, j)'s work}} for every non-empty block, j <= i: block
    (i, j), i > j, goes to i and/or j, diagonal block (i, i) to any rank. Minimises the sum of
    squared rank loads (whose minimiser also has the least largest load) by coordinate descent:
    each block in turn fills its candidate ranks up to one level (water-filling). A rank whose
    share of a block is below ``min_share`` of the mean rank load is then dropped from that
    block's candidates (a transfer for little compute) and the rest balanced again."""
    world = len(work)
    candidates = {(i, j): ([i, j] if i != j else list(range(world)))
                  for i in range(world) for j in range(i + 1) if work[i][j] > 0}
    shares = {block: {block[0]: float(work[block[0]][block[1]])} for block in candidates}
    load = [0.0] * world
    for block, split in shares.items():
        for rank, share in split.items():
            load[rank] += share
    total = sum(load) or 1.0
    for _ in range(world + 1):  # rounds of dropping small shares
        for _ in range(sweeps):
            moved = 0.0
            for block, ranks in candidates.items():
                split = shares[block]
                rest = {r: load[r] - split.get(r, 0.0) for r in ranks}
                new = _water_fill(rest, float(work[block[0]][block[1]]))
                for r in set(ranks) | set(split):
                    delta = new.get(r, 0.0) - split.get(r, 0.0)
                    if delta:
                        moved = max(moved, abs(delta))
                        load[r] += delta
                shares[block] = new
            if moved < 1e-6 * total:
                break
        dropped = False
        for block, split in shares.items():
            small = [r for r, share in split.items()
                     if r != block[0] and share < min_share * total / world]
            if small:
                candidates[block] = [r for r in candidates[block] if r not in small]
                dropped = True
        if not dropped:
            break
    return shares


def _water_fill(levels: dict, amount: float) -> dict:
    """Shares of ``amount`` that raise the lowest ``levels`` to one common level."""
    ranks = sorted(levels, key=lambda r: (levels[r], r))
    filled = 0
    level = levels[ranks[0]]
    remaining = amount
    while filled < len(ranks):
        filled += 1
        ceiling = levels[ranks[filled]] if filled < len(ranks) else float("inf")
        room = (ceiling - level) * filled
        if room >= remaining:
            level += remaining / filled
            break
        remaining -= room
        level = ceiling
    return {r: level - levels[r] for r in ranks[:filled] if level > levels[r]}


# A share of a block below this fraction of a rank's mean work costs a transfer for little compute:
# it is not made.
MIN_SHARE = 0.01


def _row_cuts(row_work, shares: list[float]) -> list[int]:
    """Row boundaries that cut ``row_work`` (per row) into consecutive parts of about ``shares``."""
    cumulative = row_work.cumsum(0)
    cuts, target = [], 0.0
    for share in shares[:-1]:
        target += share
        cuts.append(int((cumulative < target).sum()) + 1)
    rows = len(row_work)
    cuts = [min(max(c, 0), rows) for c in cuts]
    return [0] + [max(c, previous) for previous, c in zip([0] + cuts, cuts)] + [rows]


def build_masked_schedule(counts, load_balance: bool = True) -> tuple[Step, ...]:
    """The steps of causal attention whose per-row visible keys per block are ``counts`` (from
    ``visible_keys``): step 0 is the diagonal, empty blocks are left out, steps where every rank
    is idle are dropped."""
    world, chunk = counts.shape[0], counts.shape[2]
    work = [[int(counts[j, i].sum()) for j in range(world)] for i in range(world)]
    if load_balance:
        shares = balance_shares(work, MIN_SHARE)
    else:
        shares = {(i, j): {i: float(work[i][j])} for i in range(world) for j in range(i + 1)
                  if work[i][j] > 0}
    owner_rows: dict = {}    # (i, j) -> rows of chunk i its owner (or, diagonal, rank i) computes
    helper_rows: dict = {}   # (i, j) -> rows of chunk i rank j computes
    assists: dict = {}       # (x, i) -> rows of chunk i's diagonal rank x computes
    for (i, j), split in shares.items():
        split = {r: share for r, share in split.items() if share > 0 or r == i}
        order = [i] + sorted((r for r in split if r != i), key=lambda r: (r - i) % world)
        bounds = _row_cuts(counts[j, i], [split.get(r, 0.0) for r in order])
        for rank, lo, hi in zip(order, bounds, bounds[1:]):
            if hi <= lo:
                continue
            rows = (Fraction(lo, chunk), Fraction(hi, chunk))
            if rank == i:
                owner_rows[(i, j)] = rows
            elif i == j:
                assists[(rank, i)] = rows
            else:
                helper_rows[(i, j)] = rows
    diagonal = tuple(Task(DIAGONAL, owner_rows.get((r, r), (Fraction(0), Fraction(0))))
                     for r in range(world))
    steps = [Step(0, diagonal)]
    for shift in range(1, world):
        tasks = []
        for rank in range(world):
            source = (rank - shift) % world
            if rank > source and (rank, source) in owner_rows:
                task = Task(OWNER, owner_rows[(rank, source)])
            elif rank < source and (source, rank) in helper_rows:
                task = Task(HELPER, helper_rows[(source, rank)])
            else:
                task = Task(IDLE)
            if (rank, source) in assists:
                task = dataclasses.replace(task, assist=assists[(rank, source)])
            tasks.append(task)
        if any(task.kind != IDLE or task.assist is not None for task in tasks):
            steps.append(Step(shift, tuple(tasks)))
    return tuple(steps)


def masked_work_per_rank(schedule: tuple[Step, ...], counts) -> list[int]:
    """Visible (query, key) pairs each rank computes over ``schedule`` (counts from
    ``visible_keys``)."""
    chunk = counts.shape[2]
    work = [0] * len(schedule[0].tasks)
    for step in schedule:
        for rank in range(len(step.tasks)):
            for query_chunk, key_chunk, rows, keys in computed_blocks(step, rank):
                start, stop = index_range(rows, chunk)
                if keys != ALL_ROWS:  # a split diagonal: count the keys of its columns only
                    key_start, key_stop = index_range(keys, chunk)
                    work[rank] += _diagonal_part(counts, query_chunk, start, stop, key_start,
                                                 key_stop)
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
