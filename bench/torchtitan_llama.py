"""torchtitan's stock Llama-3-8B training at the multi-GPU sweep's sizes: the baseline of
``bench/plan_sweep_multigpu.py`` (which calls it per group), or on its own.

What runs is torchtitan's own ``llama3_8b`` configuration (``torchtitan.models.llama3.config_registry``,
FSDP2, bf16 compute / fp32 reduction, chunked loss, AdamW), launched by torchrun as
``python -m torchtitan.train --module torchtitan_llama --config graphopt_baseline``, changed only in:

  layers   the first N of its 32 blocks (the sweep's count)
  sizes    training.seq_len = S, local_batch_size = 1, global_batch_size = the sweep's sequences
           (torchtitan accumulates gradients to make it up)
  data     a synthetic local dataset (random words) and a word-level tokenizer written beside the
           run: the GPU machine reaches no network, and token values do not change the work
  quiet    no checkpoint, profiler, tensorboard or validation; metrics logged every step

Its stock variants, kept where they apply to the world, sequence and batch: FSDP2 alone;
FSDP2 + tensor parallelism with async TP (which torchtitan runs only compiled); FSDP2 + context
parallelism (its head-tail load balancer); TP + CP; each with selective activation checkpointing
(torchtitan's default), and FSDP2 alone also with full and with no checkpointing. Compile on
(model + loss, as torchtitan's 8B recipes do for async TP). Each variant's tokens/s per GPU is the
median of torchtitan's own ``tps`` over the steps after the first two, its peak the largest
``memory`` it logs (the caching allocator's reserved peak); a variant that runs out of memory is
recorded as such. The fastest one that ran is the baseline.

Wheels to carry to the GPU machine (no registry there; Python 3.12), from the repo root here:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d .whl torchtitan==0.3.0 spmd_types==0.2.3 torch_checkpointing==0.1.1 torchdata==0.11.0 \\
        datasets==4.7.0 tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1 dill==0.4.0 multiprocess==0.70.18

(2.6 MB; torch, tokenizers, safetensors, einops, pillow, tensorboard, pyarrow, pandas, xxhash, fsspec
and huggingface-hub are on the GPU image; wandb is imported only when enabled). There, with ``.whl``
carried:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    python3 bench/torchtitan_llama.py --nproc 4 --seq 8192 --layers 4 --sequences 8 --out $OUT/titan

torchtitan 0.3.0 says it wants a recent PyTorch; the GPU image has torch 2.11. A variant that fails
for that reason is recorded with its error (the last lines of its log) and the others still run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import random
import re
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Optional

HERE = pathlib.Path(__file__).resolve().parent
RUN_ENV = "GRAPHOPT_TITAN_RUN"    # the JSON that graphopt_baseline() reads in every rank
WARMUP_STEPS = 2                  # compile and allocator warm-up: their tps is not counted
TOKENIZER_WORDS = 4096
ANSI = re.compile(r"\x1b\[[0-9;]*m")
STEP_LINE = re.compile(r"step:\s*(\d+)\s.*?memory:\s*([\d.]+)GiB.*?tps:\s*([\d,]+)(?:.*?mfu:\s*([\d.]+)%)?")
OOM_MARKERS = ("OutOfMemoryError", "CUDA out of memory")


@dataclasses.dataclass(frozen=True)
class Variant:
    tp: int
    cp: int
    ac: str            # torchtitan's activation checkpointing: "selective", "full" or "none"
    compile: bool = True

    @property
    def async_tp(self) -> bool:
        return self.tp > 1 and self.compile

    def dp_shard(self, world: int) -> int:
        return world // (self.tp * self.cp)

    def describe(self, world: int) -> str:
        parts = [f"fsdp{self.dp_shard(world)}"]
        if self.tp > 1:
            parts.append(f"tp{self.tp}" + (" async" if self.async_tp else ""))
        if self.cp > 1:
            parts.append(f"cp{self.cp}")
        parts.append(f"{self.ac} AC")
        if not self.compile:
            parts.append("eager")
        return " ".join(parts)


def stock_variants(world: int, seq: int, sequences: int) -> list[Variant]:
    """torchtitan's stock combinations that this world, sequence and global batch allow: the
    data-parallel degree must divide the sequences, CP's head-tail balancer needs 2 x cp chunks."""
    candidates = [Variant(1, 1, "selective"), Variant(1, 1, "full"), Variant(1, 1, "none")]
    for tp in (2, 4, 8):
        candidates.append(Variant(tp, 1, "selective"))
    for cp in (2, 4, 8):
        candidates.append(Variant(1, cp, "selective"))
    candidates.append(Variant(2, 2, "selective"))
    kept = []
    for variant in candidates:
        model_ranks = variant.tp * variant.cp
        if world % model_ranks or sequences % variant.dp_shard(world) or seq % (2 * variant.cp):
            continue
        kept.append(variant)
    return kept


