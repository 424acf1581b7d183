"""Sequence parallelism: every rank holds a contiguous slice of each sequence and runs the
unchanged model on it; graphopt makes every attention span the whole sequence.

    # 8 GPUs, 128K tokens per sequence (16K per GPU), 8B layer dimensions:
    torchrun --standalone --nproc-per-node 8 examples/sequence_parallel.py --seq-len 131072
    # any machine, toy size, checked against eager:
    torchrun --standalone --nproc-per-node 2 examples/sequence_parallel.py --model tiny --seq-len 128 --codegen eager --check

The model must take position ids (RoPE at global positions); every rank must call it on its own
slice (``shard_sequence``) with the same weights. Gradients are summed over the ranks, as with
data parallelism, since each rank's loss covers its own tokens.
"""

import torch
import torch.distributed as dist

import graphopt
from graphopt.distributed.sharding import shard_sequence
from graphopt.models.llama import Llama, LlamaConfig, llama_loss

from common import (LEARNING_RATE, EagerCheck, init_distributed, parse_args, random_batch, report,
                    training_dtype)


def main() -> None:
    args = parse_args(__doc__, seq_len=131072, extra={
        "memory-budget": (float, 0.5, "fraction of the min-cut plan's saved activations to keep")})
    device = init_distributed()
    world = dist.get_world_size()
    torch.manual_seed(0)  # the same weights on every rank
    config = (LlamaConfig.tiny if args.model == "tiny" else LlamaConfig.llama3_8b)(
        n_layers=args.layers, max_seq_len=args.seq_len)
    model = Llama(config).to(device, training_dtype(device))
    check = EagerCheck(model, device) if args.check else None

    compiled = torch.compile(model, backend=graphopt.backend(
        sequence_parallel_attention=True, memory_budget=args.memory_budget,
        codegen=args.codegen, dump_dir=args.dump_dir))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)

    for step in range(args.steps):
        inputs, targets = random_batch(step, config.vocab_size, args.batch, args.seq_len, device)
        local_inputs, positions = shard_sequence(inputs)    # [B, S] -> [B, S / world]
        local_targets, _ = shard_sequence(targets)
        # each rank's share of the full-sequence mean loss
        loss = llama_loss(compiled(local_inputs, positions), local_targets) / world
        loss.backward()
        for param in model.parameters():  # sum the ranks' gradients (the weights are replicated)
            dist.all_reduce(param.grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total = loss.detach().clone()
        dist.all_reduce(total)
        report(step, total.item(), check, lambda eager: llama_loss(eager(inputs), targets))
    if check:
        check.finish()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
