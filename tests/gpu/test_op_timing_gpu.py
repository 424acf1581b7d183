"""op_timing on a GPU: every op of a bf16 Llama step is timed with CUDA events (attention included),
random ops keep the roofline, and the planned step still matches eager."""

import copy

import pytest
import torch

import graphopt
from graphopt.measure import op_timing
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


def _tensor_parallel_plan(rank: int, world: int) -> dict:
    """A row-parallel stack over NCCL compiled with op_timing='auto': rank 0 times, rank 1 adopts."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol
    from graphopt import _compat
    from graphopt.debug.dump import clear_compile_summaries

    group = _compat.group_name(dist.group.WORLD)

    class RowParallel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up = torch.nn.ModuleList(torch.nn.Linear(512, 1024 // world) for _ in range(3))
            self.down = torch.nn.ModuleList(torch.nn.Linear(1024 // world, 512, bias=False)
                                            for _ in range(3))

        def forward(self, x):
            for up, down in zip(self.up, self.down):
                x = x + funcol.all_reduce(down(torch.nn.functional.gelu(up(x))), "sum", group)
            return x.float().pow(2).mean()

    torch.manual_seed(rank)  # each rank its own shard
    model = RowParallel().cuda()
    reference = copy.deepcopy(model)
    x = torch.randn(4096, 512, device="cuda")
    op_timing.clear_cache()
    clear_compile_summaries()
    compiled = torch.compile(model, backend=graphopt.backend(codegen="eager", memory_budget=0.5))
    compiled(x).backward()
    reference(x).backward()
    error = max(((a.grad - b.grad).abs().max() / b.grad.abs().max()).item()
                for a, b in zip(model.parameters(), reference.parameters()))
    notes = next(s["notes"] for s in compile_summaries() if "remat_plan" in s["notes"])
    return {"mode": notes["op_timing"]["mode"], "why": notes["op_timing"]["why"], "error": error,
            "measured": notes["remat_plan"]["op_timing"]["measured_nodes"],
            "actions": [(row["tensor"], row["action"]) for row in notes["remat_plan"]["table"]]}


@pytest.mark.multigpu
def test_ranks_of_a_tensor_parallel_graph_plan_with_rank_0s_measured_times():
    from graphopt.distributed.launch import spawn
    leader, follower = spawn(_tensor_parallel_plan, 2, backend="nccl")
    for rank, got in enumerate((leader, follower)):
        assert got["mode"] == "measure" and got["measured"] > 0, (rank, got["why"])
        assert got["error"] < 1e-4, (rank, got["error"])
    assert "decided on rank 0" in leader["why"] and "adopted from rank 0" in follower["why"]
    assert follower["actions"] == leader["actions"]
    assert any(action.startswith("recompute") for _, action in leader["actions"])
