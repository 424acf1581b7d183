"""op_timing on a GPU: every op of a bf16 Llama step is timed with CUDA events (attention included),
random ops keep the roofline, and the planned step still matches eager."""

import copy

import pytest
import torch

import graphopt
from graphopt.analysis import op_timing
from graphopt.debug.dump import compile_summaries
from graphopt.models.llama import Llama, LlamaConfig

pytestmark = pytest.mark.gpu


def test_llama_step_is_timed_on_the_device_and_matches_eager():
    torch.manual_seed(0)
    cfg = LlamaConfig.tiny(n_layers=2, dim=512, n_heads=8, n_kv_heads=4, ffn_dim=1024)
    model = Llama(cfg).cuda().to(torch.bfloat16)
    reference = copy.deepcopy(model)
    tokens = torch.randint(0, cfg.vocab_size, (1, 2048), device="cuda")
    op_timing.clear_cache()
    state = torch.cuda.get_rng_state()
    compiled = torch.compile(model, backend=graphopt.backend(codegen="eager", offload_activations=True))
    compiled(tokens).float().pow(2).mean().backward()
    reference(tokens).float().pow(2).mean().backward()
    assert torch.equal(torch.cuda.get_rng_state(), state)  # the timing pass drew on its own generator
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=2e-2, atol=2e-2)
    plan = next(s["notes"]["remat_plan"] for s in compile_summaries() if "remat_plan" in s["notes"])
    timing = plan["op_timing"]
    assert timing["mode"] == "measure" and timing["measured_nodes"] > 100, timing
    assert timing["refused_nodes"] == 0, timing["refusals"]
    note = next(s["notes"]["op_timing"] for s in compile_summaries() if "op_timing" in s["notes"])
    attention = [row for row in note["table"] if "attention" in row["op"]]
    assert attention and all(row["measured_s"] > 0 for row in attention)
    print(f"planned forward {plan['model_forward_s'] * 1e3:.3f} ms (roofline "
          f"{plan['roofline_forward_s'] * 1e3:.3f} ms); timing took {timing['elapsed_s']:.2f} s")


def test_random_ops_keep_the_roofline_on_the_device():
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.Dropout(0.1),
                                torch.nn.Linear(1024, 256)).cuda()
    op_timing.clear_cache()
    compiled = torch.compile(model, backend=graphopt.backend(codegen="eager", memory_budget=0.5))
    compiled(torch.randn(512, 256, device="cuda", requires_grad=True)).sum().backward()
    note = next(s["notes"]["op_timing"] for s in compile_summaries() if "op_timing" in s["notes"])
    assert note["mode"] == "measure"
    refused = [row for row in note["table"] if row["refused"]]
    assert any("random" in row["refused"] for row in refused), refused
    assert any(row["op"] == "aten.mm.default" and row["measured_s"] for row in note["table"])
