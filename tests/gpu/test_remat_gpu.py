"""The rematerialization planner on a GPU: numerics and measured peak against the plan."""

import pytest
import torch

import graphopt
from graphopt.debug.dump import compile_summaries
from graphopt.models.llama import Llama, LlamaConfig, llama_loss

pytestmark = pytest.mark.gpu


def _step(model, tokens, targets, fn):
    model.zero_grad(set_to_none=True)
    loss = fn(model, tokens, targets)
    loss.backward()
    return loss.detach(), [p.grad.detach().clone() for p in model.parameters()]


def _loss(model, tokens, targets):
    return llama_loss(model(tokens), targets)


@pytest.mark.parametrize("fraction", [1.0, 0.4])
def test_llama_matches_eager_and_peak_follows_plan(fraction):
    torch.manual_seed(0)
    cfg = LlamaConfig.tiny(dim=512, n_heads=8, n_kv_heads=8, ffn_dim=1536, n_layers=2, vocab_size=256)
    model = Llama(cfg).cuda()
    tokens = torch.randint(0, cfg.vocab_size, (2, 1024), device="cuda")
    targets = torch.randint(0, cfg.vocab_size, (2, 1024), device="cuda")
    ref_loss, ref_grads = _step(model, tokens, targets, _loss)
    compiled = torch.compile(_loss, backend=graphopt.backend(codegen="eager", memory_budget=fraction))
    _step(model, tokens, targets, compiled)  # compile
    model.zero_grad(set_to_none=True)
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss, grads = _step(model, tokens, targets, compiled)
    peak = torch.cuda.max_memory_allocated() - base
    plan = compile_summaries()[-1]["notes"]["remat_plan"]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-3, atol=1e-3)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-3)
    # kernels' own workspaces (cuBLAS, attention backward accumulators) are not in the model
    assert peak <= 1.15 * plan["planned_peak_bytes"], (
        f"measured activation peak {peak} vs planned {plan['planned_peak_bytes']} "
        f"(peak at {plan['peak_at']})")


def test_chunked_loss_matches_cross_entropy_in_bf16_under_the_planner():
    torch.manual_seed(0)
    cfg = LlamaConfig.tiny(dim=512, n_heads=8, n_kv_heads=8, ffn_dim=1536, n_layers=2, vocab_size=4096)
    model = Llama(cfg).cuda().bfloat16()
    tokens = torch.randint(0, cfg.vocab_size, (1, 2048), device="cuda")
    targets = torch.randint(0, cfg.vocab_size, (1, 2048), device="cuda")
    ref_loss, ref_grads = _step(model, tokens, targets, _loss)
    compiled = torch.compile(lambda m, x, y: m.loss(x, y, chunks=4),
                             backend=graphopt.backend(codegen="eager", memory_budget=0.5))
    _step(model, tokens, targets, compiled)  # compile
    loss, grads = _step(model, tokens, targets, compiled)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=1e-2)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=5e-2, atol=2e-3)


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_inductor_step_peaks_where_the_simulation_says(fraction):
    """codegen="inductor": the planner simulates Inductor's kernels (pointwise chains inside their
    readers, sibling kernels together, the embedding gradient scattered into its zeros buffer, a
    workspace while its kernel runs) and compiles the graphs without Inductor's buffer reuse, so
    the measured activation peak of a bf16 Llama step with the chunked loss is the planned one
    (3 % allowed; measured equal to 0.1 % on an H100 at 1 layer, and at 4 layers in
    bench/remat.py where the plan recomputes little)."""
    from graphopt import _compat

    torch.manual_seed(0)
    cfg = LlamaConfig.llama2_7b(n_layers=1, max_seq_len=4096)  # cuDNN's modelled workspace shape
    with torch.device("cuda"):
        model = Llama(cfg).bfloat16()
    tokens = torch.randint(0, cfg.vocab_size, (1, 4096), device="cuda")
    targets = torch.randint(0, cfg.vocab_size, (1, 4096), device="cuda")

    def step(fn):
        model.zero_grad(set_to_none=True)
        fn(model, tokens, targets).backward()

    torch._dynamo.reset()
    # a cache hit would skip the partitioner, and with it the plan this test reads
    with _compat.no_compile_caches():
        compiled = torch.compile(lambda m, x, y: m.loss(x, y, chunks=4),
                                 backend=graphopt.backend(codegen="inductor", memory_budget=fraction))
        step(compiled)
    plan = [s["notes"]["remat_plan"] for s in compile_summaries() if "remat_plan" in s.get("notes", {})][-1]
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(compiled)
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - base
    assert 0.97 * plan["planned_peak_bytes"] <= measured <= 1.03 * plan["planned_peak_bytes"], (
        measured, plan["planned_peak_bytes"], plan["peak_at"])