# --- inside torchtitan's process: its config, changed as the module doc says ---------------------

def graphopt_baseline():
    """torchtitan's ``llama3_8b`` configuration changed for one sweep run (read from $GRAPHOPT_TITAN_RUN)."""
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.config import CompileConfig
    from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC
    from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataLoader
    from torchtitan.models.llama3.config_registry import llama3_8b

    run = json.loads(os.environ[RUN_ENV])
    variant = Variant(**run["variant"])
    config = llama3_8b()
    model = config.model_spec.model
    model.layers = list(model.layers)[: run["layers"]]
    config.hf_assets_path = run["assets"]
    config.dump_folder = run["dump_folder"]
    config.dataloader = HuggingFaceTextDataLoader.Config(dataset="c4_test", dataset_path=run["data"])
    config.training.seq_len = run["seq"]
    config.training.local_batch_size = 1
    config.training.global_batch_size = run["sequences"]
    config.training.steps = run["steps"]
    config.parallelism.data_parallel_shard_degree = variant.dp_shard(run["world"])
    config.parallelism.tensor_parallel_degree = variant.tp
    config.parallelism.context_parallel_degree = variant.cp
    config.compile = CompileConfig(enable=variant.compile, components=["model", "loss"],
                                   enable_async_tensor_parallel=variant.async_tp)
    config.activation_checkpoint = {"selective": SelectiveAC.Config(), "full": FullAC.Config(),
                                    "none": None}[variant.ac]
    config.checkpoint = CheckpointManager.Config(enable=False)
    config.profiler.enable_profiling = False
    config.metrics.enable_tensorboard = False
    config.metrics.log_freq = 1
    config.validator.enable = False
    return config


# --- outside: assets, the command, its log ----------------------------------------------------

def write_assets(folder: pathlib.Path, seq: int, sequences: int) -> tuple[pathlib.Path, pathlib.Path]:
    """(tokenizer folder, dataset folder): a word-level tokenizer of TOKENIZER_WORDS words and
    documents of random words, enough for every step of a run without looping."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    assets, data = folder / "tokenizer", folder / "data"
    assets.mkdir(parents=True, exist_ok=True)
    data.mkdir(parents=True, exist_ok=True)
    words = [f"w{i}" for i in range(TOKENIZER_WORDS)]
    vocab = {"<unk>": 0, "<|begin_of_text|>": 1, "<|end_of_text|>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(assets / "tokenizer.json"))
    (assets / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}))
    rng = random.Random(0)
    documents = 4 * sequences + 8
    with open(data / "train.jsonl", "w") as handle:
        for _ in range(documents):
            handle.write(json.dumps({"text": " ".join(rng.choices(words, k=seq))}) + "\n")
    return assets, data


def command(variant: Variant, world: int, seq: int, layers: int, sequences: int, steps: int,
            folder: pathlib.Path) -> tuple[list[str], dict[str, str]]:
    """torchrun's argv and the environment for one variant (assets already in ``folder``)."""
    run = {"variant": dataclasses.asdict(variant), "world": world, "seq": seq, "layers": layers,
           "sequences": sequences, "steps": steps, "assets": str(folder / "tokenizer"),
           "data": str(folder / "data"), "dump_folder": str(folder / "outputs")}
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
            "-m", "torchtitan.train", "--module", "torchtitan_llama", "--config", "graphopt_baseline"]
    env = {**os.environ, RUN_ENV: json.dumps(run),
           "PYTHONPATH": os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p),
           "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    return argv, env


