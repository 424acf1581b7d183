"""The layout planner against measured single-GPU layouts: predicted vs measured step time, peak, MFU.

Four groups, each a model and a sequence length with a fixed global batch, on one GPU:

  hf-8k    transformers' LlamaForCausalLM, Llama-2-7B dimensions, 4 layers, 8K tokens, 4 sequences per step
  hf-32k   the same with 2 layers at 32K, 2 sequences per step (its eager loss holds fp32 logits of
           every token)
  ref-8k   graphopt's reference Llama at Llama-3-8B dimensions, 4 layers, chunked output loss, 4 sequences
  ref-32k  the same at 32K, 2 sequences

Every group measures the product micro-batch x memory plan (graphopt's min-cut plan; remat budget
0.5) under Inductor, plus eager-codegen configurations (and one with activation offload), gradient
accumulation making up the global batch. Each configuration runs as ``graphopt.parallelize`` applies
a plan (blocks compiled by graphopt, the rest eager), with fused AdamW (bf16 state) and
``zero_grad(set_to_none=True)``: the user's loop. Layouts the planner predicts do not fit are run
too; running out of memory is their result.

The device profile is measured first, as a user would: ``python -m graphopt calibrate``, in the same
run; every prediction uses it. The planner then chooses a layout per group from the same search
space (which the measured grid covers); the summary compares:

  chosen_vs_best_measured  measured step of the planner's choice / best measured step in its group (max over groups)
  median_abs_time_error    |predicted - measured| / measured step time, median over every measured configuration
  rank_correlation         Spearman of predicted vs measured step time over every measured configuration
  mfu_chosen               measured MFU of the planner's choice (median over groups; per group beside it)

MFU: model FLOPs (3x the forward's GEMM and causal-attention FLOPs, recomputation not counted) per
second over the device's data-sheet dense BF16 peak (H100 / H200: 989.4 TFLOP/s).

    python3 bench/plan_sweep.py --out $OUT                          # one H100: plan, measure, compare
    python3 bench/plan_sweep.py --out $OUT --measure-only           # GPU: calibrate + measure, ~4 minutes
    python3 bench/plan_sweep.py --out DIR --predict-only            # anywhere: add the predictions to DIR
    python3 bench/plan_sweep.py --out DIR --predict-only --merge OTHER/plan_sweep.json   # join two runs
    python3 bench/plan_sweep.py --out $OUT --only hf-8k,ref-8k      # a subset
    python3 bench/plan_sweep.py --out $OUT --only hf-32k --resume   # add to the results in --out
    python3 bench/plan_sweep.py --out /tmp/sweep --dry-run          # CPU: predictions and GPU time estimate
    python3 bench/plan_sweep.py --out /tmp/sweep --smoke            # CPU: tiny models, every code path

Planning the four groups takes about a minute of CPU (tracing, remat plans); --measure-only keeps it
off the GPU machine, and --predict-only then uses the profile the measuring run calibrated.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, not installed

from graphopt.planning import World, plan, trace_model  # noqa: E402
from graphopt.planning.world import resolve_profile  # noqa: E402
from graphopt.planning.layouts import MIN_CUT, Layout, MemoryPlan, SearchSpace  # noqa: E402
from graphopt.planning.predict import Predictor  # noqa: E402

TARGETS = {"chosen_vs_best_measured": 1.05, "median_abs_time_error": 0.10, "rank_correlation": 0.9}
# Published dimensions of the checkpoints (their config.json); "tiny" for --smoke.
DIMS = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, rope_theta=10000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=256, rope_theta=10000.0),
}
LOSS_CHUNK_TOKENS = 1024
# for --dry-run's estimate of the GPU time only: seconds per compile of one block graph
COMPILE_ESTIMATE_S = {"inductor": 12.0, "eager": 3.0}


@dataclasses.dataclass(frozen=True)
class Group:
    name: str
    model: str                  # "hf" or "ref"
    dims: str                   # a key of DIMS
    seq: int
    layers: int
    sequences: int              # per optimizer step
    configs: tuple[tuple[int, MemoryPlan, str], ...]   # (micro-batch, memory plan, codegen) run

    def grid(self) -> list[Layout]:
        return [Layout(1, 1, 1, mb, self.sequences // mb, memory, codegen)
                for mb, memory, codegen in self.configs]

    def space(self) -> SearchSpace:
        """What the planner chooses from: every micro-batch run, graphopt's min-cut plan or remat
        budget 0.5, Inductor (its choice is run whether or not the grid holds it)."""
        return SearchSpace(tp_degrees=(1,), sp_degrees=(1,),
                           micro_batches=tuple(sorted({mb for mb, _, _ in self.configs})),
                           memory_plans=(MIN_CUT, REMAT), codegens=("inductor",))


REMAT = MemoryPlan(0.5)
OFFLOAD = MemoryPlan(None, True)
# Layers: 4 at 8K, 2 at 32K keep the whole sweep near 4 GPU-minutes (one Inductor compile per
# micro-batch and memory plan); the micro-batches the planner says do not fit are run as the check.
# transformers' model at Llama-2-7B dimensions (its eager loss holds fp32 logits of every token:
# at Llama-3's vocabulary and 32K tokens those alone would not fit), the reference at Llama-3-8B's.
GROUPS = (
    Group("hf-8k", "hf", "llama2-7b", 8192, 4, 4, (
        (1, MIN_CUT, "inductor"), (2, MIN_CUT, "inductor"), (4, MIN_CUT, "inductor"),
        (1, REMAT, "inductor"), (2, REMAT, "inductor"), (1, MIN_CUT, "eager"), (1, OFFLOAD, "eager"))),
    Group("hf-32k", "hf", "llama2-7b", 32768, 2, 2, (
        (1, MIN_CUT, "inductor"), (2, MIN_CUT, "inductor"), (1, REMAT, "inductor"), (1, MIN_CUT, "eager"))),
    Group("ref-8k", "ref", "llama3-8b", 8192, 4, 4, (
        (1, MIN_CUT, "inductor"), (2, MIN_CUT, "inductor"), (1, REMAT, "inductor"), (1, MIN_CUT, "eager"))),
    Group("ref-32k", "ref", "llama3-8b", 32768, 2, 2, (
        (1, MIN_CUT, "inductor"), (2, MIN_CUT, "inductor"), (1, REMAT, "inductor"), (1, MIN_CUT, "eager"))),
)
SMOKE_GROUPS = (
    Group("hf-8k", "hf", "tiny", 256, 2, 4, (
        (1, MIN_CUT, "eager"), (2, REMAT, "eager"), (1, OFFLOAD, "eager"))),
    Group("ref-8k", "ref", "tiny", 256, 2, 2, ((1, MIN_CUT, "eager"), (2, MIN_CUT, "eager"))),
)


# --- models and their training step -------------------------------------------------------------

def build_model(group: Group, device: str) -> torch.nn.Module:
    dims = DIMS[group.dims]
    with torch.device(device):
        if group.model == "hf":
            import transformers
            config = transformers.LlamaConfig(num_hidden_layers=group.layers,
                                              max_position_embeddings=group.seq, **dims)
            config._attn_implementation = "sdpa"
            model = transformers.LlamaForCausalLM(config)
        else:
            from graphopt.models.llama import Llama, LlamaConfig
            model = Llama(LlamaConfig(dim=dims["hidden_size"], n_layers=group.layers,
                                      n_heads=dims["num_attention_heads"],
                                      n_kv_heads=dims["num_key_value_heads"],
                                      ffn_dim=dims["intermediate_size"], vocab_size=dims["vocab_size"],
                                      max_seq_len=group.seq, rope_theta=dims["rope_theta"]))
    return model.to(torch.bfloat16)


def loss_for(group: Group) -> Callable:
    """The loss the loop computes, as the planner traces it: HF's own (its output object, and so
    the logits, alive through the backward); the reference Llama's chunked output loss."""
    if group.model == "hf":
        from graphopt.planning.model_facts import hf_causal_lm_loss
        return hf_causal_lm_loss

    def chunked(model, tokens, labels=None, positions=None):
        chunks = max(1, tokens.numel() // LOSS_CHUNK_TOKENS)
        return model.loss(tokens, tokens if labels is None else labels, positions, chunks=chunks)
    return chunked


def train_step(par, optimizer, group: Group, tokens: torch.Tensor, labels: torch.Tensor) -> float:
    layout = par.layout
    losses = []  # read after the step: a read per micro-batch would stall the GPU between them
    for mb in par.micro_batches(tokens, labels):
        if group.model == "hf":
            out = par.model(input_ids=mb.tokens, position_ids=mb.position_ids, labels=mb.labels,
                            use_cache=False)
            (out.loss / layout.grad_accum).backward()
            losses.append(out.loss.detach())
            del out
        else:
            loss = loss_for(group)(par.model, mb.tokens, mb.labels, mb.position_ids)
            (loss / layout.grad_accum).backward()
            losses.append(loss.detach())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(sum(losses)) / layout.grad_accum


def measure(group: Group, layout: Layout, device: str, repeats: int, distributed: bool = False) -> dict:
    """One layout's compile step, warm-up and ``repeats`` timed steps. ``distributed`` (every rank
    of a process group calls it): each step's time and the peaks are the maximum over the ranks,
    and running out of memory is raised, not recorded -- the other ranks wait in a collective for
    this one, so only ending the processes (torchrun does, when one fails) frees them."""
    vocab = DIMS[group.dims]["vocab_size"]
    from graphopt.planning.parallelize import parallelize

    torch._dynamo.reset()
    gc.collect()
    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    generator = torch.Generator().manual_seed(group.seq)
    shape = (group.sequences, group.seq)
    tokens = torch.randint(0, vocab, shape, generator=generator).to(device)
    labels = torch.randint(0, vocab, shape, generator=generator).to(device)
    row: dict[str, Any] = {}
    model = par = optimizer = None
    try:
        model = build_model(group, device)
        par = parallelize(model, layout, **({"codegen": "eager"} if not cuda else {}))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)

        def sync():
            if cuda:
                torch.cuda.synchronize()

        start = time.perf_counter()
        train_step(par, optimizer, group, tokens, labels)   # compiles
        sync()
        row["compile_step_s"] = time.perf_counter() - start
        train_step(par, optimizer, group, tokens, labels)   # warm-up
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times, losses = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            losses.append(train_step(par, optimizer, group, tokens, labels))
            sync()
            times.append(time.perf_counter() - start)
        peaks = [torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()] if cuda else []
        if distributed:
            times, peaks = max_over_ranks(times), [int(v) for v in max_over_ranks(peaks)]
        row.update(step_s=statistics.median(times), step_s_all=times, loss=losses[-1],
                   peak_bytes=peaks[0] if cuda else None, peak_reserved_bytes=peaks[1] if cuda else None)
    except torch.OutOfMemoryError as error:
        if distributed:
            raise
        row.update(oom=True, error=str(error).splitlines()[0][:200])
    finally:
        del model, par, optimizer
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return row


