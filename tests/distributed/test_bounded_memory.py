"""Nothing leaks: a model compiled six times (``torch._dynamo.reset()`` between) with every pass
that runs on CPU on -- sequence parallelism, GEMM + collective overlap, the memory plan and
offload -- over two gloo ranks, 200 steps in all, keeps its resident memory, its host pool bytes
and its live tensors flat from the first compile to the last."""

from __future__ import annotations

import gc
import os
import sys

import torch

from graphopt.distributed.launch import spawn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "fuzz"))
import fuzz_models  # noqa: E402

COMPILES, STEPS = 6, 200
CASE = {"seed": 5, "batch": 1, "seq": 16, "dim": 16, "dtype": "float32", "world": 2,
        "blocks": [["norm", "rms"], ["sdpa", 2, True], ["tp_mlp", "gather_scatter", True],
                   ["residual", "gelu"], ["tp_mlp", "all_reduce_in_place", False]],
        "flags": {"codegen": "eager", "sequence_parallel_attention": True,
                  "overlap_matmul_collectives": True, "overlap_mode": "chunked",
                  "memory_budget": 0.5, "offload_activations": True},
        "dynamic": False, "forwards": 1}


def _resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _live_tensors() -> int:
    import warnings
    gc.collect()
    with warnings.catch_warnings():  # isinstance on lazily deprecated module attributes warns
        warnings.simplefilter("ignore")
        return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())


def _steps(rank: int, world: int) -> list[dict]:
    import graphopt
    from graphopt.debug.dump import clear_compile_summaries
    from graphopt.ops import offload as offload_ops
    torch.set_num_threads(1)
    model = fuzz_models.FuzzModel(CASE).shard(rank)
    x = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(rank))
    marks = []
    for _ in range(COMPILES):
        torch._dynamo.reset()
        clear_compile_summaries()
        compiled = torch.compile(model, backend=graphopt.backend(**CASE["flags"]), dynamic=False)
        for _ in range(STEPS // COMPILES):
            model.zero_grad(set_to_none=True)
            compiled(x).square().sum().backward()
        del compiled
        marks.append({"resident": _resident_bytes(), "tensors": _live_tensors(),
                      **offload_ops.pool_stats()})
    torch._dynamo.reset()  # the last compiled graph goes: its pool with it
    gc.collect()
    return marks + [offload_ops.pool_stats()]


def test_six_compiles_and_200_steps_keep_memory_flat():
    for *marks, after_reset in spawn(_steps, 2):
        first, last = marks[0], marks[-1]
        assert after_reset["pools"] == 0 and after_reset["host_bytes"] == 0, after_reset
        assert first["pools"] >= 1 and first["host_bytes"] > 0, first  # offload ran
        assert [m["host_bytes"] for m in marks] == [first["host_bytes"]] * COMPILES, marks
        assert [m["pools"] for m in marks] == [first["pools"]] * COMPILES, marks
        assert last["tensors"] <= first["tensors"], marks
        # the allocator's arenas settle after the first compiles; a leak of the pool (a few KiB
        # per compile here) or of a compiled graph (~1 MiB each) would show as steady growth
        assert last["resident"] - marks[1]["resident"] < 8 * 2**20, marks
