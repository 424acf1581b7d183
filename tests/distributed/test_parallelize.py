"""``graphopt.parallelize(model, plan)`` over gloo on 2 and 4 ranks: every layout's gradients after
one step (gradient accumulation included) equal the single-process model's on the same global
batch; every rank plans the same layout; ranks given different plans fail at once, naming them.

2 ranks (Hugging Face LlamaForCausalLM, tiny): FSDP2 (dp2), DTensor TP (tp2), sequence-parallel
attention (sp2), each planned by the planner for that world. 4 ranks (graphopt's reference Llama):
dp2 x tp2 with 2 accumulation steps and a remat budget, tp2 x sp2 with activation offload.
Codegen eager (the Inductor path: tests/unit/test_parallelize_inductor.py).
"""

from __future__ import annotations

import torch

from graphopt.distributed.launch import spawn

SEQ = 16
FP32 = dict(rtol=1e-5, atol=1e-6)


def _hf_model():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, num_hidden_layers=2, vocab_size=128,
                         max_position_embeddings=256)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def _hf_loss(model, tokens, labels, positions):
    return model(input_ids=tokens, position_ids=positions, labels=labels, shift_labels=labels,
                 use_cache=False).loss


def _llama_model():
    from graphopt.models.llama import Llama, LlamaConfig
    torch.manual_seed(0)
    return Llama(LlamaConfig.tiny(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128))


def _llama_loss(model, tokens, labels, positions):
    from graphopt.models.llama import llama_loss
    return llama_loss(model(tokens, positions), labels)


MODELS = {"hf": (_hf_model, _hf_loss), "llama": (_llama_model, _llama_loss)}


def _check_layout(kind: str, layout) -> float:
    """One step of ``layout`` against the single-process model; the largest gradient error."""
    from graphopt.planning.parallelize import parallelize

    build, loss_fn = MODELS[kind]
    torch._dynamo.reset()
    sequences = layout.dp * layout.micro_batch * layout.grad_accum
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 128, (sequences, SEQ), generator=gen)
    labels = torch.randint(0, 128, (sequences, SEQ), generator=gen)
    reference = build()
    loss_fn(reference, tokens, labels, torch.arange(SEQ).expand_as(tokens)).backward()
    model = build()
    par = parallelize(model, layout, codegen="eager")
    for mb in par.micro_batches(tokens, labels):
        (loss_fn(par.model, mb.tokens, mb.labels, mb.position_ids) / layout.grad_accum).backward()
    expected = dict(reference.named_parameters())
    worst = 0.0
    for name, param in model.named_parameters():
        grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
        torch.testing.assert_close(grad, expected[name].grad, **FP32,
                                   msg=lambda m: f"{layout.describe()}: grad of {name}: {m}")
        worst = max(worst, (grad - expected[name].grad).abs().max().item())
    return worst


def _two_ranks(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from graphopt.planning.parallelize import PlanMismatchError, parallelize
    from graphopt.planning import World, plan, trace_model
    from graphopt.planning.layouts import MIN_CUT, Layout, SearchSpace

    # every rank plans, and gets the same plan
    with torch.device("meta"):
        meta = _hf_model()
    report = plan(trace_model(meta), World(gpus_per_node=2), seq_len=SEQ, global_batch_tokens=4 * SEQ,
                  space=SearchSpace(micro_batches=(1, 2), memory_plans=(MIN_CUT,), min_tokens_per_sp_rank=4))
    fingerprints = [None] * world
    dist.all_gather_object(fingerprints, report.fingerprint())
    errors = {layout.describe(): _check_layout("hf", layout)
              for layout in (Layout(2, 1, 1, 1, 1), Layout(1, 2, 1, 1, 1), Layout(1, 1, 2, 1, 1))}
    mismatch = None
    try:  # rank 1 was handed another plan: both ranks must refuse
        parallelize(_hf_model(), Layout(2, 1, 1, 1, 1) if rank == 0 else Layout(1, 2, 1, 1, 1))
    except PlanMismatchError as err:
        mismatch = str(err)
    return {"fingerprints": fingerprints, "errors": errors, "mismatch": mismatch,
            "chosen": report.layout.describe()}


def _four_ranks(rank: int, world: int) -> dict:
    from graphopt.planning.layouts import Layout, MemoryPlan

    layouts = (Layout(2, 2, 1, 1, 2, MemoryPlan(0.5)), Layout(1, 2, 2, 1, 1, MemoryPlan(None, True)))
    return {layout.describe(): _check_layout("llama", layout) for layout in layouts}


def test_parallelize_matches_single_process_on_two_ranks():
    results = spawn(_two_ranks, 2)
    for result in results:
        assert len(set(result["fingerprints"])) == 1, result["fingerprints"]
        assert result["chosen"] == results[0]["chosen"]
        assert set(result["errors"]) == {"dp2 tp1 sp1 mb1x1 min-cut", "dp1 tp2 sp1 mb1x1 min-cut",
                                         "dp1 tp1 sp2 mb1x1 min-cut"}
        assert "ranks [1] were given a different plan" in result["mismatch"]


def test_parallelize_matches_single_process_on_four_ranks():
    results = spawn(_four_ranks, 4)
    assert sorted(results[0]) == ["dp1 tp2 sp2 mb1x1 offload", "dp2 tp2 sp1 mb1x2 remat 0.5"]
