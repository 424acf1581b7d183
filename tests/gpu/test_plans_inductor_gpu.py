"""Plans under Inductor on a GPU, on transformers' LlamaForCausalLM: the allocator's peak and the
compiled forward's time against what the plan modelled, with offload and a budget."""

import pytest
import torch

import graphopt
from graphopt.debug.dump import compile_summaries
from graphopt.models.llama import chunked_output_loss

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("flags", [dict(memory_budget=1.0), dict(offload_activations=True),
                                   dict(memory_budget=0.5, offload_activations=True)])
def test_hf_llama_peak_and_forward_follow_the_plan(flags):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama import modeling_llama

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=1024, intermediate_size=3584, num_attention_heads=16,
                                   num_key_value_heads=4, vocab_size=8192, num_hidden_layers=2,
                                   max_position_embeddings=8192, attn_implementation="sdpa")
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).train()
    tokens = torch.randint(0, cfg.vocab_size, (1, 8192), device="cuda")
    positions = torch.arange(8192, device="cuda")[None]

    def loss():
        hidden = model.model(input_ids=tokens, position_ids=positions, use_cache=False).last_hidden_state
        return chunked_output_loss(hidden, model.lm_head.weight, tokens, 4)

    original = modeling_llama.create_causal_mask
    modeling_llama.create_causal_mask = lambda *args, **kwargs: None  # causal: SDPA is_causal=True
    try:
        torch._dynamo.reset()
        compiled = torch.compile(loss, backend=graphopt.backend(**flags))
        compiled().backward()
        plan = compile_summaries()[-1]["notes"]["remat_plan"]
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        compiled().backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        model.zero_grad(set_to_none=True)
        forward_ms = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = compiled()
            end.record()
            out.backward()
            model.zero_grad(set_to_none=True)
            end.synchronize()
            forward_ms.append(start.elapsed_time(end))
    finally:
        modeling_llama.create_causal_mask = original
    assert peak <= 1.05 * plan["planned_peak_bytes"], (peak, plan["planned_peak_bytes"], plan["peak_at"])
    measured = sorted(forward_ms)[len(forward_ms) // 2]
    assert abs(plan["model_forward_s"] * 1e3 / measured - 1) <= 0.25, (plan["model_forward_s"], measured)
