"""The sequence-parallel attention schedule as a pure function: coverage, balance, step count."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings, strategies as st

from graphopt.distributed.sp_schedule import (DIAGONAL, HELPER, IDLE, OWNER, block_work,
                                              blocks_covered, build_schedule, work_per_rank)


def _needed_blocks(p: int, causal: bool) -> set[tuple[int, int]]:
    return {(i, j) for i in range(p) for j in range(p) if not causal or j <= i}


def _rows_cover_once(ranges) -> bool:
    """The query-row ranges tile [0, 1) exactly once."""
    edge = Fraction(0)
    for start, stop in sorted(ranges):
        if start != edge:
            return False
        edge = stop
    return edge == 1


@settings(max_examples=20, deadline=None)
@given(p=st.integers(1, 12), causal=st.booleans(), balance=st.booleans())
def test_every_needed_block_is_computed_exactly_once(p, causal, balance):
    covered = blocks_covered(build_schedule(p, causal, balance))
    assert set(covered) == _needed_blocks(p, causal)
    assert all(_rows_cover_once(rows) for rows in covered.values())


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
