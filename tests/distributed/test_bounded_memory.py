"""Nothing leaks: a model compiled six times (``torch._dynamo.reset()`` between) with every pass
that runs on CPU on -- sequence parallelism, the memory plan and offload; GEMM + collective
overlap in a second model -- over two gloo ranks, 200 steps in all, keeps its resident memory, its
host pool bytes and its live tensors flat from the first compile to the last."""

from __future__ import annotations

import gc
import os
import sys

import pytest
import torch

from graphopt.distributed.launch import spawn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "fuzz"))
import fuzz_models  # noqa: E402

COMPILES, STEPS = 6, 200
FLAGS = {"codegen": "eager", "sequence_parallel_attention": True, "overlap_matmul_collectives": True,
         "overlap_mode": "chunked", "memory_budget": 0.5, "offload_activations": True}
# Sequence-parallel attention between blocks that keep the sequence local (graphopt's ops carry
# its communication); a second model with tensor-parallel MLPs whose collectives the user's code
# names (the overlap pass fuses them).
CASE = {"seed": 5, "batch": 1, "seq": 16, "dim": 16, "dtype": "float32", "world": 2,
        "blocks": [["norm", "rms"], ["sdpa", 2, True], ["residual", "gelu"], ["attention", 2, True]],
        "flags": FLAGS, "dynamic": False, "forwards": 1}
TP_CASE = dict(CASE, blocks=[["norm", "rms"], ["tp_mlp", "gather_scatter", False],
                             ["tp_mlp", "all_reduce_in_place", True]])


def _resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _live_tensors() -> int:
    import warnings
    gc.collect()
    with warnings.catch_warnings():  # isinstance on lazily deprecated module attributes warns
        warnings.simplefilter("ignore")
        return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())


def _steps(rank: int, world: int, case: dict) -> list[dict]:
    import graphopt
    from graphopt.debug.dump import clear_compile_summaries
    from graphopt.ops import offload as offload_ops
    torch.set_num_threads(1)
    model = fuzz_models.FuzzModel(case).shard(rank)
    x = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(rank))
    marks = []
    for _ in range(COMPILES):
        torch._dynamo.reset()
        clear_compile_summaries()
        compiled = torch.compile(model, backend=graphopt.backend(**FLAGS), dynamic=False)
        for _ in range(STEPS // COMPILES):
            model.zero_grad(set_to_none=True)
            compiled(x).square().sum().backward()
        del compiled
        marks.append({"resident": _resident_bytes(), "tensors": _live_tensors(),
                      **offload_ops.pool_stats()})
    torch._dynamo.reset()  # the last compiled graph goes: its pool with it
    gc.collect()
    return marks + [offload_ops.pool_stats()]


@pytest.mark.parametrize("case", [CASE, TP_CASE], ids=["sequence_parallel", "tensor_parallel"])
def test_six_compiles_and_200_steps_keep_memory_flat(case, monkeypatch):
    # c10d's flight recorder keeps the Python stack of its last collectives (TORCH_FR_BUFFER_SIZE
    # of them, 2000 by default), and with it the compiled code that issued them: a graph lives on
    # after torch._dynamo.reset() until that many more collectives ran (torch's aot_eager too).
    # Without it, what graphopt ties to the graph goes with it at once.
    monkeypatch.setenv("TORCH_FR_BUFFER_SIZE", "0")
    for *marks, after_reset in spawn(_steps, 2, case):
        first, last = marks[0], marks[-1]
        assert after_reset["pools"] == 0 and after_reset["host_bytes"] == 0, after_reset
        assert first["pools"] >= 1 and first["host_bytes"] > 0, first  # offload ran
        assert [m["host_bytes"] for m in marks] == [first["host_bytes"]] * COMPILES, marks
        assert [m["pools"] for m in marks] == [first["pools"]] * COMPILES, marks
        # from the second compile on (torch caches a few tensors at its first one, aot_eager too);
        # a compiled graph kept alive would add ~170 tensors and ~1 MiB each time
        assert last["tensors"] <= marks[1]["tensors"], marks
        assert last["resident"] - marks[1]["resident"] < 8 * 2**20, marks