def parse_log(text: str) -> dict[str, Any]:
    """tokens/s per GPU (median after the warm-up steps), peak reserved GiB, torchtitan's MFU, or
    what went wrong."""
    steps: dict[int, tuple[float, float, Optional[float]]] = {}
    for line in ANSI.sub("", text).splitlines():
        match = STEP_LINE.search(line)
        if match and "validate" not in line:
            step = int(match.group(1))
            mfu = float(match.group(4)) if match.group(4) else None
            steps[step] = (float(match.group(2)), float(match.group(3).replace(",", "")), mfu)
    timed = [v for step, v in sorted(steps.items()) if step > WARMUP_STEPS]
    result: dict[str, Any] = {"steps_logged": len(steps)}
    if timed:
        result.update(tokens_per_s_per_gpu=statistics.median(v[1] for v in timed),
                      peak_reserved_gib=max(v[0] for v in steps.values()),
                      torchtitan_mfu=statistics.median(v[2] for v in timed) / 100 if timed[0][2] is not None
                      else None)
    if any(marker in text for marker in OOM_MARKERS):
        result["oom"] = True
    return result


def run_variant(variant: Variant, world: int, seq: int, layers: int, sequences: int, steps: int,
                folder: pathlib.Path, timeout_s: float) -> dict[str, Any]:
    argv, env = command(variant, world, seq, layers, sequences, steps, folder)
    log_path = folder / f"{variant.describe(world).replace(' ', '_')}.log"
    started = time.monotonic()
    try:
        with open(log_path, "w") as log:
            rc = subprocess.run(argv, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    text = log_path.read_text(errors="replace")
    row = {"variant": variant.describe(world), "config": dataclasses.asdict(variant), "rc": rc,
           "wall_s": round(time.monotonic() - started, 1), **parse_log(text)}
    if rc != 0 and "tokens_per_s_per_gpu" not in row and not row.get("oom"):
        row["error"] = "\n".join(ANSI.sub("", text).strip().splitlines()[-6:])[-800:]
    return row


def fastest(rows: list[dict]) -> Optional[dict]:
    """The fastest variant that completed its steps."""
    ran = [r for r in rows if r.get("tokens_per_s_per_gpu") and r.get("rc") == 0]
    return max(ran, key=lambda r: r["tokens_per_s_per_gpu"], default=None)


def run_baseline(world: int, seq: int, layers: int, sequences: int, folder: pathlib.Path, *,
                 steps: int = 6, deadline: Optional[float] = None, timeout_s: float = 420,
                 on_row: Callable[[dict], None] = lambda row: None) -> list[dict]:
    """Every stock variant in turn (none started past ``deadline``, a ``time.monotonic()``)."""
    write_assets(folder, seq, sequences * steps)
    rows = []
    for variant in stock_variants(world, seq, sequences):
        if deadline is not None and time.monotonic() > deadline:
            rows.append({"variant": variant.describe(world), "config": dataclasses.asdict(variant),
                         "skipped": "past --time-limit"})
        else:
            rows.append(run_variant(variant, world, seq, layers, sequences, steps, folder, timeout_s))
        on_row(rows[-1])
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, required=True, help="GPUs (torchrun processes)")
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--sequences", type=int, required=True, help="global batch, in sequences")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    folder = pathlib.Path(args.out)

    def show(row):
        print({k: v for k, v in row.items() if k != "config"}, flush=True)
    rows = run_baseline(args.nproc, args.seq, args.layers, args.sequences, folder, steps=args.steps, on_row=show)
    (folder / "torchtitan_llama.json").write_text(json.dumps({"rows": rows, "fastest": fastest(rows)}, indent=1))
    print("fastest:", fastest(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
