"""Differential fuzzing of every pass against eager (``fuzz_models``): random small models compiled
with random flags must give eager's output and every gradient.

One gloo process pair runs all examples (process start-up paid once): each rank first fuzzes
single-process models on its own (memory budgets, offload, dynamic shapes, two forwards before one
backward, attention selection), then both fuzz sequence-parallel models with tensor-parallel MLPs
together (shard_attention, overlap_matmul_collectives, and the memory passes on top). Every pass runs in at least
``PROFILE.passes`` examples. Profiles (examples per phase):

    default (local):        distributed 24, single-process 2 x 12, Inductor 1 per rank
    CI (CI=true):           distributed 150, single-process 2 x 20, Inductor 1 per rank
    FUZZ_PROFILE=long:      distributed 1000, single-process 2 x 500, Inductor 4 per rank

``FUZZ_SEED`` fixes the seed. CI runs a fixed one (a commit's CI result does not hang on the draw;
new seeds are explored locally and with ``FUZZ_PROFILE=long``), elsewhere each run draws a new one.
The seed prints with any failure together with the line that reruns the failing case alone. A failure found becomes a regression case in
``REGRESSIONS`` below.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random

import pytest
import torch
import torch.distributed as dist

import fuzz_models
from graphopt.distributed.launch import spawn

PASSES = ("shard_attention", "specialize_attention_masks", "overlap_matmul_collectives",
          "plan_rematerialization", "offload_activations")
# on in about half the single-process examples (fine-tuning only, refused under sequence
# parallelism), each with an attention block and two samples or more; each must run in a fifth of
# those examples and rewrite in a third of its runs (dynamic shapes, a symbolic batch, refuse)
SINGLE_PROCESS_PASSES = ("attention_selection",)
# the mask pass has work only where sequence parallelism leaves the attention (single-process
# models: SDPA under a mask from positions, decomposed causal attention); every model runs it
REWRITES_ONLY_IN_SINGLE = {"specialize_attention_masks"}


@dataclasses.dataclass(frozen=True)
class Profile:
    distributed: int
    single: int          # per rank
    inductor: int        # per rank
    passes: int          # examples every pass must have run in


PROFILES = {"default": Profile(24, 12, 1, 24), "ci": Profile(150, 20, 1, 150),
            "long": Profile(1000, 500, 4, 1000)}
PROFILE = PROFILES[os.environ.get("FUZZ_PROFILE") or ("ci" if os.environ.get("CI") == "true"
                                                      else "default")]
CI_SEED = 1511046690  # the seed whose failure became the first regression case
SEED = int(os.environ.get("FUZZ_SEED") or (CI_SEED if os.environ.get("CI") == "true"
                                           else random.SystemRandom().randrange(2**31)))

# Cases the fuzzer once failed on (each ran wrong or raised until the fix named with it).
REGRESSIONS: list[dict] = [
    # float64 sequence-parallel attention off by 7e-9: graphopt::sp_attention merges in float32 by
    # design, so such cases are held to float32's tolerance (fuzz_models.tolerance)
    {"batch": 1, "blocks": [["sdpa", 1, True], ["tp_mlp", "all_reduce", False]], "dim": 8,
     "dtype": "float64", "dynamic": False, "forwards": 1, "seed": 0, "seq": 4, "world": 2,
     "flags": {"codegen": "eager", "debug": True, "offload_activations": True,
               "overlap_matmul_collectives": True, "overlap_mode": "chunked",
               "sequence_parallel_attention": True}},
    # a buffer updated in place (Dynamo's copy_ of its new value ends the forward) was read by a
    # value plan_rematerialization recomputed in the backward, after the write: qkv.weight's
    # gradient 4.6e3 x tolerance off; values read before an in-place write are now never recomputed
    {"batch": 1, "blocks": [["buffer", "running"], ["masked_sdpa", 1, "causal"]], "dim": 8,
     "dtype": "float32", "dynamic": False, "forwards": 1, "seed": 0, "seq": 3, "world": 1,
     "flags": {"codegen": "eager", "debug": False, "memory_budget": None,
               "offload_activations": True, "specialize_attention_masks": False,
               "offload_host_capacity": None, "offload_link_slack": 0.0}},
    # offload_activations hoisted a reload in front of another reload that had moved up itself,
    # above the symbolic size (s0 * s1) it reads: "used before it has been defined" at the
    # backward's lint; a reload now goes before the first node at its target that stays
    {"batch": 2, "blocks": [["linear", False], ["linear", False], ["norm", "layer"]], "dim": 8,
     "dtype": "float32", "dynamic": True, "forwards": 1, "seed": 0, "seq": 3, "world": 1,
     "flags": {"codegen": "eager", "debug": True, "memory_budget": 0.1,
               "offload_activations": True, "offload_host_capacity": None,
               "offload_link_slack": 0.0}},
    # two attention modules in a row: the second read the first's h + y, which the first's
    # rewrite erased (StopIteration in attention_selection); later modules now follow the rewrite
    {"batch": 2, "blocks": [["buffer", "scale"], ["sdpa", 1, False], ["sdpa", 1, False]], "dim": 8,
     "dtype": "float32", "dynamic": False, "forwards": 1, "seed": 0, "seq": 3, "world": 1,
     "flags": {"attention_selection": True, "attention_selection_kept_fraction": 0.5,
               "codegen": "eager", "debug": True, "memory_budget": None,
               "offload_activations": True, "offload_host_capacity": None,
               "offload_link_slack": 0.0}},
    # attention_selection's scores took float32 norms of float64 activations, which
    # linalg.vector_norm refuses (RuntimeError); they are now taken in float32 or wider
    {"batch": 2, "blocks": [["masked_sdpa", 1, "causal"]], "dim": 8, "dtype": "float64",
     "dynamic": False, "forwards": 1, "seed": 0, "seq": 3, "world": 1,
     "flags": {"attention_selection": True, "attention_selection_kept_fraction": 0.5,
               "codegen": "eager", "debug": True, "memory_budget": None,
               "offload_activations": True, "offload_host_capacity": None,
               "offload_link_slack": 0.0}},
    # bfloat16: eager SDPA under a window mask and graphopt's masked kernel (float32 inside) were
    # each 0.32 of scale off float64 on a gradient, 3.6 x tolerance apart; a bfloat16 result now
    # also passes where it is no farther from float64 than eager's (fuzz_models._float64_truth)
    {"batch": 3, "blocks": [["masked_sdpa", 4, "window"], ["masked_sdpa", 4, "full"], ["norm", "rms"],
                            ["buffer", "scale"], ["residual", "relu"]], "dim": 16, "dtype": "bfloat16",
     "dynamic": True, "forwards": 1, "seed": 1365, "seq": 5, "world": 1,
     "flags": {"attention_selection": False, "attention_selection_kept_fraction": 1.0, "codegen": "eager",
               "debug": True, "memory_budget": 0.8, "offload_activations": True,
               "offload_host_capacity": "3KiB", "offload_link_slack": 0.5}},
]


class FuzzFailure(AssertionError):
    pass


def _explore(strategy, examples: int, seed: int, together: bool) -> dict:
    """Run ``examples`` cases of ``strategy`` from ``seed``; pass counts and the failure, if any.
    ``together``: both ranks run the same cases and fail together (hypothesis shrinks the same
    way on both)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as fixed_seed

    counts = {name: {"ran": 0, "rewrote": 0} for name in PASSES + SINGLE_PROCESS_PASSES}
    done = []

    @settings(max_examples=examples, database=None, deadline=None, print_blob=False,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate, Phase.shrink])
    @fixed_seed(seed)
    @given(case=strategy)
    def explore(case):
        try:
            result, error = fuzz_models.run_case(case), None
        except Exception as raised:  # noqa: BLE001  a compile error is a finding like a wrong result
            result, error = None, f"{type(raised).__name__}: {str(raised)[:3000]}"
        failed = error is not None or result["worst"] > 1
        if together:
            flag = torch.tensor([float(failed)])
            dist.all_reduce(flag)
            failed = bool(flag.item())
        if failed:
            detail = error or {n: round(e, 2) for n, e in result["errors"].items() if e > 1}
            raise FuzzFailure(f"fuzz seed {seed}: {detail}\n  rerun: {fuzz_models.repro(case)}")
        done.append(case)
        for name, seen in result["passes"].items():
            counts[name]["ran"] += seen["ran"]
            counts[name]["rewrote"] += seen["rewrote"]

    failure = None
    try:
        explore()
    except FuzzFailure as error:
        failure = str(error)
    return {"examples": len(done), "counts": counts, "failure": failure}


