"""FSDP2 (``fully_shard``) with graphopt planning activation memory under a budget.

    # 8 GPUs, 8B layer dimensions, 8K tokens, a peak lower by half of what torch's plan saves:
    torchrun --standalone --nproc-per-node 8 examples/fsdp_memory_budget.py --memory-budget 0.5
    # a byte budget instead of a fraction:
    torchrun --standalone --nproc-per-node 8 examples/fsdp_memory_budget.py --memory-budget 20GiB
    # any machine, toy size, checked against eager:
    torchrun --standalone --nproc-per-node 2 examples/fsdp_memory_budget.py --model tiny --seq-len 64 --codegen eager --memory-budget 0.5 --check

FSDP2 shards parameters, gradients and optimizer state; activations are what is left, and that is
what ``memory_budget`` plans: graphopt's partitioner keeps or recomputes each saved activation so
that each graph's step fits (a fraction: at most that share of the activation bytes torch's plan
saves; bytes: the graph's inputs plus its peak), recomputing the cheapest ones. Dynamo breaks
the graph at FSDP's hooks, so each ``fully_shard`` block is a graph of its own (identical blocks
share one compiled graph) and the budget applies per graph. ``offload_activations`` does not fit
this layout: its host pool holds one forward per compiled graph until that forward's backward,
and the shared block graph runs once per layer, so it stops with an error naming that.
"""

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import graphopt
from graphopt.models.llama import Llama, LlamaConfig, llama_loss

from common import (LEARNING_RATE, EagerCheck, init_distributed, parse_args, random_batch, report,
                    training_dtype)


def budget(text: str):
    """'0.5' -> the fraction 0.5; '20GiB' stays a byte size (graphopt parses it)."""
    try:
        return float(text)
    except ValueError:
        return text


def main() -> None:
    args = parse_args(__doc__, extra={
        "memory-budget": (budget, 0.5, "a fraction of the min-cut plan's saved activations, or "
                                       "bytes per graph ('20GiB')")})
    device = init_distributed()
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    torch.manual_seed(0)
    config = (LlamaConfig.tiny if args.model == "tiny" else LlamaConfig.llama3_8b)(
        n_layers=args.layers, max_seq_len=args.seq_len)
    model = Llama(config).to(device, training_dtype(device))
    check = EagerCheck(model, device) if args.check else None
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)

    compiled = torch.compile(model, backend=graphopt.backend(
        memory_budget=args.memory_budget, codegen=args.codegen, dump_dir=args.dump_dir))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)

    for step in range(args.steps):
        # every rank trains on its own batch in real use; here all ranks share one to compare
        inputs, targets = random_batch(step, config.vocab_size, args.batch, args.seq_len, device)
        loss = llama_loss(compiled(inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        report(step, loss.item(), check, lambda eager: llama_loss(eager(inputs), targets))
    if check:
        check.finish()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
