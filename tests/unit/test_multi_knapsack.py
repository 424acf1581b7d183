"""The multiple-knapsack assignment of samples to ranks and the step plans built on it.

Optimality is checked against brute force over every assignment of small instances; the plan's
properties (each rank runs exactly its capacity, balancing never makes the heaviest rank heavier,
ties and repeats give the same answer) on random ones.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest

from graphopt.analysis import attention_work, multi_knapsack


def _brute_force(weights, bins, per_bin) -> float:
    """The lightest possible heaviest bin, over every assignment."""
    best = math.inf
    for labels in itertools.product(range(bins), repeat=len(weights)):
        if any(labels.count(b) != per_bin for b in range(bins)):
            continue
        loads = [sum(w for w, label in zip(weights, labels) if label == b) for b in range(bins)]
        best = min(best, max(loads))
    return best


CASES = [([5, 5, 4, 3, 3, 2], 2, 3), ([9, 1, 1, 1, 8, 2], 2, 3), ([7, 6, 5, 4, 3, 2, 1, 1], 2, 4),
         ([3, 3, 2, 2, 2, 2], 3, 2), ([10, 9, 1, 1, 1, 1, 1, 1], 4, 2), ([0, 0, 5, 5], 2, 2)]


@pytest.mark.parametrize("weights,bins,per_bin", CASES)
def test_partition_is_optimal_on_small_cases(weights, bins, per_bin):
    result = multi_knapsack.partition(weights, bins, per_bin)
    assert result.optimal
    assert result.max_load == pytest.approx(_brute_force(weights, bins, per_bin))
    assert sorted(i for items in result.bins for i in items) == list(range(len(weights)))
    assert all(len(items) == per_bin for items in result.bins)


def test_partition_is_optimal_on_random_small_cases():
    rng = random.Random(7)
    for _ in range(25):
        bins, per_bin = rng.choice([(2, 3), (2, 4), (3, 2), (4, 2)])
        weights = [round(rng.uniform(0, 10), 2) for _ in range(bins * per_bin)]
        result = multi_knapsack.partition(weights, bins, per_bin)
        assert result.optimal
        assert result.max_load == pytest.approx(_brute_force(weights, bins, per_bin)), weights


def test_hierarchical_matches_brute_force_where_the_decoupling_loses_nothing():
    weights = [4, 4, 3, 3, 2, 2, 1, 1]
    result = multi_knapsack.partition_hierarchical(weights, nodes=2, gpus_per_node=2, per_gpu=2)
    assert result.max_load == pytest.approx(_brute_force(weights, 4, 2)) == 5
    # GPU pairs 0-1 and 2-3 are the nodes: the node split is balanced too
    assert sum(result.loads[:2]) == pytest.approx(sum(result.loads[2:]))


def test_large_instances_balance_and_stay_deterministic():
    rng = random.Random(3)
    weights = [rng.choice([0, 1, 2, 3, 4]) * 1.5 for _ in range(8 * 16)]
    first = multi_knapsack.partition_hierarchical(weights, 2, 4, 16)
    again = multi_knapsack.partition_hierarchical(list(weights), 2, 4, 16)
    assert first == again
    before = multi_knapsack.contiguous(weights, 8, 16)
    assert first.imbalance() <= before.imbalance()
    # weights are multiples of 1.5: the heaviest bin cannot be lighter than the mean rounded up
    assert first.max_load == pytest.approx(math.ceil(sum(weights) / 8 / 1.5) * 1.5)


def test_bad_instances_are_refused_with_the_numbers():
    with pytest.raises(ValueError, match="7 items do not fill 2 bins of 4"):
        multi_knapsack.partition([1] * 7, 2, 4)
    with pytest.raises(ValueError, match="finite and >= 0"):
        multi_knapsack.partition([1, -1], 1, 2)


# --- step plans -----------------------------------------------------------------------------------

def test_a_step_plan_fills_every_capacity_and_balances_the_ranks():
    rng = random.Random(0)
    ranks, batch, modules = 4, 8, 6
    # correlated importance: some samples matter in every module, so their selections cost more
    hardness = [rng.random() for _ in range(ranks * batch)]
    priority = [[h + 0.3 * rng.random() for h in hardness] for _ in range(modules)]
    capacities = [5, 5, 5, 5, 8, 0]
    plan = attention_work.plan_step(priority, capacities, batch, ranks, 2, [1.0] * modules)
    assert sorted(i for items in plan.rank_samples for i in items) == list(range(ranks * batch))
    for rank_choice in plan.chosen:
        assert [len(c) for c in rank_choice] == capacities
        assert all(all(0 <= i < batch for i in c) for c in rank_choice)
    assert max(plan.work_after) <= max(plan.work_before)
    assert plan.imbalance_after <= 1.05 < plan.imbalance_before
    assert plan.planned_cells == ranks * sum(capacities)
    again = attention_work.plan_step(priority, capacities, batch, ranks, 2, [1.0] * modules)
    assert again == plan


def test_layer_fractions_follow_the_importance_within_the_budget():
    fractions = attention_work.layer_fractions([0.1, 0.4, 0.4, 0.0], kept_fraction=0.5, batch=8)
    assert sum(f * 8 for f in fractions) == 16  # 0.5 x 4 modules x 8 samples
    assert fractions[3] == 0.0 and fractions[1] == fractions[2] == 7 / 8
    assert attention_work.layer_fractions([0, 0], 0.5, 4) == (0.5, 0.5)
    assert attention_work.layer_fractions([5.0, 1.0], 1.0, 4) == (1.0, 1.0)


def test_module_work_prices_frozen_weights_without_their_gradient():
    trained = attention_work.Gemm(100.0, attention=False, trained=True)
    frozen = attention_work.Gemm(100.0, attention=False, trained=False)
    core = attention_work.Gemm(100.0, attention=True)
    assert attention_work.module_flops([trained, frozen, core]) == 300 + 200 + 350
    assert [attention_work.capacity(f, 8) for f in (0.0, 0.01, 0.5, 0.6, 1.0)] == [0, 1, 4, 5, 8]