def _fuzz(rank: int, world: int, profile: Profile, seed: int) -> dict:
    torch.set_num_threads(1)
    return {
        "single": _explore(fuzz_models.cases(world=1, offload=0.9), profile.single, seed + 1 + rank,
                           together=False),
        "distributed": _explore(fuzz_models.cases(world=2, offload=0.9), profile.distributed, seed,
                                together=True),
    }


@pytest.fixture(scope="module")
def fuzzed():
    return spawn(_fuzz, 2, PROFILE, SEED, timeout_s=120)


def test_every_example_matches_eager(fuzzed):
    failures = [f"rank {rank} {phase}: {result[phase]['failure']}" for rank, result in
                enumerate(fuzzed) for phase in ("single", "distributed") if result[phase]["failure"]]
    assert not failures, "\n".join(failures)


def test_every_pass_ran_in_enough_examples(fuzzed):
    totals = {name: {"ran": 0, "rewrote": 0} for name in PASSES}
    parts = [fuzzed[0]["single"], fuzzed[1]["single"], fuzzed[0]["distributed"]]
    for part in parts:
        for name in PASSES:
            count = part["counts"][name]
            for key in ("ran", "rewrote"):
                totals[name][key] += count[key]
    print(f"fuzz seed {SEED}, profile {PROFILE}: examples per pass {json.dumps(totals)}")
    single = sum(fuzzed[rank]["single"]["examples"] for rank in range(2))
    for name, count in totals.items():
        assert count["ran"] >= PROFILE.passes, (name, totals)
        share = single if name in REWRITES_ONLY_IN_SINGLE else count["ran"]
        assert count["rewrote"] >= 0.2 * share, (name, totals)  # not only refusals
    for name in SINGLE_PROCESS_PASSES:
        count = {key: sum(fuzzed[rank]["single"]["counts"][name][key] for rank in range(2))
                 for key in ("ran", "rewrote")}
        print(f"{name}: {json.dumps(count)} of {single} single-process examples")
        assert count["ran"] >= 0.2 * single and count["rewrote"] >= count["ran"] / 3, count


