"""The sequence-parallel attention schedule as a pure function: coverage, balance, step count."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings, strategies as st

from graphopt.distributed.sp_schedule import (DIAGONAL, HELPER, IDLE, OWNER, Task, block_work,
                                              blocks_covered, build_schedule, local_blocks,
                                              split_diagonal, work_per_rank)


def _needed_blocks(p: int, causal: bool) -> set[tuple[int, int]]:
    return {(i, j) for i in range(p) for j in range(p) if not causal or j <= i}


def _tile_once(rectangles) -> bool:
    """The (rows, keys) rectangles tile the unit square exactly once: no two overlap and their
    areas add up to 1."""
    area = sum((r1 - r0) * (k1 - k0) for (r0, r1), (k0, k1) in rectangles)
    for i, ((r0, r1), (k0, k1)) in enumerate(rectangles):
        for (s0, s1), (j0, j1) in rectangles[i + 1:]:
            if max(r0, s0) < min(r1, s1) and max(k0, j0) < min(k1, j1):
                return False
    return area == 1


@settings(max_examples=20, deadline=None)
@given(p=st.integers(1, 12), causal=st.booleans(), balance=st.booleans(), split=st.booleans())
def test_every_needed_block_is_computed_exactly_once(p, causal, balance, split):
    schedule = build_schedule(p, causal, balance)
    covered = blocks_covered(split_diagonal(schedule) if split else schedule)
    assert set(covered) == _needed_blocks(p, causal)
    assert all(_tile_once(rectangles) for rectangles in covered.values())


@pytest.mark.parametrize("p", range(2, 7))
@pytest.mark.parametrize("causal", [True, False])
def test_split_diagonal_opens_and_closes_the_schedule_without_changing_the_work(p, causal):
    schedule = build_schedule(p, causal)
    split = split_diagonal(schedule)
    assert split[1:-1] == schedule[1:]
    assert all(task.kind == DIAGONAL for step in (split[0], split[-1]) for task in step.tasks)
    assert work_per_rank(split, causal) == work_per_rank(schedule, causal)
    if causal:  # the first half of the keys holds 3/4 of the diagonal's work
        head = block_work(0, 0, (0, 1), True, split[0].tasks[0].keys)
        assert head == Fraction(3, 8) and block_work(0, 0, (0, 1), True,
                                                     split[-1].tasks[0].keys) == Fraction(1, 8)
    assert split_diagonal(build_schedule(1, causal)) == build_schedule(1, causal)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 40), causal=st.booleans(), half=st.sampled_from([0, 1]))
def test_local_blocks_are_diagonal_squares_or_fully_visible(n, causal, half):
    """At integer indices too: each block is a square on the diagonal (q_offset == k_offset) or
    below it, and together they cover the diagonal block's allowed entries exactly once."""
    task = split_diagonal(build_schedule(2, causal))[-half].tasks[0]
    seen = torch.zeros(n, n, dtype=torch.int64)
    for rows, keys in local_blocks(task, causal):
        r0, r1 = Task(DIAGONAL, rows=rows).row_range(n)
        k0, k1 = Task(DIAGONAL, keys=keys).key_range(n)
        square = (r0, r1) == (k0, k1)
        assert not causal or square or r0 >= k1 or r0 == r1 or k0 == k1
        block = torch.ones(r1 - r0, k1 - k0, dtype=torch.int64)
        seen[r0:r1, k0:k1] += block.tril() if causal and square else block
    k0, k1 = task.key_range(n)
    allowed = torch.ones(n, n, dtype=torch.int64)
    allowed = allowed.tril() if causal else allowed
    assert torch.equal(seen[:, k0:k1], allowed[:, k0:k1])
    assert seen[:, :k0].sum() == 0 and seen[:, k1:].sum() == 0


@pytest.mark.parametrize("p", range(2, 11))
def test_balanced_causal_schedule_gives_every_rank_the_same_work(p):
    schedule = build_schedule(p, causal=True, load_balance=True)
    work = work_per_rank(schedule, causal=True)
    assert set(work) == {Fraction(p, 2)}  # P diagonal halves + P(P-1)/2 blocks = P^2/2 over P ranks
    assert len(schedule) == 1 + (p - 1) // 2 + (1 if p % 2 == 0 else 0)
    assert len(schedule) <= p // 2 + 1


@pytest.mark.parametrize("p", range(2, 9))
def test_plain_ring_loads_the_last_rank(p):
    schedule = build_schedule(p, causal=True, load_balance=False)
    work = work_per_rank(schedule, causal=True)
    assert work[-1] == p - Fraction(1, 2) and work[0] == Fraction(1, 2)
    assert len(schedule) == p


@pytest.mark.parametrize("p", range(2, 9))
def test_noncausal_ring_is_balanced(p):
    work = work_per_rank(build_schedule(p, causal=False), causal=False)
    assert set(work) == {Fraction(p)}


@settings(max_examples=20, deadline=None)
@given(p=st.integers(2, 12), causal=st.booleans(), balance=st.booleans())
def test_every_step_is_one_consistent_exchange(p, causal, balance):
    """Owners read k/v from their source, helpers read queries of a later chunk: a helper never
    computes a block above the causal diagonal, and a rank sending to a helper sends q rows the
    helper's task names."""
    for step in build_schedule(p, causal, balance):
        assert (step.shift == 0) == all(t.kind == DIAGONAL for t in step.tasks)
        for rank, task in enumerate(step.tasks):
            src = step.source(rank)
            assert step.destination(src) == rank
            if task.kind == OWNER and causal:
                assert src < rank
            if task.kind == HELPER:
                assert causal and src > rank
            assert task.kind in (DIAGONAL, OWNER, HELPER, IDLE)


