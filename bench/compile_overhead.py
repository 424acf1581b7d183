"""graphopt with every pass off vs plain Inductor: same results, compile time within 10 %.

Cold compiles (Inductor's caches off, Dynamo reset) of the reference Llama, alternating the two
backends so that machine load affects both alike; the median of --repeats each.

    python bench/compile_overhead.py --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

import graphopt
from graphopt.models.llama import Llama, LlamaConfig, llama_loss


def compile_once(backend, model, tokens, targets):
    torch._dynamo.reset()
    start = time.perf_counter()
    with torch._inductor.config.patch(force_disable_caches=True):
        compiled = torch.compile(model, backend=backend)
        loss = llama_loss(compiled(tokens), targets)
        loss.backward()
    return time.perf_counter() - start, loss.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = Llama(LlamaConfig.tiny(n_layers=args.layers, dim=128, n_heads=4, n_kv_heads=2)).to(device)
    tokens = torch.randint(0, 128, (2, 128), device=device)
    targets = torch.randint(0, 128, (2, 128), device=device)
    compile_once("inductor", model, tokens, targets)  # warm the Python side (imports, autotune cache)
    times = {"inductor": [], "graphopt": []}
    losses = {}
    for _ in range(args.repeats):
        for name in ("inductor", "graphopt"):
            seconds, losses[name] = compile_once(name, model, tokens, targets)
            times[name].append(seconds)
            model.zero_grad(set_to_none=True)
    medians = {k: statistics.median(v) for k, v in times.items()}
    ratio = medians["graphopt"] / medians["inductor"]
    same = torch.equal(losses["graphopt"], losses["inductor"])
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "python": platform.python_version(),
        "model": f"reference Llama tiny, {args.layers} layers, dim 128, B=2 S=128, forward+backward",
        "compile_seconds": times,
        "summary": {"compile_time_ratio": round(ratio, 3), "target_ratio_max": 1.10,
                    "loss_bitwise_equal": same},
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "compile_overhead.json"), "w") as handle:
        json.dump(result, handle, indent=1)
    table = ["| backend | cold compile, median of %d (s) | runs (s) |" % args.repeats, "| --- | --- | --- |"]
    for name in times:
        table.append(f"| {name} | {medians[name]:.2f} | {', '.join(f'{t:.2f}' for t in times[name])} |")
    md = (f"# Compile time: graphopt (every pass off) vs Inductor\n\nDevice: {result['device']}, "
          f"torch {torch.__version__}. {result['model']}.\n\n" + "\n".join(table) +
          f"\n\nRatio graphopt / Inductor: **{ratio:.3f}** (target <= 1.10). "
          f"Loss bitwise equal: {same}.\n")
    with open(os.path.join(args.out, "compile_overhead.md"), "w") as handle:
        handle.write(md)
    print(md)


if __name__ == "__main__":
    main()