def max_over_ranks(values: list[float]) -> list[float]:
    """Element-wise maximum over the process group's ranks."""
    import torch.distributed as dist
    if not values:
        return values
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


# --- the run ------------------------------------------------------------------------------------

def device_profile(args, out: pathlib.Path) -> str:
    """The profile the predictions use: --profile, the one a resumed run measured, H100's data sheet
    for a dry run without a GPU, or a fresh ``python -m graphopt calibrate`` (as a user would run it)."""
    if args.profile:
        return args.profile
    if args.dry_run and not torch.cuda.is_available():
        return "h100"  # a GPU-time estimate from this machine's CPU profile would mean nothing
    path = out / "plan_sweep_device_profile.json"
    out.mkdir(parents=True, exist_ok=True)
    if args.resume and path.exists():
        return str(path)
    command = [sys.executable, "-m", "graphopt", "calibrate", "--out", str(path)]
    if args.smoke or args.dry_run:
        command.append("--quick")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=ROOT)
    print(f"calibrated in {time.perf_counter() - started:.1f} s: {path}", flush=True)
    return str(path)


def plan_group(group: Group, profile_path: str, memory: int, gpus: int = 1):
    """(the planner's report for the group's search space, its predictor) on one node of ``gpus``
    GPUs of ``memory`` bytes."""
    meta = build_model(group, "meta")
    facts = trace_model(meta, loss_fn=loss_for(group))
    world = World(gpus_per_node=gpus, nodes=1, memory_per_gpu=memory, profile=resolve_profile(profile_path))
    tokens = group.sequences * group.seq
    report = plan(facts, world, seq_len=group.seq, global_batch_tokens=tokens, space=group.space(),
                  require_fit=False)
    return report, Predictor(facts, world, group.seq, tokens, report.training)


