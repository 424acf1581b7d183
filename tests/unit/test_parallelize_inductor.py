"""``graphopt.parallelize`` on one process with Inductor codegen (the default): the blocks compile
once through graphopt's backend under the plan's remat budget, the head runs eagerly, and one step
with gradient accumulation gives the eager model's gradients."""

from __future__ import annotations

import pytest
import torch

from graphopt import _compat
from graphopt.planning import Layout, MemoryPlan


@pytest.mark.slow
def test_parallelize_one_process_inductor_matches_eager():
    from transformers import LlamaConfig, LlamaForCausalLM

    from graphopt.debug.dump import clear_compile_summaries, compile_summaries
    from graphopt.planning.parallelize import parallelize

    def build():
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                             num_key_value_heads=2, num_hidden_layers=3, vocab_size=128)
        config._attn_implementation = "sdpa"
        return LlamaForCausalLM(config)

    def loss_fn(model, tokens, labels, positions):
        return model(input_ids=tokens, position_ids=positions, labels=labels, shift_labels=labels,
                     use_cache=False).loss

    gen = torch.Generator().manual_seed(1)
    tokens, labels = (torch.randint(0, 128, (2, 32), generator=gen) for _ in range(2))
    reference = build()
    loss_fn(reference, tokens, labels, torch.arange(32).expand_as(tokens)).backward()
    torch._dynamo.reset()
    clear_compile_summaries()
    model = build()
    layout = Layout(1, 1, 1, 1, 2, MemoryPlan(0.5))
    par = parallelize(model, layout)
    assert par.flags["codegen"] == "inductor" and par.flags["memory_budget"] == 0.5
    # no Inductor / AOTAutograd cache hits: a hit (another test, another xdist worker compiled the
    # same block) runs no pass, so no plan would be recorded
    with _compat.no_compile_caches():
        for mb in par.micro_batches(tokens, labels):
            (loss_fn(par.model, mb.tokens, mb.labels, mb.position_ids) / layout.grad_accum).backward()
    expected = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name].grad, rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"grad of {name}: {m}")
    plans = [s for s in compile_summaries() if "remat_plan" in s.get("notes", {})]
    assert len(plans) == 1  # one block graph, compiled once, reused by all three blocks
