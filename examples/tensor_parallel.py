"""DTensor tensor parallelism with graphopt overlapping each row-parallel GEMM with its collective.

    # 8 GPUs of one host, 8B layer dimensions:
    torchrun --standalone --nproc-per-node 8 examples/tensor_parallel.py
    # any machine, toy size, checked against eager (CPU GEMMs are too small for overlap to pay,
    # so the chunked mode is forced to exercise the rewrite):
    torchrun --standalone --nproc-per-node 2 examples/tensor_parallel.py --model tiny --seq-len 64 --codegen eager --overlap-mode chunked --check

The tensor-parallel plan is torch's own (``parallelize_module``): column-parallel q/k/v and w1/w3,
row-parallel wo and w2, whose outputs end in an all-reduce. graphopt's overlap pass finds each
GEMM + all-reduce (and reduce-scatter, all-gather + GEMM) in the compiled graph and, where its cost
model predicts a gain, replaces it with a chunked / copy-engine / tile-signalled kernel.
"""

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import graphopt
from graphopt.models.llama import Llama, LlamaConfig, llama_loss

from common import (LEARNING_RATE, EagerCheck, init_distributed, parse_args, random_batch, report,
                    training_dtype)

TENSOR_PARALLEL_PLAN = {
    "attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(),
    "attention.wv": ColwiseParallel(), "attention.wo": RowwiseParallel(),
    "feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(),
    "feed_forward.w2": RowwiseParallel(),
}


def main() -> None:
    args = parse_args(__doc__, extra={
        "overlap-mode": (str, "auto", "auto: the cost model picks per site; or sequential, "
                                      "chunked, copy_engine, tile")})
    device = init_distributed()
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    torch.manual_seed(0)
    config = (LlamaConfig.tiny if args.model == "tiny" else LlamaConfig.llama3_8b)(
        n_layers=args.layers, max_seq_len=args.seq_len)
    model = Llama(config).to(device, training_dtype(device))
    check = EagerCheck(model, device) if args.check else None
    for block in model.layers:  # heads and MLP columns split over the ranks
        parallelize_module(block, mesh, TENSOR_PARALLEL_PLAN)

    compiled = torch.compile(model, backend=graphopt.backend(
        overlap_matmul_allreduce=True, overlap_mode=args.overlap_mode,
        codegen=args.codegen, dump_dir=args.dump_dir))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)

    for step in range(args.steps):
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