def add_prediction(row: dict, predictor: Predictor, layout: Layout, chosen: Layout | None):
    """The planner's prediction of ``layout`` into its row, with what its measured MFU needs."""
    prediction = predictor.predict(layout)
    row.update(chosen=layout == chosen, predicted_step_s=prediction.step_s,
               predicted_parts_s=prediction.parts_s, predicted_peak_bytes=prediction.peak_bytes,
               predicted_fits=prediction.fits, predicted_memory_bytes=prediction.memory_bytes,
               predicted_mfu=prediction.mfu, predicted_tokens_per_s_per_gpu=prediction.tokens_per_s_per_gpu,
               model_flops_per_step=predictor.model_flops_per_step(),
               peak_flops_per_gpu=predictor.world.peak_flops())
    add_rates(row, predictor.global_batch_tokens)
    return prediction


def add_rates(row: dict, tokens_per_step: int) -> None:
    """Measured tokens/s per GPU and MFU (model FLOPs per second per GPU over the data-sheet peak,
    as the prediction's) of a measured row."""
    if not row.get("step_s"):
        return
    gpus = Layout.from_json(row["layout"]).world_size
    row["tokens_per_s_per_gpu"] = tokens_per_step / (row["step_s"] * gpus)
    if row.get("model_flops_per_step"):
        row["mfu"] = row["model_flops_per_step"] / (row["step_s"] * gpus * row["peak_flops_per_gpu"])


