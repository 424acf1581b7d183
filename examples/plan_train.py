"""Plan a layout with graphopt's planner, apply it with ``graphopt.parallelize`` and train: a tiny
Hugging Face Llama on 4 CPU processes (gloo). The loop is the usual one, fed this rank's share of
each global batch by ``micro_batches``.

    python examples/plan_train.py                  # 4 ranks, 3 steps, about a minute on 2 cores
    python examples/plan_train.py --ranks 2 --steps 5

On GPUs the same code runs under torchrun with the real model built on the meta device for the
planner, ``World(gpus_per_node=8, nodes=..., profile="profile.json")`` and codegen left at Inductor.
"""

from __future__ import annotations

import argparse

import torch

SEQ = 256
SEQUENCES = 8  # per optimizer step


def build_model(device: str = "cpu"):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=8,
                         num_key_value_heads=4, num_hidden_layers=2, vocab_size=512,
                         max_position_embeddings=SEQ)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config)


def train(rank: int, world: int, steps: int) -> list[float]:
    import graphopt
    from graphopt.analysis.device_profile import CPU
    from graphopt.planning import World, plan
    from graphopt.planning.layouts import SearchSpace

    # 1. plan on the meta device: every rank computes the same plan
    report = plan(build_model("meta"), World(gpus_per_node=world, memory_per_gpu=2**30, profile=CPU),
                  seq_len=SEQ, global_batch_tokens=SEQUENCES * SEQ,
                  space=SearchSpace(min_tokens_per_sp_rank=64))
    if rank == 0:
        print(report.explain(top_k=4))
    # 2. apply it to the real model (eager codegen: fast compiles on a CPU)
    par = graphopt.parallelize(build_model(), report, codegen="eager")
    optimizer = torch.optim.AdamW(par.model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        # every rank draws the same global batch; labels: each position's next token
        window = torch.randint(0, 512, (SEQUENCES, SEQ + 1), generator=generator)
        inputs, labels = window[:, :-1], window[:, 1:]
        total = 0.0
        for mb in par.micro_batches(inputs, labels):
            out = par.model(input_ids=mb.tokens, position_ids=mb.position_ids, labels=mb.labels,
                            shift_labels=mb.labels, use_cache=False)
            (out.loss / par.layout.grad_accum).backward()
            total += out.loss.item() / par.layout.grad_accum
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
        if rank == 0:
            print(f"step {len(losses)}: loss (this rank's share) {total:.4f}")
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    from graphopt.distributed.launch import spawn
    losses = spawn(train, args.ranks, args.steps)
    print("losses per rank:", [[round(v, 4) for v in rank_losses] for rank_losses in losses])


if __name__ == "__main__":
    main()
