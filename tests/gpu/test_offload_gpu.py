"""Activation offload on a GPU: stream-ordered copies, numerics, device memory released and flat."""

import copy

import pytest
import torch

import graphopt
from graphopt.models.llama import Llama, LlamaConfig
from graphopt.ops import offload as offload_ops

pytestmark = pytest.mark.gpu
OPS = torch.ops.graphopt


def test_cuda_round_trip_is_stream_ordered():
    x = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16)
    expected = x.clone()
    kept_numel = 1024 * 1024
    ticket = OPS.offload(x, "gpu_roundtrip", 2**24, 0, 0, kept_numel, list(x.stride()))
    kept = OPS.offload_wait(ticket, x, "gpu_roundtrip", 0, kept_numel, list(x.stride()))
    del x
    torch.cuda.empty_cache()
    garbage = torch.full((4096, 1024), 7.0, device="cuda", dtype=torch.bfloat16)  # reuses x's block
    back = OPS.reload_wait(OPS.reload(kept, "gpu_roundtrip", 0, 4096 * 1024),
                           "gpu_roundtrip", 0, [4096, 1024], [1024, 1])
    assert torch.equal(back, expected)
    assert offload_ops._POOLS["gpu_roundtrip"].generations[0].buffer.is_pinned()
    del garbage
    offload_ops.release_pool("gpu_roundtrip")


def test_cuda_round_trip_of_a_view_with_gaps_is_packed_and_stream_ordered():
    # a slice of a wider projection: copied into its packed layout on the device first; the
    # staging copy must outlive the side stream's read of it
    base = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16)
    x = base[:, :512]
    expected = x.clone()
    packed = [512, 1]
    ticket = OPS.offload(x, "gpu_view", 2**24, 0, 0, 0, packed)
    kept = OPS.offload_wait(ticket, x, "gpu_view", 0, 0, packed)
    del x, base
    torch.cuda.empty_cache()
    garbage = torch.full((4096, 1024), 7.0, device="cuda", dtype=torch.bfloat16)
    back = OPS.reload_wait(OPS.reload(kept, "gpu_view", 0, 4096 * 512), "gpu_view", 0,
                           [4096, 512], packed)
    assert back.stride() == (512, 1) and torch.equal(back, expected)
    del garbage
    offload_ops.release_pool("gpu_view")


def _model():
    torch.manual_seed(0)
    return Llama(LlamaConfig.tiny(n_layers=2, dim=256, n_heads=4, n_kv_heads=2, ffn_dim=512)).cuda()


def _step(module, tokens):
    loss = module(tokens).float().pow(2).mean()
    loss.backward()


def test_gradients_match_and_memory_stays_flat():
    model = _model()
    reference = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=graphopt.backend(codegen="eager", offload_activations=True))
    tokens = torch.randint(0, 128, (1, 1024), device="cuda")
    for _ in range(3):  # the last of three steps (the first compiles and allocates the pool)
        model.zero_grad(set_to_none=False)
        _step(compiled, tokens)
    _step(reference, tokens)
    for g, r in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(g.grad, r.grad, rtol=2e-4, atol=2e-5)
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    pools = offload_ops.pool_stats()
    stats_before = torch.cuda.memory_stats()["allocation.all.current"]
    for _ in range(20):
        model.zero_grad(set_to_none=False)
        _step(compiled, tokens)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == allocated
    assert torch.cuda.memory_stats()["allocation.all.current"] == stats_before
    assert offload_ops.pool_stats() == pools


def test_saved_views_are_priced_by_their_base_on_the_gpu():
    # q / k after RoPE and the w1 / w3 outputs are saved as views of their producers (flash
    # attention reads them); each is offered with its base's bytes (how much of it the link
    # hides at this small size is the cost model's call)
    from graphopt.debug.dump import clear_compile_summaries, compile_summaries
    model = _model()
    torch._dynamo.reset()
    clear_compile_summaries()
    compiled = torch.compile(model, backend=graphopt.backend(codegen="eager", offload_activations=True))
    _step(compiled, torch.randint(0, 128, (1, 1024), device="cuda"))
    (plan,) = [s["notes"]["remat_plan"] for s in compile_summaries() if "remat_plan" in s.get("notes", {})]
    views = [r for r in plan["table"] if "view_of" in r and r["bytes"] > 0]
    assert len(views) >= 5 * 2  # q, k, v, w1, w3 of both layers