def spearman(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3:
        return None

    def ranks(values):
        order = sorted(range(len(values)), key=values.__getitem__)
        result = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                result[order[k]] = (i + j) / 2
            i = j + 1
        return result

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    norm = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / norm if norm else None


def summarize(rows: list[dict]) -> dict:
    measured = [r for r in rows if r.get("step_s") and "predicted_step_s" in r]
    errors = [abs(r["predicted_step_s"] - r["step_s"]) / r["step_s"] for r in measured]
    by_group: dict[str, dict] = {}
    for name in sorted({r["group"] for r in rows}):
        mine = [r for r in measured if r["group"] == name]
        chosen = [r for r in mine if r.get("chosen")]
        entry: dict[str, Any] = {"measured": len(mine),
                                 "rank_correlation": spearman([r["predicted_step_s"] for r in mine],
                                                              [r["step_s"] for r in mine])}
        if chosen and mine:
            best = min(mine, key=lambda r: r["step_s"])
            entry.update(chosen=chosen[0]["layout_name"], best_measured=best["layout_name"],
                         chosen_vs_best_measured=chosen[0]["step_s"] / best["step_s"],
                         mfu_chosen=chosen[0]["mfu"])
        by_group[name] = entry
    ratios = [g["chosen_vs_best_measured"] for g in by_group.values() if "chosen_vs_best_measured" in g]
    mfus = [g["mfu_chosen"] for g in by_group.values() if "mfu_chosen" in g]
    fit_rows = [r for r in rows if ("oom" in r or r.get("peak_bytes")) and "predicted_fits" in r]
    agree = sum(1 for r in fit_rows if r["predicted_fits"] == (not r.get("oom")))
    peak_ratio = [r["peak_bytes"] / r["predicted_peak_bytes"] for r in measured if r.get("peak_bytes")]
    summary = {
        "chosen_vs_best_measured": max(ratios) if ratios else None,
        "median_abs_time_error": statistics.median(errors) if errors else None,
        "rank_correlation": spearman([r["predicted_step_s"] for r in measured],
                                     [r["step_s"] for r in measured]),
        "mfu_chosen": statistics.median(mfus) if mfus else None,
        "by_group": by_group,
        "configurations_measured": len(measured),
        "configurations_out_of_memory": sum(1 for r in rows if r.get("oom")),
        "fit_prediction_agrees": f"{agree} of {len(fit_rows)}",
        "measured_over_predicted_peak": [min(peak_ratio), max(peak_ratio)] if peak_ratio else None,
        "max_abs_time_error": max(errors) if errors else None,
        "targets": TARGETS,
    }
    summary["targets_met"] = {
        "chosen_vs_best_measured": summary["chosen_vs_best_measured"] is not None
        and summary["chosen_vs_best_measured"] <= TARGETS["chosen_vs_best_measured"],
        "median_abs_time_error": summary["median_abs_time_error"] is not None
        and summary["median_abs_time_error"] <= TARGETS["median_abs_time_error"],
        "rank_correlation": summary["rank_correlation"] is not None
        and summary["rank_correlation"] >= TARGETS["rank_correlation"]}
    return summary


def markdown(result: dict) -> str:
    s = result["summary"]

    def fmt(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    title = result.get("title", "Layout planner vs measured single-GPU layouts")
    lines = [f"# {title} ({result['device']})", "",
             f"torch {result['torch']}, triton {result['triton']}, transformers {result['transformers']}; "
             f"{result['timing']}; device profile {result.get('profile_source', 'measured in the run')}: {result['profile_summary']}", "",
             f"- chosen_vs_best_measured: {fmt(s['chosen_vs_best_measured'])} (target <= 1.05)",
             f"- median_abs_time_error: {fmt(s['median_abs_time_error'])} (target <= 0.10; max "
             f"{fmt(s['max_abs_time_error'])})",
             f"- rank_correlation: {fmt(s['rank_correlation'])} (target >= 0.9)",
             f"- mfu_chosen: {fmt(s['mfu_chosen'])} (median over groups)",
             f"- memory filter: predicted fit agrees with the run in {s['fit_prediction_agrees']} "
             f"configurations; measured / predicted peak {s['measured_over_predicted_peak']}", "",
             "| group | chosen by | per group: chosen vs best, Spearman, MFU chosen |", "| --- | --- | --- |"]
    for name, g in s["by_group"].items():
        lines.append(f"| {name} | {g.get('chosen', '-')} (best measured: {g.get('best_measured', '-')}) | "
                     f"{fmt(g.get('chosen_vs_best_measured'))}, {fmt(g.get('rank_correlation'))}, "
                     f"{fmt(g.get('mfu_chosen'))} |")
    lines += ["", "| group | layout | chosen | predicted ms | measured ms | error | predicted GiB | "
              "measured GiB | predicted MFU | measured MFU | tokens/s/GPU | compile+first step s |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        measured = ("out of memory" if r.get("oom") else "failed" if r.get("error")
                    else fmt(r.get("step_s") and r["step_s"] * 1e3, 1))
        predicted = r.get("predicted_step_s")
        error = (f"{(predicted / r['step_s'] - 1) * 100:+.1f} %" if r.get("step_s") and predicted else "-")
        peak = ("-" if predicted is None else f"{r['predicted_peak_bytes'] / 2**30:.1f}"
                + ("" if r["predicted_fits"] else " (no fit)"))
        lines.append(
            f"| {r['group']} | {r['layout_name']} | {'yes' if r.get('chosen') else ''} | "
            f"{fmt(predicted and predicted * 1e3, 1)} | {measured} | {error} | {peak} | "
            f"{fmt(r.get('peak_bytes') and r['peak_bytes'] / 2**30, 1)} | {fmt(r.get('predicted_mfu'))} | "
            f"{fmt(r.get('mfu'))} | {fmt(r.get('tokens_per_s_per_gpu'), 0)} | {fmt(r.get('compile_step_s'), 1)} |")
    lines += ["", *[f"- {note}" for note in result.get("notes", [])]]
    return "\n".join(lines) + "\n"


def write(out: pathlib.Path, result: dict, stem: str = "plan_sweep",
          summary_of: Callable[[dict], dict] = lambda result: summarize(result["rows"]),
          render: Callable[[dict], str] = markdown) -> None:
    """``stem``.json and .md in ``out``, replacing the previous pair whole."""
    result["summary"] = summary_of(result)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in ((f"{stem}.json", json.dumps(result, indent=1, default=str)),
                       (f"{stem}.md", render(result))):
        path = out / name
        path.with_suffix(".tmp").write_text(text)
        os.replace(path.with_suffix(".tmp"), path)  # a run killed mid-write keeps the last file


def select_groups(groups: tuple, only: str | None) -> tuple:
    """The groups ``--only`` names (all when it is not given)."""
    if not only:
        return groups
    wanted = [name.strip() for name in only.split(",")]
    unknown = set(wanted) - {g.name for g in groups}
    if unknown:
        raise SystemExit(f"--only {sorted(unknown)}: no such group; choose from {[g.name for g in groups]}")
    return tuple(g for g in groups if g.name in wanted)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--only", help=f"comma-separated groups of {[g.name for g in GROUPS]}")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in --out/plan_sweep.json and measure the rest")
    parser.add_argument("--profile", help="a device profile (JSON, or h100 / h200) to plan with instead of "
                                          "calibrating")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--time-limit", type=float, default=540.0,
                        help="seconds: no configuration starts past it (results so far are kept)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--measure-only", action="store_true",
                      help="GPU: calibrate and measure every configuration of the grid, plan nothing "
                           "(the planner's choice is in the grid; --predict-only adds the predictions)")
    mode.add_argument("--predict-only", action="store_true",
                      help="plan and predict the rows in --out/plan_sweep.json with the profile measured "
                           "with them (on any machine: the planner is pure modelling)")
    mode.add_argument("--dry-run", action="store_true", help="plan and predict only, with a GPU-time estimate")
    parser.add_argument("--merge", nargs="*", default=(),
                        help="plan_sweep.json files of other runs (other groups) whose rows join --out's")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU, eager codegen")
    args = parser.parse_args(argv)
    started = time.monotonic()
    out = pathlib.Path(args.out)
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    groups = select_groups(SMOKE_GROUPS if args.smoke else GROUPS, args.only)
    resume = args.resume or args.predict_only
    if args.predict_only and not (out / "plan_sweep.json").exists():
        raise SystemExit(f"--predict-only needs the measured rows: {out / 'plan_sweep.json'} does not exist")
    previous = json.loads((out / "plan_sweep.json").read_text()) if resume and \
        (out / "plan_sweep.json").exists() else {"rows": []}
    for path in args.merge:
        other = json.loads(pathlib.Path(path).read_text())
        if previous["rows"] and other.get("device") != previous.get("device"):
            raise SystemExit(f"--merge {path}: measured on {other.get('device')}, the rows in --out on "
                             f"{previous.get('device')}; a sweep's rows come from one card")
        previous.setdefault("device", other.get("device"))
        known = {(r["group"], r["layout_name"]) for r in previous["rows"]}
        previous["rows"] += [r for r in other["rows"] if (r["group"], r["layout_name"]) not in known]
    if args.predict_only:
        result = previous
        profile_path = args.profile or str(out / "plan_sweep_device_profile.json")
        memory = result["device_memory_bytes"]
    else:
        previous = same_machine_rows(previous, torch.cuda.get_device_name() if device == "cuda" else "cpu")
        profile_path = device_profile(args, out)
        memory = torch.cuda.get_device_properties(0).total_memory if device == "cuda" else 80 * 10**9
        result = header(args, device, profile_path, memory, previous)
    predicting = not args.measure_only
    done = {(r["group"], r["layout_name"]) for r in result["rows"] if r.get("step_s") or r.get("oom")}
    estimate = 0.0
    for group in groups:
        chosen, predictor = None, None
        if predicting:
            report, predictor = plan_group(group, profile_path, memory)
            chosen = report.chosen.layout if report.chosen else None
            print(f"{group.name}: planner chose {chosen.describe() if chosen else 'nothing that fits'}",
                  flush=True)
        layouts = group.grid() + ([chosen] if chosen and chosen not in group.grid() else [])
        for layout in layouts:
            row = next((r for r in result["rows"] if (r["group"], r["layout_name"]) ==
                        (group.name, layout.describe())), None)
            if row is None:
                row = {"group": group.name, "layout_name": layout.describe(), "layout": layout.to_json()}
                result["rows"].append(row)
            if predictor is not None:
                prediction = add_prediction(row, predictor, layout, chosen)
                estimate += COMPILE_ESTIMATE_S[layout.codegen] * (
                    group.layers if layout.memory.offload else 1) + (2 + args.repeats) * prediction.step_s
            if not (args.dry_run or args.predict_only or (group.name, layout.describe()) in done):
                if time.monotonic() - started > args.time_limit:
                    result["notes"].append(f"{group.name} {layout.describe()}: not run, past --time-limit")
                else:
                    row.update(measure(group, layout, device, args.repeats))
            add_rates(row, group.sequences * group.seq)
            if predicting and chosen is not None and layout == chosen and not (row.get("step_s") or row.get("oom")):
                result["notes"].append(f"{group.name}: the planner's choice {layout.describe()} has not "
                                       "been measured; run the group again with --resume")
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                   if k in ("group", "layout_name", "predicted_step_s", "step_s", "peak_bytes", "oom",
                            "compile_step_s")}, flush=True)
            write(out, result)
    if args.dry_run:
        result["notes"].append(f"dry run: about {estimate:.0f} s of GPU time for these groups "
                               f"(compiles estimated at {COMPILE_ESTIMATE_S} s each)")
    if predicting:
        # the profile's file name, or a named default: no path of the machine that planned
        result["predicted_with"] = {"torch": torch.__version__,
                                    "profile": pathlib.Path(str(profile_path)).name}
    write(out, result)
    print(markdown(result))
    print(f"wall {time.monotonic() - started:.0f} s")
    return 0


