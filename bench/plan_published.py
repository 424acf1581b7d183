"""The planner's predicted best layouts for Llama-3-8B and -70B at 8K, 32K and 128K tokens on 8, 64,
512 (and 1,024) H100s -- predictions, not measurements -- for docs/layout_planner.md, which sets
them beside the published torchtitan and Megatron configurations. The model: graphopt's reference
Llama at the checkpoints' dimensions with its chunked output loss (``build``).

The world: nodes of 8 H100 (80 GB, the built-in H100 profile, or --profile), 400 Gb/s per GPU
between nodes. Training as torchtitan's default: bf16 compute, fp32 parameters, gradients and Adam
state sharded by FSDP2 (16 bytes per parameter). Global batch: 1M tokens on 8 and 64 GPUs (the
Megatron examples' 128 sequences of 8K), 4M on 512 and 1,024. Runs on the CPU (nothing is
allocated: the models are built on the meta device).

    python3 bench/plan_published.py --out bench/results          # ~10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graphopt.planning import World, plan, trace_model  # noqa: E402
from graphopt.planning.cli import NAMED_MODELS  # noqa: E402
from graphopt.planning.planner import NoLayoutFitsError  # noqa: E402
from graphopt.planning.world import GIB, resolve_profile  # noqa: E402

LOSS_CHUNK_TOKENS = 4096
CELLS = [(model, seq, gpus) for model in ("llama3-8b", "llama3-70b") for seq in (8192, 32768, 131072)
         for gpus in (8, 64, 512)] + [("llama3-8b", 131072, 1024), ("llama3-70b", 131072, 1024)]


def build(name: str):
    """graphopt's reference Llama at the checkpoint's dimensions: its loss computes the output
    projection and cross entropy in chunks of tokens, as torchtitan's compiled loss and Megatron's
    fused cross entropy avoid holding fp32 logits (Hugging Face's eager loss holds three copies)."""
    from graphopt.models.llama import Llama, LlamaConfig
    dims = NAMED_MODELS[name]
    cfg = LlamaConfig(dim=dims["hidden_size"], n_layers=dims["num_hidden_layers"],
                      n_heads=dims["num_attention_heads"], n_kv_heads=dims["num_key_value_heads"],
                      ffn_dim=dims["intermediate_size"], vocab_size=dims["vocab_size"],
                      max_seq_len=131072, rope_theta=dims["rope_theta"])
    with torch.device("meta"):
        return Llama(cfg)


def chunked_loss(model, tokens):
    return model.loss(tokens, tokens, chunks=max(1, tokens.numel() // LOSS_CHUNK_TOKENS))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--profile", default="h100")
    args = parser.parse_args(argv)
    profile = resolve_profile(args.profile)
    facts = {name: trace_model(build(name), loss_fn=chunked_loss, compute_dtype=torch.bfloat16)
             for name in sorted({c[0] for c in CELLS})}
    rows = []
    for name, seq, gpus in CELLS:
        started = time.perf_counter()
        world = World(gpus_per_node=8, nodes=gpus // 8, memory_per_gpu=80 * 10**9, profile=profile)
        tokens = 2**20 if gpus <= 64 else 2**22
        row = {"model": name, "seq": seq, "gpus": gpus, "global_batch_tokens": tokens}
        try:
            report = plan(facts[name], world, seq_len=seq, global_batch_tokens=tokens, optimizer_bytes=8)
            best = report.chosen
            row.update(layout=best.layout.describe(), step_s=best.step_s, mfu=best.mfu,
                       peak_gib=best.peak_bytes / GIB, tokens_per_s_per_gpu=best.tokens_per_s_per_gpu,
                       parts_s=best.parts_s, overlap=best.overlap, runner_up=[
                           {"layout": p.layout.describe(), "step_s": p.step_s} for p in report.ranked[1:4]],
                       why_not=report.to_json(1)["why_not"], fitting=len(report.ranked),
                       not_fitting=len(report.unfit))
        except NoLayoutFitsError as error:
            row.update(layout=None, error=str(error))
        row["planner_s"] = time.perf_counter() - started
        rows.append(row)
        print({k: row.get(k) for k in ("model", "seq", "gpus", "layout", "step_s", "mfu", "planner_s")},
              flush=True)
    result = {"name": "plan_published", "kind": "predictions of graphopt's layout planner (not measured)",
              "torch": torch.__version__, "profile": profile.to_json(),
              "world": "nodes of 8 GPUs, 80 GB each (10 % kept free), 400 Gb/s per GPU between nodes",
              "training": "bf16 compute, fp32 parameters + gradients + Adam state (16 bytes per parameter), "
                          "FSDP2 over data x sequence-parallel ranks",
              "rows": rows}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan_published.json").write_text(json.dumps(result, indent=1, default=str))
    lines = ["# Predicted best layouts (graphopt's planner, H100 profile; predictions, not measurements)", "",
             f"{result['world']}; {result['training']}; global batch 1M tokens on 8-64 GPUs, 4M on 512-1024.", "",
             "| model | seq | GPUs | layout | step s | MFU | peak GiB | tok/s/GPU | runner-up |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r.get("layout") is None:
            lines.append(f"| {r['model']} | {r['seq']} | {r['gpus']} | no layout fits | | | | | |")
            continue
        runner = r["runner_up"][0] if r["runner_up"] else None
        lines.append(f"| {r['model']} | {r['seq']} | {r['gpus']} | {r['layout']} | {r['step_s']:.2f} | "
                     f"{r['mfu']:.3f} | {r['peak_gib']:.1f} | {r['tokens_per_s_per_gpu']:.0f} | "
                     + (f"{runner['layout']} ({runner['step_s'] / r['step_s']:.3f}x)" if runner else "-") + " |")
    (out / "plan_published.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
