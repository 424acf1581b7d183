"""``python -m graphopt plan``: choose a layout for a model on a world and explain the choice.

    python -m graphopt plan --model llama3-8b --nodes 8 --gpus-per-node 8 --seq 8192 \\
        --global-batch-tokens 4194304 --profile profile.json --dump-dir plan/

The model is built on the meta device (nothing is allocated): a named Llama configuration, or a
Hugging Face ``config.json`` (``--model path/to/config.json``); ``--reference`` builds graphopt's
reference Llama with the same dimensions instead of transformers' LlamaForCausalLM.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from graphopt.planning.layouts import CODEGENS, MemoryPlan, SearchSpace
from graphopt.planning.world import GIB, World, resolve_profile

# Published dimensions of the Llama checkpoints (their config.json).
NAMED_MODELS: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, num_hidden_layers=32, vocab_size=128256,
                      rope_theta=500000.0),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                       num_key_value_heads=8, num_hidden_layers=80, vocab_size=128256,
                       rope_theta=500000.0),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                      num_key_value_heads=32, num_hidden_layers=32, vocab_size=32000),
}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="llama3-8b",
                        help=f"one of {sorted(NAMED_MODELS)} or a Hugging Face config.json")
    parser.add_argument("--reference", action="store_true",
                        help="graphopt's reference Llama with these dimensions (default: transformers' "
                             "LlamaForCausalLM)")
    parser.add_argument("--layers", type=int, help="override the number of layers")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                        help="parameter dtype; with fp32, training computes in bf16 (FSDP2 mixed precision)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--memory-gib", type=float, default=80e9 / GIB, help="memory per GPU")
    parser.add_argument("--profile", default="h100",
                        help="device profile: h100, h200 or a JSON from `python -m graphopt calibrate`")
    parser.add_argument("--inter-node-gbps", type=float, default=50.0,
                        help="GB/s per GPU between nodes (400 Gb/s: 50)")
    parser.add_argument("--peak-tflops", type=float, help="MFU denominator per GPU (default: data sheet)")
    parser.add_argument("--seq", type=int, required=True, help="sequence length")
    parser.add_argument("--global-batch-tokens", type=int, required=True, help="tokens per optimizer step")
    parser.add_argument("--optimizer-bytes", type=float,
                        help="optimizer state per parameter (default: Adam in the parameters' dtype)")
    parser.add_argument("--micro-batches", default="1,2,4,8", help="micro-batch sizes to try")
    parser.add_argument("--memory-plans", default="1.0,offload,0.6,0.3",
                        help="remat budgets (fractions) and 'offload' to try")
    parser.add_argument("--codegens", default="inductor", help=f"code generators to try, of {CODEGENS}")
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--dump-dir", help="write layout_plan.json and layout_plan.md here")
    parser.add_argument("--json", action="store_true", help="print the JSON report instead of the table")


def build_model(args: argparse.Namespace):
    import torch

    dtype = getattr(torch, DTYPES[args.dtype])
    if args.model in NAMED_MODELS:
        dims = dict(NAMED_MODELS[args.model])
    else:
        try:
            with open(args.model) as handle:
                dims = json.load(handle)
        except (OSError, ValueError) as err:
            raise SystemExit(f"--model {args.model!r} is neither one of {sorted(NAMED_MODELS)} nor a "
                             f"readable config.json ({err})")
    if args.layers:
        dims["num_hidden_layers"] = args.layers
    with torch.device("meta"):
        if args.reference:
            from graphopt.models.llama import Llama, LlamaConfig
            cfg = LlamaConfig(dim=dims["hidden_size"], n_layers=dims["num_hidden_layers"],
                              n_heads=dims["num_attention_heads"],
                              n_kv_heads=dims.get("num_key_value_heads", dims["num_attention_heads"]),
                              ffn_dim=dims["intermediate_size"], vocab_size=dims["vocab_size"],
                              max_seq_len=max(args.seq, 4096), rope_theta=dims.get("rope_theta", 10000.0))
            return Llama(cfg).to(dtype)
        import transformers
        config = transformers.AutoConfig.for_model(**{"model_type": "llama", **dims})
        config._attn_implementation = "sdpa"
        return transformers.AutoModelForCausalLM.from_config(config).to(dtype)


def space_from(args: argparse.Namespace) -> SearchSpace:
    plans = []
    for item in args.memory_plans.split(","):
        item = item.strip()
        plans.append(MemoryPlan(None, True) if item == "offload" else MemoryPlan(float(item)))
    return SearchSpace(micro_batches=tuple(int(m) for m in args.micro_batches.split(",")),
                       memory_plans=tuple(plans),
                       codegens=tuple(c.strip() for c in args.codegens.split(",")))


def run(args: argparse.Namespace) -> int:
    import torch

    from graphopt.planning.planner import NoLayoutFitsError, plan

    model = build_model(args)
    world = World(gpus_per_node=args.gpus_per_node, nodes=args.nodes,
                  memory_per_gpu=int(args.memory_gib * GIB), profile=resolve_profile(args.profile),
                  inter_node_gbps=args.inter_node_gbps, peak_tflops=args.peak_tflops)
    fp32 = args.dtype == "fp32"
    from graphopt.planning.model_facts import trace_model
    facts = trace_model(model, compute_dtype=torch.bfloat16 if fp32 else None)
    try:
        report = plan(facts, world, seq_len=args.seq, global_batch_tokens=args.global_batch_tokens,
                      optimizer_bytes=args.optimizer_bytes, space=space_from(args),
                      dump_dir=args.dump_dir)
    except NoLayoutFitsError as err:
        print(err, file=sys.stderr)
        if args.dump_dir:
            print(f"the layouts that do not fit are in {args.dump_dir}/layout_plan.md", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report.to_json(args.top_k), indent=1, default=str))
    else:
        print(report.explain(args.top_k))
    return 0