def same_machine_rows(previous: dict, device_name: str) -> dict:
    """``previous`` (rows kept by --resume or --merge) if it was measured on ``device_name``, else
    without its rows and with a note: rows of another card would share this run's header."""
    if not previous["rows"] or previous.get("device", device_name) == device_name:
        return previous
    note = (f"{len(previous['rows'])} earlier rows not kept: measured on {previous['device']}, "
            f"this run is on {device_name}")
    print(note, flush=True)
    return {"rows": [], "notes": [note]}


def header(args, device: str, profile_path: str, memory: int, previous: dict) -> dict:
    """What the measuring machine was: device, versions, the profile it measured."""
    import transformers
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    profile = resolve_profile(profile_path)
    return {
        "name": "plan_sweep", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "device_memory_bytes": memory,
        "torch": torch.__version__, "triton": triton_version, "transformers": transformers.__version__,
        "codegen": "per row (blocks compiled by graphopt, the rest eager)",
        "timing": f"step: median of {args.repeats} steps after a compile step and a warm-up step",
        "device_profile": profile.to_json(),
        "profile_source": (f"given (--profile {args.profile})" if args.profile else
                           "measured in the run (`python -m graphopt calibrate`)"),
        "profile_summary": (f"GEMM {profile.matmul_tflops:.0f} TFLOP/s ({profile.sustained_matmul_tflops or 0:.0f} "
                            f"sustained), attention {profile.attention_tflops or 0:.0f} TFLOP/s, HBM "
                            f"{profile.hbm_gbps:.0f} GB/s"),
        "model": {"dims": {name: DIMS[name] for name in DIMS}, "groups": [dataclasses.asdict(g) for g in GROUPS]},
        "rows": previous["rows"],
        "notes": previous.get("notes", []),
    }


if __name__ == "__main__":
    sys.exit(main())
