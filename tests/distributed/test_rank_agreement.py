"""Ranks agree or fail together: two gloo processes compile graphs that differ in one way each, and
every rank fails within seconds with graphopt's message naming the difference and the ranks.

One spawn runs the cases in order (``_cases``); each records, per rank, the error it raised (or
None) and how long its compile took. Between cases the ranks meet at a barrier and forget
failures reported by the case before (a real run ends at the first one).
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from graphopt.distributed.launch import WorkerFailed, spawn

WORLD = 2
WITHIN_S = 10.0   # the bound on a mismatch becoming an error on every rank


class Attention(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class ReducedLinear(nn.Module):
    """A row-parallel linear written with a functional all-reduce (the graph names WORLD)."""

    def __init__(self, width: int = 8):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(8, width, generator=gen))

    def forward(self, x):
        import torch.distributed._functional_collectives as funcol
        partial = x @ self.weight
        if getattr(self, "graph_break_on_rank", None) == dist.get_rank():
            torch._dynamo.graph_break()
        return torch.tanh(funcol.all_reduce(partial, "sum", dist.group.WORLD)).sum()


class MaskedAttention(nn.Module):
    """Causal attention through a mask built from positions (the mask pass proves it causal),
    its output all-reduced."""

    def forward(self, q, k, v):
        import torch.distributed._functional_collectives as funcol
        positions = torch.arange(q.shape[-2])
        mask = positions[:, None] >= positions[None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return funcol.all_reduce(out, "sum", dist.group.WORLD).sum()


def _attempt(rank: int, make, *inputs, reset: bool = True, **flags) -> dict:
    """Compile and run ``make()`` on ``inputs``; the error this rank raised and the seconds taken."""
    import graphopt
    if reset:
        torch._dynamo.reset()
    begin = time.monotonic()
    try:
        compiled = torch.compile(make(), backend=graphopt.backend(codegen="eager", **flags))
        compiled(*inputs)
        error = None
    except Exception as raised:  # noqa: BLE001  the case decides which error it expects
        error = f"{type(raised).__name__}: {raised}"
    seconds = time.monotonic() - begin
    from graphopt.distributed import faults
    faults.clear()
    return {"error": error, "seconds": seconds}


def _cases(rank: int, world: int) -> dict[str, dict]:
    results = {}
    qkv = [torch.randn(1, 2, 8, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    # the case, at each rank's first compile: one rank's environment switches sequence
    # parallelism off, so its graph has no collective at all and waits for no one
    os.environ.pop("GRAPHOPT_SEQUENCE_PARALLEL_ATTENTION", None)
    if rank == 1:
        os.environ["GRAPHOPT_SEQUENCE_PARALLEL_ATTENTION"] = "0"
    results["flag_on_one_rank"] = _attempt(rank, Attention, *qkv, sequence_parallel_attention=True)
    os.environ.pop("GRAPHOPT_SEQUENCE_PARALLEL_ATTENTION", None)

    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(rank))
    results["same"] = _attempt(rank, ReducedLinear, x)
    # the same graph again on rank 1 only (its code cache was dropped): agreed before, so rank 1
    # waits for no one while rank 0 runs the graph it has
    if rank == 1:
        torch._dynamo.reset()
    results["recompile_on_one_rank"] = _attempt(rank, ReducedLinear, x, reset=False)
    results["flag_in_graph"] = _attempt(rank, ReducedLinear, x, memory_budget=0.5 + 0.25 * rank)
    # each case below compiles a graph no rank compiled before: a rank that had it already would run
    # it without compiling, and its peer would wait out the timeout (the message names why)
    results["shapes"] = _attempt(rank, ReducedLinear, torch.randn(5 + 2 * rank, 8))

    def broken():
        module = ReducedLinear(width=12)
        module.graph_break_on_rank = 1
        return module
    results["graph_break_on_one_rank"] = _attempt(rank, broken, x)

    from graphopt.analysis import overlap_cost
    choose = overlap_cost.choose_overlap
    if rank == 1:  # same graph, same flags, another decision (op times that differ, say)
        overlap_cost.choose_overlap = lambda *a, **k: choose(*a, **{**k, "chunks": 3})
    results["decision"] = _attempt(rank, ReducedLinear, x.requires_grad_(),
                                   overlap_matmul_collectives=True, overlap_mode="chunked")
    overlap_cost.choose_overlap = choose

    from graphopt.analysis.attention_masks import Unproven
    from graphopt.passes import specialize_attention_masks
    specialize = specialize_attention_masks._specialize
    if rank == 1:  # same flags, but the mask pass decides otherwise (other model code, say)
        def unproven(*args, **kwargs):
            raise Unproven(None, "this rank's mask differs")
        specialize_attention_masks._specialize = unproven
    results["pre_grad_decision"] = _attempt(rank, MaskedAttention, *qkv)
    specialize_attention_masks._specialize = specialize
    return results


@pytest.fixture(scope="module")
def outcomes():
    return spawn(_cases, WORLD)


def test_ranks_that_agree_compile_without_error(outcomes):
    for rank in range(WORLD):
        assert outcomes[rank]["same"]["error"] is None
        assert outcomes[rank]["recompile_on_one_rank"]["error"] is None
        assert outcomes[rank]["recompile_on_one_rank"]["seconds"] < WITHIN_S


@pytest.mark.parametrize("case, names", [
    ("flag_on_one_rank", ["flag sequence_parallel_attention", "rank 1 has False, rank 0 has True"]),
    ("flag_in_graph", ["flag memory_budget", "rank 1 has 0.75, rank 0 has 0.5"]),
    ("shapes", ["rank 1 compiled another graph than rank 0", "inputs"]),
    ("graph_break_on_one_rank", ["rank 1 compiled another graph than rank 0"]),
    ("decision", ["overlap_matmul_collectives at the joint stage: rank 1 decided otherwise"]),
    ("pre_grad_decision", ["specialize_attention_masks at the pre_grad stage: rank 1 decided "
                           "otherwise than rank 0 with the same flags"]),
])
def test_a_difference_fails_every_rank_within_seconds_naming_it(outcomes, case, names):
    for rank in range(WORLD):
        outcome = outcomes[rank][case]
        assert outcome["error"] is not None, (case, rank)
        assert "graphopt" in outcome["error"] and all(n in outcome["error"] for n in names), (
            case, rank, outcome["error"])
        assert outcome["seconds"] < WITHIN_S, (case, rank, outcome)


def _peer_fails(rank: int, world: int, report_path: str, when: str) -> None:
    """Rank 1 raises in user code: before its first compile (rank 0 waits in the agreement) or
    after a first step (rank 0 waits in the overlap pass's chunked all-reduce)."""
    import graphopt
    model = torch.compile(ReducedLinear(), backend=graphopt.backend(
        codegen="eager", overlap_matmul_collectives=True, overlap_mode="chunked"))
    x = torch.randn(4, 8)
    if when == "mid_step":
        model(x)
    if rank == 1:
        time.sleep(1.0)
        raise ValueError("a user op failed on rank 1")
    begin = time.monotonic()
    try:
        model(x)
    except Exception as raised:  # noqa: BLE001
        with open(report_path, "w") as handle:
            handle.write(f"{time.monotonic() - begin:.2f} {type(raised).__name__}: {raised}")
        raise


@pytest.mark.parametrize("when", ["before_compile", "mid_step"])
def test_a_rank_that_raises_ends_its_peers_wait_at_once_with_its_message(tmp_path, when):
    report = tmp_path / "rank0.txt"
    with pytest.raises(WorkerFailed):
        spawn(_peer_fails, WORLD, str(report), when, timeout_s=120)
    seconds, message = report.read_text().split(" ", 1)
    assert "rank 1 failed: ValueError: a user op failed on rank 1" in message
    assert float(seconds) < WITHIN_S