def test_split_step_halves_one_block_between_owner_and_helper():
    (_, split) = build_schedule(2, causal=True)
    assert split.tasks[1].kind == OWNER and split.tasks[0].kind == HELPER
    assert split.tasks[1].row_range(7) == (0, 3) and split.tasks[0].row_range(7) == (3, 7)
    assert block_work(1, 1, (Fraction(1, 2), Fraction(1)), causal=True) == Fraction(3, 8)


def test_world_size_must_be_positive():
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        build_schedule(0, causal=True)


# --- masked schedules: sliding windows and packed documents ----------------------------------------

def _positions(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths])[None]


def _masked(p: int, chunk: int, window: int = 0, lengths=None, load_balance: bool = True):
    from graphopt.distributed.sp_schedule import build_masked_schedule, visible_keys
    from graphopt.ops.attention import document_bounds
    row_start = None if lengths is None else document_bounds(_positions(lengths))[0]
    counts = visible_keys(p, chunk, window, row_start)
    return build_masked_schedule(counts, load_balance), counts


def _random_lengths(total: int, low: int, high: int, seed: int) -> list[int]:
    gen, lengths = torch.Generator().manual_seed(seed), []
    while sum(lengths) < total:
        lengths.append(min(int(torch.randint(low, high, (1,), generator=gen)),
                           total - sum(lengths)))
    return lengths


@settings(max_examples=25, deadline=None)
@given(p=st.integers(2, 5), chunk=st.integers(2, 12), window=st.sampled_from([0, 1, 3, 10]),
       documents=st.booleans(), load_balance=st.booleans(), seed=st.integers(0, 999))
def test_masked_schedules_compute_every_visible_row_once_and_skip_empty_blocks(
        p, chunk, window, documents, load_balance, seed):
    """Rows of every block with a visible pair are computed exactly once (by its owner, helper or
    assisting ranks); blocks without one appear in no task, so nothing of them is sent."""
    from graphopt.distributed.sp_schedule import computed_blocks, index_range
    lengths = _random_lengths(p * chunk, 1, 2 * chunk, seed) if documents else None
    schedule, counts = _masked(p, chunk, window or (0 if documents else 2), lengths, load_balance)
    rows_of: dict = {}
    for step in schedule:
        for rank in range(p):
            for query, key, rows, keys in computed_blocks(step, rank):
                assert keys == (0, 1)
                rows_of.setdefault((query, key), []).append(index_range(rows, chunk))
    for i in range(p):
        for j in range(p):
            visible = int(counts[j, i].sum())
            if not visible:
                assert (i, j) not in rows_of
                continue
            covered = sorted(rows_of[(i, j)])
            assert covered[0][0] == 0 and covered[-1][1] == chunk
            assert all(a[1] == b[0] for a, b in zip(covered, covered[1:])), covered


def test_a_window_narrower_than_a_chunk_sends_only_to_the_next_rank():
    """Window 5, chunks of 8: a query sees keys of its own chunk and the previous one only."""
    schedule, _ = _masked(6, 8, window=5)
    assert {step.shift for step in schedule} <= {0, 1, 5}  # 5: the previous chunk's helper step
    for step in schedule:
        for rank, task in enumerate(step.tasks):
            if task.kind == OWNER:
                assert step.source(rank) == rank - 1


def _head_tail_work(lengths: list[int], p: int) -> list[int]:
    """Work per rank under torch's context parallel with its per-document head-tail balancer:
    every document split in 2P pieces, rank r holding pieces r and 2P - 1 - r (a token at offset
    t of its document sees t + 1 keys)."""
    work = [0] * p
    for n in lengths:
        pieces = torch.arange(n).tensor_split(2 * p)
        for r in range(p):
            work[r] += int((pieces[r] + 1).sum() + (pieces[2 * p - 1 - r] + 1).sum())
    return work


def _imbalance(work) -> float:
    return max(work) / (sum(work) / len(work))


@pytest.mark.parametrize("p", [2, 4, 8])
@pytest.mark.parametrize("kind, low, high", [("long", 512, 4096), ("mixed", 16, 3000),
                                             ("short", 16, 200)])
def test_documents_are_balanced_at_least_as_well_as_torch_head_tail(p, kind, low, high):
    """Max over mean work per rank, ours (contiguous chunks, owner / helper / assist shares)
    against torch's head-tail layout of the same documents; within 0.003 of it where rows are
    coarser than its pieces, and far better than leaving every block with its owner."""
    from graphopt.distributed.sp_schedule import masked_work_per_rank
    chunk = 1024
    for seed in range(3):
        lengths = _random_lengths(p * chunk, low, high, seed)
        schedule, counts = _masked(p, chunk, lengths=lengths)
        ours = _imbalance(masked_work_per_rank(schedule, counts))
        theirs = _imbalance(_head_tail_work(lengths, p))
        assert ours <= theirs + 0.003, (lengths, ours, theirs)
        unbalanced, counts = _masked(p, chunk, lengths=lengths, load_balance=False)
        assert ours <= _imbalance(masked_work_per_rank(unbalanced, counts))