@pytest.mark.parametrize("case", REGRESSIONS, ids=lambda case: str(case["seed"]))
def test_regressions(case):
    if case["world"] > 1:
        results = spawn(_rerun, case["world"], case)
    else:
        results = [fuzz_models.run_case(case)]
    for result in results:
        assert result["worst"] <= 1, result["errors"]


def test_regression_attention_scores_of_symbolic_length_are_offloaded():
    """Found by the fuzzer: under dynamic shapes the planned offload of a softmax [B, H, S, S] was
    refused ("s**2 has no FX form"), leaving the plan's peak unmet; the size is now computed."""
    from graphopt.debug.dump import compile_summaries
    case = {"seed": 1, "batch": 1, "seq": 12, "dim": 16, "dtype": "float32", "world": 1,
            "blocks": [["attention", 2, True], ["residual", "gelu"]], "dynamic": True,
            "forwards": 1, "flags": {"codegen": "eager", "memory_budget": 0.5,
                                     "offload_activations": True,
                                     # the decomposed attention stays (the mask pass makes it SDPA)
                                     "specialize_attention_masks": False}}
    assert fuzz_models.run_case(case)["worst"] <= 1
    (entry,) = [e for s in compile_summaries() for e in s["passes"]
                if e["pass"] == "offload_activations" and e["stage"] == "forward"]
    assert "_softmax" in entry["stats"]["symbolic_sizes"], entry
    assert not any("FX form" in refusal for refusal in entry["refusals"])


def _rerun(rank: int, world: int, case: dict) -> dict:
    return fuzz_models.run_case(case)


def _inductor(rank: int, world: int, profile: Profile, seed: int) -> dict:
    torch.set_num_threads(1)
    return _explore(fuzz_models.cases(world=1, codegen="inductor", offload=0.9), profile.inductor,
                    seed + 7 + rank, together=False)


@pytest.mark.slow
def test_inductor_examples_match_eager():
    """A smaller share through Inductor, one process per example stream."""
    results = spawn(_inductor, 2, PROFILE, SEED, timeout_s=600)
    failures = [r["failure"] for r in results if r["failure"]]
    assert not failures, "\n".join(failures)
    assert sum(r["examples"] for r in results) == 2 * PROFILE.inductor


class _ReloadError:
    """Adds ``size`` to every activation offload_activations reloads (a broken copy, say)."""

    size = 1e-4

    def __enter__(self):
        from graphopt.ops import offload as offload_ops
        self.module, self.original = offload_ops, offload_ops._finish_reload

        def finish(ticket, pool, slot):
            cell = self.original(ticket, pool, slot)
            cell.reloaded.add_(self.size)
            return cell
        offload_ops._finish_reload = finish
        return self

    def __exit__(self, *exc):
        self.module._finish_reload = self.original


def _caught_in_offloading_examples(inject, dtype_of) -> list[bool]:
    """For 30 single-process cases (seed 25) run with ``inject`` active, in ``dtype_of(dtype)``:
    whether each case where offload_activations rewrote failed its comparison."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as fixed_seed

    outcomes = []

    @settings(max_examples=30, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @fixed_seed(25)
    @given(case=fuzz_models.cases(world=1, offload=1.0))
    def injected(case):
        result = fuzz_models.run_case(dict(case, dtype=dtype_of(case["dtype"])), inject=inject)
        if result["passes"].get("offload_activations", {}).get("rewrote"):
            outcomes.append(result["worst"] > 1)

    injected()
    print(f"injected {inject.size} reload error caught in {sum(outcomes)} of {len(outcomes)} "
          "offloading examples")
    assert len(outcomes) >= 6, "too few examples offloaded anything"
    return outcomes


def test_an_injected_error_of_1e4_in_reloaded_activations_is_caught():
    outcomes = _caught_in_offloading_examples(
        _ReloadError, lambda dtype: "float64" if dtype == "bfloat16" else dtype)
    assert sum(outcomes) >= 0.9 * len(outcomes), outcomes


class _LargeReloadError(_ReloadError):
    size = 0.5


def test_an_injected_error_in_bfloat16_is_caught_although_eager_is_off_float64_too():
    """bfloat16 results pass where they are no farther from float64 than eager's; a reload
    error that is not rounding (0.5 added to each reloaded activation) still fails."""
    outcomes = _caught_in_offloading_examples(_LargeReloadError, lambda dtype: "bfloat16")
    assert sum(outcomes) >= 0.9 * len(outcomes), outcomes
