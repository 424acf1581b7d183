"""Attention selection with data parallelism: two gloo ranks make the same plan, every step.

Each rank compiles a tiny transformers Llama with the 'score' strategy and, for three steps, plans
the global batch from the same sample ids (ranks x batch), runs its share, and ends the step
(all-gathering the scores). Both ranks must hold the same plan (which samples each rank takes and
which of them each module runs), run exactly their part of it, and keep the same scores.
"""

from __future__ import annotations

import hashlib
import json

from graphopt.distributed.launch import spawn

BATCH, SEQ, HIDDEN, STEPS = 4, 8, 32, 3


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _train(rank: int, world: int):
    import torch
    import transformers

    import graphopt
    from graphopt.ops.attention_selection import selector

    config = transformers.LlamaConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
    torch.manual_seed(0)
    model = transformers.LlamaModel(config)
    flags = dict(codegen="eager", attention_selection=True, attention_selection_kept_fraction=0.5,
                 attention_selection_strategy="score")
    compiled = torch.compile(lambda e: model(inputs_embeds=e, use_cache=False).last_hidden_state,
                             backend=graphopt.backend(**flags), dynamic=False)
    data = torch.randn(40, SEQ, HIDDEN, generator=torch.Generator().manual_seed(1))
    plans, ran = [], []
    for step in range(STEPS):
        ids = [(step * 3 + k) % 40 for k in range(world * BATCH)]
        plan = selector().plan_step(ids, gpus_per_node=1)
        mine = list(plan.local_positions) if plan is not None else \
            list(range(rank * BATCH, (rank + 1) * BATCH))
        compiled(data[[ids[i] for i in mine]]).pow(2).mean().backward()
        record = selector().end_step()
        ran.append({name: info["selected"] for name, info in record["modules"].items()})
        if plan is not None:
            plans.append({"ranks": plan.plan.rank_samples, "chosen": plan.plan.chosen,
                          "before": plan.plan.work_before, "after": plan.plan.work_after})
            assert ran[-1] == {name: list(c) for name, c in plan.chosen.items()}
    memory = {name: sorted(scores.items()) for name, scores in selector().memory.items()}
    return {"plans": _digest(plans), "memory": _digest(memory), "planned_steps": len(plans),
            "ran": ran, "scored_samples": sum(len(v) for v in memory.values())}


def test_two_ranks_make_the_same_plan_and_keep_the_same_scores():
    results = spawn(_train, 2)
    assert results[0]["planned_steps"] == results[1]["planned_steps"] == STEPS - 1
    assert results[0]["plans"] == results[1]["plans"]
    assert results[0]["memory"] == results[1]["memory"]
    assert results[0]["scored_samples"] > 0
