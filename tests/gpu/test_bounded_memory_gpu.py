"""Nothing leaks on the GPU: a Llama compiled six times with the memory plan and offload on, under
Inductor with dynamic shapes (two sequence lengths served by one graph, offload slots of symbolic
size), 200 steps in all, keeps device memory, pinned host memory and the offload pools flat;
``torch._dynamo.reset()`` frees the pools. Compiles 2-6 are Inductor cache hits (about a minute in
all on one H100)."""

import gc

import pytest
import torch

import graphopt
from graphopt.models.llama import Llama, LlamaConfig
from graphopt.ops import offload as offload_ops

pytestmark = pytest.mark.gpu

COMPILES, STEPS = 6, 200


def _pinned_bytes():
    """Pinned bytes torch's host allocator holds; None where it publishes no statistics (torch
    2.11 on the H100 image returned an empty dict even with a pinned tensor alive)."""
    stats = torch.cuda.host_memory_stats() if hasattr(torch.cuda, "host_memory_stats") else {}
    if "allocated_bytes.all.current" not in stats:
        return None
    return int(stats["allocated_bytes.all.current"])


def test_six_compiles_and_200_steps_keep_device_and_pinned_memory_flat():
    torch.manual_seed(0)
    model = Llama(LlamaConfig.tiny(n_layers=2, dim=256, n_heads=4, n_kv_heads=2, ffn_dim=512)).cuda()
    tokens = {seq: torch.randint(0, 128, (1, seq), device="cuda") for seq in (1024, 768)}
    marks = []
    for compile_round in range(COMPILES):
        torch._dynamo.reset()
        gc.collect()
        compiled = torch.compile(model, backend=graphopt.backend(
            memory_budget=0.5, offload_activations=True), dynamic=True)
        for step in range(STEPS // COMPILES):
            model.zero_grad(set_to_none=True)
            seq = 768 if step % 8 == 7 else 1024   # a short last batch, say
            compiled(tokens[seq]).float().pow(2).mean().backward()
        torch.cuda.synchronize()
        del compiled
        marks.append({"device": torch.cuda.memory_allocated(), "pinned": _pinned_bytes(),
                      **offload_ops.pool_stats()})
    first = marks[0]
    assert first["pools"] >= 1 and first["host_bytes"] > 0, first  # offload ran
    for mark in marks[1:]:
        assert mark["device"] == first["device"], marks
        assert mark["pinned"] == first["pinned"] and mark["host_bytes"] == first["host_bytes"], marks
        assert mark["pools"] == first["pools"], marks
    torch._dynamo.reset()
    gc.collect()
    assert offload_ops.pool_stats()["host_bytes"] == 0
    if first["pinned"] is not None:   # else the pools' own count above is the pinned check
        assert _pinned_bytes() <= first["pinned"] - first["host_bytes"]
