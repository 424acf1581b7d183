"""A Hugging Face transformers ``LlamaForCausalLM``, sequence-parallel, under a memory budget.

    # 8 GPUs, 64K tokens per sequence, 8B layer dimensions (random weights; see below to load some):
    torchrun --standalone --nproc-per-node 8 examples/hf_llama.py --seq-len 65536
    # one GPU or CPU, no sequence parallelism, only the memory budget:
    torchrun --standalone --nproc-per-node 1 examples/hf_llama.py --model tiny --seq-len 64 --codegen eager --no-sequence-parallel --check
    # any machine, toy size, sequence-parallel, checked against eager:
    torchrun --standalone --nproc-per-node 2 examples/hf_llama.py --model tiny --seq-len 128 --codegen eager --check

The model is called as in training: ``input_ids`` and ``position_ids`` of this rank's slice,
``use_cache=False``, no ``labels`` (transformers shifts labels inside each call, which on a slice
would drop the token at every slice boundary); the targets are shifted once, before sharding.
With sequence parallelism on, every attention of the model is rewritten to span the whole
sequence, or compilation fails naming the source line that stopped it; it never runs locally.
To train real weights: ``LlamaForCausalLM.from_pretrained(name, torch_dtype=torch.bfloat16,
attn_implementation="sdpa")``.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import graphopt
from graphopt.distributed.sharding import shard_sequence

from common import (LEARNING_RATE, EagerCheck, init_distributed, parse_args, random_batch, report,
                    training_dtype)

SIZES = {  # Llama 3 8B's layer dimensions, and a tiny model for CPU runs
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128),
}


def loss_of(model, inputs, positions, targets) -> torch.Tensor:
    logits = model(input_ids=inputs, position_ids=positions, use_cache=False).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def main() -> None:
    args = parse_args(__doc__, seq_len=65536, extra={
        "sequence-parallel": (bool, True, "shard each sequence over the ranks"),
        "memory-budget": (float, 0.5, "fraction of the min-cut plan's saved activations to keep")})
    device = init_distributed()
    world = dist.get_world_size() if args.sequence_parallel else 1
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=args.layers, max_position_embeddings=args.seq_len,
                         attn_implementation="sdpa", **SIZES[args.model])
    model = LlamaForCausalLM(config).to(device, training_dtype(device))
    check = EagerCheck(model, device) if args.check else None

    compiled = torch.compile(model, backend=graphopt.backend(
        sequence_parallel_attention=args.sequence_parallel, memory_budget=args.memory_budget,
        codegen=args.codegen, dump_dir=args.dump_dir))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)

    for step in range(args.steps):
        inputs, targets = random_batch(step, config.vocab_size, args.batch, args.seq_len, device)
        if args.sequence_parallel:
            local_inputs, positions = shard_sequence(inputs)
            local_targets, _ = shard_sequence(targets)
        else:
            local_inputs, local_targets = inputs, targets
            positions = torch.arange(args.seq_len, device=device).expand_as(inputs)
        loss = loss_of(compiled, local_inputs, positions, local_targets) / world
        loss.backward()
        if args.sequence_parallel:
            for param in model.parameters():
                dist.all_reduce(param.grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total = loss.detach().clone()
        if args.sequence_parallel:
            dist.all_reduce(total)
        full_positions = torch.arange(args.seq_len, device=device).expand_as(inputs)
        report(step, total.item(), check,
               lambda eager: loss_of(eager, inputs, full_positions, targets))
    if check:
        check.finish()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
