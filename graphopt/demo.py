"""The demo: compile the reference Llama with graphopt's passes on, check it against eager, show
what every pass did, and write the dump.

Two models run on every rank of a process group (gloo on CPU, NCCL when there are enough GPUs):

* sequence-parallel: each rank holds a contiguous slice of the sequence and runs the unchanged
  model on it with global position ids; graphopt shards attention over the ranks, plans
  rematerialization under a memory budget and offloads activations. Local logits are compared
  with the matching slice of the full-sequence eager logits; gradients summed over ranks with the
  full-sequence eager gradients.
* tensor-parallel (DTensor column/row-parallel linears): graphopt overlaps each row-parallel GEMM
  with its all-reduce. Logits and gradients are compared with the unsharded eager model.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import time

import torch
import torch.distributed as dist

import graphopt
from graphopt.debug.dump import clear_compile_summaries, compile_summaries, write_index
from graphopt.debug.pages import summary_lines
from graphopt.distributed.launch import spawn
from graphopt.models.llama import Llama, LlamaConfig, llama_loss, parallelize_llama


@dataclasses.dataclass
class DemoOptions:
    world_size: int = 2
    seq_len: int = 64
    batch: int = 2
    layers: int = 2
    codegen: str = "eager"
    dump_dir: str = "graphopt_dump"
    memory_budget: float = 0.5
    sequence_parallel: bool = True
    overlap: bool = True
    remat: bool = True
    offload: bool = True
    backend: str = "gloo"


def _tolerance(device: torch.device) -> dict:
    return dict(rtol=2e-3, atol=2e-4) if device.type == "cpu" else dict(rtol=2e-2, atol=2e-3)


def _max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.float() - expected.float()).abs().max().item()


def _sequence_parallel_part(rank, world, opts, cfg, device, reference, tokens, targets,
                            ref_logits, ref_grads):
    from graphopt.distributed.sharding import shard_sequence

    model = copy.deepcopy(reference)
    model.zero_grad(set_to_none=True)
    local_tokens, local_positions = shard_sequence(tokens, dim=1)
    local_targets, _ = shard_sequence(targets, dim=1)
    flags = dict(codegen=opts.codegen, dump_dir=os.path.join(opts.dump_dir, "sequence_parallel"),
                 sequence_parallel_attention=opts.sequence_parallel,
                 memory_budget=opts.memory_budget if opts.remat else None,
                 offload_activations=opts.offload)
    compiled = torch.compile(model, backend=graphopt.backend(**flags))
    logits = compiled(local_tokens, local_positions)
    # Each rank's loss is its share of the full-sequence mean, so gradients summed over ranks
    # equal the full-sequence gradients.
    loss = llama_loss(logits, local_targets) / world
    loss.backward()
    chunk = tokens.shape[1] // world
    expected = ref_logits[:, rank * chunk:(rank + 1) * chunk]
    grad_error, ok_grads = 0.0, True
    for name, param in model.named_parameters():
        grad = param.grad.detach().clone()
        dist.all_reduce(grad)
        grad_error = max(grad_error, _max_error(grad, ref_grads[name]))
        ok_grads &= torch.allclose(grad, ref_grads[name], **_tolerance(device))
    ok_logits = torch.allclose(logits.float(), expected.float(), **_tolerance(device))
    return {"model": "sequence-parallel", "flags": {k: v for k, v in flags.items() if k != "dump_dir"},
            "logits_max_error": _max_error(logits, expected), "grad_max_error": grad_error,
            "ok": ok_logits and ok_grads}


def _tensor_parallel_part(rank, world, opts, cfg, device, reference, tokens, targets,
                          ref_logits, ref_grads):
    from torch.distributed.device_mesh import init_device_mesh

    model = copy.deepcopy(reference)
    model.zero_grad(set_to_none=True)
    mesh = init_device_mesh(device.type, (world,))
    parallelize_llama(model, mesh)
    flags = dict(codegen=opts.codegen, dump_dir=os.path.join(opts.dump_dir, "tensor_parallel"),
                 overlap_matmul_collectives=opts.overlap)
    if device.type == "cpu":
        # The cost model rightly keeps these tiny GEMMs sequential; force the chunked runtime so
        # the demo checks the rewritten graph's numerics.
        flags["overlap_mode"] = "chunked"
    compiled = torch.compile(model, backend=graphopt.backend(**flags))
    logits = compiled(tokens)
    llama_loss(logits, targets).backward()
    grad_error, ok = 0.0, True
    for name, param in model.named_parameters():
        grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
        grad_error = max(grad_error, _max_error(grad, ref_grads[name]))
        ok &= torch.allclose(grad.float(), ref_grads[name].float(), **_tolerance(device))
    logits_ok = torch.allclose(logits.float(), ref_logits.float(), **_tolerance(device))
    return {"model": "tensor-parallel", "flags": {k: v for k, v in flags.items() if k != "dump_dir"},
            "logits_max_error": _max_error(logits, ref_logits), "grad_max_error": grad_error,
            "ok": ok and logits_ok}


def _demo_rank(rank: int, world: int, opts: DemoOptions) -> dict:
    device = torch.device("cuda", rank) if opts.backend == "nccl" else torch.device("cpu")
    torch.manual_seed(0)
    cfg = LlamaConfig.tiny(n_layers=opts.layers, n_heads=4 * world, n_kv_heads=2 * world,
                           dim=32 * world, max_seq_len=max(1024, opts.seq_len))
    reference = Llama(cfg).to(device)
    tokens = torch.randint(0, cfg.vocab_size, (opts.batch, opts.seq_len), device=device)
    targets = torch.randint(0, cfg.vocab_size, (opts.batch, opts.seq_len), device=device)
    ref_logits = reference(tokens)
    llama_loss(ref_logits, targets).backward()
    ref_grads = {n: p.grad.detach().clone() for n, p in reference.named_parameters()}
    ref_logits = ref_logits.detach()
    parts = []
    for part in (_sequence_parallel_part, _tensor_parallel_part):
        # Dynamo recompiling the same Llama code for the DTensor model after the plain one hits
        # a RecursionError in AOTAutograd's tracing (torch 2.13); each part compiles afresh.
        torch._dynamo.reset()
        clear_compile_summaries()
        start = time.perf_counter()
        result = part(rank, world, opts, cfg, device, reference, tokens, targets, ref_logits,
                      ref_grads)
        result["seconds"] = round(time.perf_counter() - start, 2)
        result["summaries"] = compile_summaries()
        parts.append(result)
    return {"rank": rank, "parts": parts}


def _print_report(results: list[dict], opts: DemoOptions) -> bool:
    print("\nWhat each pass did (rank 0; every stage of every graph):")
    for part in results[0]["parts"]:
        for summary in part["summaries"]:
            print(f"\n  {part['model']} model, {summary['graph']}:")
            for line in summary_lines(summary):
                print(f"    {line}")
    print("\nChecks against eager (every rank):")
    all_ok = True
    for result in results:
        for part in result["parts"]:
            all_ok &= part["ok"]
            print(f"  rank {result['rank']} {part['model']:<18} logits max err "
                  f"{part['logits_max_error']:.2e}  grad max err {part['grad_max_error']:.2e}  "
                  f"{'OK' if part['ok'] else 'MISMATCH'}  ({part['seconds']} s)")
    print(f"\nDump: {os.path.join(opts.dump_dir, 'index.html')}")
    return all_ok


def run_demo(opts: DemoOptions) -> bool:
    if opts.seq_len % opts.world_size:
        raise SystemExit(f"--seq-len {opts.seq_len} is not divisible by --world-size "
                         f"{opts.world_size}; choose a multiple")
    print(f"graphopt demo: reference Llama, {opts.world_size} ranks over {opts.backend}, "
          f"codegen {opts.codegen}, sequence {opts.seq_len} x batch {opts.batch}")
    results = spawn(_demo_rank, opts.world_size, opts, backend=opts.backend)
    write_index(opts.dump_dir)
    return _print_report(results, opts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = DemoOptions()
    parser.add_argument("--world-size", type=int, default=defaults.world_size)
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len)
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--layers", type=int, default=defaults.layers)
    parser.add_argument("--codegen", choices=("eager", "inductor"), default=defaults.codegen,
                        help="eager is fast to compile on CPU; inductor generates kernels")
    parser.add_argument("--dump-dir", default=defaults.dump_dir)
    parser.add_argument("--memory-budget", type=float, default=defaults.memory_budget,
                        help="fraction of the no-remat saved activations")
    for name in ("sequence-parallel", "overlap", "remat", "offload"):
        parser.add_argument(f"--no-{name}", action="store_true", help=f"switch {name} off")
    parser.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto",
                        help="auto: NCCL when there are --world-size GPUs, else gloo on CPU")


def options_from_args(args: argparse.Namespace) -> DemoOptions:
    backend = args.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.device_count() >= args.world_size else "gloo"
    return DemoOptions(world_size=args.world_size, seq_len=args.seq_len, batch=args.batch,
                       layers=args.layers, codegen=args.codegen, dump_dir=args.dump_dir,
                       memory_budget=args.memory_budget,
                       sequence_parallel=not args.no_sequence_parallel,
                       overlap=not args.no_overlap, remat=not args.no_remat,
                       offload=not args.no_offload, backend=backend)
