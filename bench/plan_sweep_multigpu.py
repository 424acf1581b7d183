"""The layout planner against measured layouts on 4 and 8 GPUs, and against torchtitan's stock
Llama-3-8B training: transformers' LlamaForCausalLM at Llama-3-8B layer dimensions.

Groups (a world size, a sequence length and a global batch, tokens per GPU alike across worlds):

  hf-8k-w4 / hf-8k-w8     S = 8K,   4 layers, 2 sequences per GPU per step
  hf-32k-w4 / hf-32k-w8   S = 32K,  2 layers, 1 sequence per GPU
  hf-128k-w8              S = 128K, 1 layer,  2 sequences (sequence or tensor parallelism of 4+ needed)

Layers are few so that a group (one Inductor compile per layout) takes minutes; --layers raises
them, up to 32 where memory holds them. Every group measures at least 12 layouts: micro-batch 1
with the min-cut memory plan at every tensor x sequence-parallel degree the world divides into,
remat budget 0.5 at (tp, sp) = (1, 1), (2, 1), (1, 2), (2, 2), micro-batch 2 at (1, 1) and (1, 2),
FSDP2 without resharding after forward at (1, 1) -- each where the batch and sequence divide --
and the planner's choice from the same search space (all degrees, micro-batch 1-2, min-cut or
remat 0.5, resharding or not). Each is applied by ``graphopt.parallelize`` as a user would (mesh,
DTensor TP, FSDP2, sequence sharding, blocks compiled by graphopt with Inductor), trained with
fused AdamW and HF's own loss (bench/plan_sweep.py's loop), step time and peak the maximum over
ranks. torchtitan's stock variants run at the same S and global batch (bench/torchtitan_llama.py).

Planning is pure modelling and runs in this driver process on the CPU, never in the GPU ranks. The
measured layouts run in ``torchrun`` workers, one launch per group: a layout that fails on any rank
(running out of memory included) ends that launch, is recorded, and a new launch goes on with the
rest. Results are written after every layout: plan_sweep_multigpu.{json,md} in --out; ``summary``:

  chosen_vs_best_measured  measured step of the planner's choice / best measured step (max over groups)
  median_abs_time_error    |predicted - measured| / measured step, median over measured layouts
  rank_correlation         Spearman of predicted vs measured step over measured layouts
  mfu_chosen               measured MFU of the planner's choice (median over groups)
  speedup_vs_torchtitan    tokens/s/GPU of the planner's choice / torchtitan's fastest variant (min
                           over groups; per group with both peaks, reserved bytes as torchtitan logs)
  world_sizes              the world sizes measured

Sessions (from the repo root; torchtitan's wheels as bench/torchtitan_llama.py says, in .whl):

    # here, on a CPU: plan with H100's profile, write the rows (the choices included) to measure
    python3 bench/plan_sweep_multigpu.py --dry-run --worlds 4,8 --out bench/results
    # GPU machine of 8 (or 4) H100s: calibrate, measure every row and the torchtitan variants
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    python3 bench/plan_sweep_multigpu.py --measure-only --resume --worlds 4,8 --out bench/results --time-limit 1500
    # here again: predictions with the profile calibrated there
    python3 bench/plan_sweep_multigpu.py --predict-only --out bench/results
    # CPU smoke: 2 gloo ranks, tiny model, eager codegen, every code path but torchtitan
    python3 bench/plan_sweep_multigpu.py --smoke --profile h100 --out /tmp/sweep
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from datetime import timedelta
from typing import Any, Optional

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]  # run from a checkout; the sibling benches

import plan_sweep as single  # noqa: E402
import torchtitan_llama as titan  # noqa: E402
from graphopt.planning.layouts import MIN_CUT, Layout, MemoryPlan, SearchSpace  # noqa: E402

STEM = "plan_sweep_multigpu"
TARGETS = {**single.TARGETS, "speedup_vs_torchtitan": 1.15}
IN_PROGRESS = "plan_sweep_multigpu.in_progress.json"   # the layout a worker launch is measuring
ERRORS = "plan_sweep_multigpu.errors"                   # each failing rank's error, per launch
LAUNCH_OVERHEAD_S = 40.0   # --dry-run estimate: torchrun, NCCL and CUDA start per launch
TITAN_VARIANT_OVERHEAD_S = 90.0   # --dry-run estimate: a torchtitan variant's start and compile


@dataclasses.dataclass(frozen=True)
class Group:
    """A world size, sequence length and global batch; the fields plan_sweep's model code reads."""

    name: str
    world: int
    seq: int
    layers: int
    sequences: int              # per optimizer step, over the world
    dims: str = "llama3-8b"
    model: str = "hf"
    min_tokens_per_sp_rank: int = 1024

    def grid(self) -> list[Layout]:
        """The measured layouts (see the module doc), where the batch and sequence divide."""
        layouts = []
        for tp in (1, 2, 4, 8):
            for sp in (1, 2, 4, 8):
                specs = [(1, MIN_CUT, True)]
                if (tp, sp) in ((1, 1), (2, 1), (1, 2), (2, 2)):
                    specs.append((1, single.REMAT, True))
                if (tp, sp) in ((1, 1), (1, 2)):
                    specs.append((2, MIN_CUT, True))
                if (tp, sp) == (1, 1):
                    specs.append((1, MIN_CUT, False))
                for micro, memory, reshard in specs:
                    layout = self._layout(tp, sp, micro, memory, reshard)
                    if layout is not None:
                        layouts.append(layout)
        return layouts

    def _layout(self, tp: int, sp: int, micro: int, memory: MemoryPlan, reshard: bool) -> Optional[Layout]:
        if self.world % (tp * sp) or self.seq // sp < self.min_tokens_per_sp_rank:
            return None
        dp = self.world // (tp * sp)
        if self.sequences % dp or (self.sequences // dp) % micro or (dp * sp == 1 and not reshard):
            return None
        return Layout(dp, tp, sp, micro, self.sequences // dp // micro, memory, "inductor", reshard)

    def space(self) -> SearchSpace:
        return SearchSpace(micro_batches=(1, 2), memory_plans=(MIN_CUT, single.REMAT), codegens=("inductor",),
                           min_tokens_per_sp_rank=self.min_tokens_per_sp_rank)


GROUPS = (
    Group("hf-8k-w4", 4, 8192, 4, 8), Group("hf-32k-w4", 4, 32768, 2, 4),
    Group("hf-8k-w8", 8, 8192, 4, 16), Group("hf-32k-w8", 8, 32768, 2, 8),
    Group("hf-128k-w8", 8, 131072, 1, 2),
)
SMOKE_GROUPS = (Group("tiny-w2", 2, 256, 1, 2, dims="tiny", min_tokens_per_sp_rank=64),)


# --- the worker: one torchrun launch measures a group's pending rows ---------------------------

def pending(result: dict, group: Group) -> list[dict]:
    return [r for r in result["rows"] if r["group"] == group.name
            and not (r.get("step_s") or r.get("oom") or r.get("error"))]


def worker(args, group: Group) -> None:
    import torch.distributed as dist

    rank, cuda = int(os.environ["RANK"]), torch.cuda.is_available() and not args.smoke
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=args.collective_timeout))
    out = pathlib.Path(args.out)
    result = json.loads((out / f"{STEM}.json").read_text())
    try:
        for row in pending(result, group):
            go = [time.time() < args.deadline]
            dist.broadcast_object_list(go, src=0)   # every rank stops at the same row
            if not go[0]:
                break
            if rank == 0:
                (out / IN_PROGRESS).write_text(json.dumps({"group": group.name, "layout_name": row["layout_name"]}))
            try:
                measured = single.measure(group, Layout.from_json(row["layout"]), "cuda" if cuda else "cpu",
                                          args.repeats, distributed=True)
            except BaseException as error:
                (out / ERRORS).mkdir(exist_ok=True)
                (out / ERRORS / f"rank{rank}.json").write_text(json.dumps(
                    {"oom": isinstance(error, torch.OutOfMemoryError), "error": f"rank {rank}: {error!r}"[:400]}))
                raise
            if rank == 0:
                row.update(measured, world_size=dist.get_world_size())
                single.add_rates(row, group.sequences * group.seq)
                write(out, result)
                print({k: row.get(k) for k in ("group", "layout_name", "predicted_step_s", "step_s",
                                               "peak_bytes")}, flush=True)
    finally:
        dist.destroy_process_group()


def launch(args, group: Group, out: pathlib.Path, deadline: float) -> int:
    """One torchrun launch of the workers for ``group``; its return code (None past the deadline)."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={group.world}",
            str(pathlib.Path(__file__).resolve()), "--worker", "--only", group.name, "--out", str(out),
            "--repeats", str(args.repeats), "--deadline", str(deadline)] + (["--smoke"] if args.smoke else []) \
        + (["--layers", str(args.layers)] if args.layers else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
           "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    process = subprocess.Popen(argv, env=env, cwd=ROOT, start_new_session=True)
    try:
        # a layout that started before the deadline may finish after it; a hung one is ended
        return process.wait(timeout=max(0.0, deadline - time.time()) + args.layout_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait()
        return -signal.SIGTERM


def measure_group(args, group: Group, out: pathlib.Path, deadline: float) -> None:
    """Launch workers until every row of ``group`` is measured or failed, or time is up."""
    path = out / f"{STEM}.json"
    while pending(json.loads(path.read_text()), group) and time.time() < deadline:
        for stale in (out / IN_PROGRESS, *(out / ERRORS).glob("rank*.json")):
            stale.unlink(missing_ok=True)
        rc = launch(args, group, out, deadline)
        result = json.loads(path.read_text())
        if rc == 0:
            continue
        marker = out / IN_PROGRESS
        if not marker.exists():
            result["notes"].append(f"{group.name}: a worker launch failed (rc {rc}) before its first layout")
            write(out, result)
            return
        failed = json.loads(marker.read_text())["layout_name"]
        errors = [json.loads(p.read_text()) for p in sorted((out / ERRORS).glob("rank*.json"))]
        row = next(r for r in result["rows"] if (r["group"], r["layout_name"]) == (group.name, failed))
        if any(e["oom"] for e in errors):
            row.update(oom=True, error=next(e["error"] for e in errors if e["oom"]))
        else:
            row["error"] = errors[0]["error"] if errors else f"the launch ended with rc {rc} (no rank said why)"
        write(out, result)


# --- the driver: plan, predict, launch, compare ------------------------------------------------

def summarize(result: dict) -> dict:
    rows = result["rows"]
    summary = single.summarize(rows)
    summary["targets"] = TARGETS
    speedups: dict[str, dict] = {}
    for name, entries in result.get("torchtitan", {}).items():
        chosen = next((r for r in rows if r["group"] == name and r.get("chosen") and r.get("step_s")), None)
        best = titan.fastest(entries)
        if chosen and best:
            peak = chosen.get("peak_reserved_bytes")
            speedups[name] = {
                "speedup": chosen["tokens_per_s_per_gpu"] / best["tokens_per_s_per_gpu"],
                "graphopt_tokens_per_s_per_gpu": chosen["tokens_per_s_per_gpu"],
                "torchtitan": best["variant"], "torchtitan_tokens_per_s_per_gpu": best["tokens_per_s_per_gpu"],
                "graphopt_peak_reserved_gib": peak and peak / 2**30,
                "torchtitan_peak_reserved_gib": best.get("peak_reserved_gib"),
                "at_equal_or_lower_peak": bool(peak and peak / 2**30 <= best["peak_reserved_gib"])}
    summary["speedup_vs_torchtitan"] = min((s["speedup"] for s in speedups.values()), default=None)
    summary["speedup_vs_torchtitan_by_group"] = speedups
    summary["world_sizes"] = sorted({r["world_size"] for r in rows if r.get("step_s")})
    summary["targets_met"]["speedup_vs_torchtitan"] = (summary["speedup_vs_torchtitan"] or 0) \
        >= TARGETS["speedup_vs_torchtitan"]
    return summary


def markdown(result: dict) -> str:
    s = result["summary"]
    lines = [single.markdown(result).rstrip("\n"), "", "## torchtitan (bench/torchtitan_llama.py)", "",
             f"- speedup_vs_torchtitan: {s['speedup_vs_torchtitan']} (target >= 1.15; worst group); "
             f"world_sizes: {s['world_sizes']}", "",
             "| group | variant | tokens/s/GPU | peak reserved GiB | torchtitan MFU | outcome |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, entries in result.get("torchtitan", {}).items():
        for e in entries:
            outcome = ("out of memory" if e.get("oom") else e.get("skipped") or
                       ("ok" if e.get("rc") == 0 else (e.get("error") or f"rc {e.get('rc')}").splitlines()[-1][:80]))
            lines.append(f"| {name} | {e['variant']} | {e.get('tokens_per_s_per_gpu', '-')} | "
                         f"{e.get('peak_reserved_gib', '-')} | {e.get('torchtitan_mfu', '-')} | {outcome} |")
    for name, g in s["speedup_vs_torchtitan_by_group"].items():
        lines.append(f"- {name}: graphopt {g['graphopt_tokens_per_s_per_gpu']:.0f} vs torchtitan "
                     f"({g['torchtitan']}) {g['torchtitan_tokens_per_s_per_gpu']:.0f} tokens/s/GPU = "
                     f"{g['speedup']:.3f}x; peak {g['graphopt_peak_reserved_gib']} vs "
                     f"{g['torchtitan_peak_reserved_gib']} GiB reserved")
    return "\n".join(lines) + "\n"


def write(out: pathlib.Path, result: dict) -> None:
    single.write(out, result, STEM, summarize, markdown)


def predict_group(group: Group, result: dict, profile_path: str, memory: int) -> float:
    """Plan ``group``, predict every grid row and the choice (added when new); the estimated GPU
    seconds of measuring them."""
    report, predictor = single.plan_group(group, profile_path, memory, gpus=group.world)
    chosen = report.chosen.layout if report.chosen else None
    print(f"{group.name}: planner chose {chosen.describe() if chosen else 'nothing that fits'}", flush=True)
    result["plans"][group.name] = {"chosen": chosen and chosen.describe(),
                                   "top": [p.layout.describe() for p in report.ranked[:5]]}
    layouts = group.grid() + ([chosen] if chosen and chosen not in group.grid() else [])
    estimate = LAUNCH_OVERHEAD_S
    for row in result["rows"]:
        if row["group"] == group.name:
            row["chosen"] = False   # a new profile may choose another layout
    for layout in layouts:
        row = next((r for r in result["rows"] if (r["group"], r["layout_name"]) == (group.name, layout.describe())), None)
        if row is None:
            row = {"group": group.name, "layout_name": layout.describe(), "layout": layout.to_json(),
                   "world_size": group.world}
            result["rows"].append(row)
        prediction = single.add_prediction(row, predictor, layout, chosen)
        estimate += single.COMPILE_ESTIMATE_S["inductor"] + 7 * prediction.step_s
    if chosen is not None:
        estimate += len(titan.stock_variants(group.world, group.seq, group.sequences)) * TITAN_VARIANT_OVERHEAD_S
    return estimate


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--worlds", default=None, help="world sizes to run, e.g. 4,8 (default: those the GPUs allow)")
    parser.add_argument("--only", help=f"comma-separated groups of {[g.name for g in GROUPS]}")
    parser.add_argument("--layers", type=int, help="blocks of every group instead of its own count")
    parser.add_argument("--resume", action="store_true", help="keep the rows in --out and measure the rest")
    parser.add_argument("--profile", help="a device profile (JSON, or h100 / h200) instead of calibrating")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per layout")
    parser.add_argument("--time-limit", type=float, default=1500.0,
                        help="seconds: no layout or torchtitan variant starts past it")
    parser.add_argument("--layout-timeout", type=float, default=600.0,
                        help="seconds a layout may run past --time-limit before its launch is ended")
    parser.add_argument("--collective-timeout", type=float, default=300.0, help="process-group timeout, seconds")
    parser.add_argument("--no-torchtitan", action="store_true", help="skip the torchtitan baseline")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--measure-only", action="store_true",
                      help="GPU: calibrate, measure the grid and the rows already in --out; plan nothing")
    mode.add_argument("--predict-only", action="store_true",
                      help="plan and predict the rows in --out with the profile measured with them")
    mode.add_argument("--dry-run", action="store_true", help="plan and predict only, with a GPU-time estimate")
    parser.add_argument("--smoke", action="store_true", help="CPU: 2 gloo ranks, tiny model, eager codegen")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    groups = single.select_groups(SMOKE_GROUPS if args.smoke else GROUPS, args.only)
    if args.layers:
        groups = tuple(dataclasses.replace(g, layers=args.layers) for g in groups)
    if args.worker:
        worker(args, groups[0])
        return 0
    cuda = torch.cuda.is_available() and not args.smoke
    if args.worlds:
        worlds = {int(w) for w in args.worlds.split(",")}
    else:
        worlds = {g.world for g in groups if args.smoke or args.dry_run or args.predict_only
                  or g.world <= torch.cuda.device_count()}
    if cuda and not (args.dry_run or args.predict_only) and max(worlds, default=0) > torch.cuda.device_count():
        raise SystemExit(f"--worlds {sorted(worlds)} needs {max(worlds)} GPUs; {torch.cuda.device_count()} visible")
    groups = tuple(g for g in groups if g.world in worlds)
    started = time.time()
    deadline = started + args.time_limit
    out = pathlib.Path(args.out)
    path = out / f"{STEM}.json"
    if args.predict_only and not path.exists():
        raise SystemExit(f"--predict-only needs the measured rows: {path} does not exist")
    previous = json.loads(path.read_text()) if (args.resume or args.predict_only) and path.exists() else {"rows": []}
    if args.predict_only:
        result = previous
        profile_path = args.profile or str(out / "plan_sweep_device_profile.json")
    else:
        profile_path = single.device_profile(args, out)
        memory = torch.cuda.get_device_properties(0).total_memory if cuda else 80 * 10**9
        result = {**single.header(args, "cuda" if cuda else "cpu", profile_path, memory, previous),
                  "name": STEM, "title": "Layout planner vs measured multi-GPU layouts",
                  "model": {"dims": single.DIMS, "groups": [dataclasses.asdict(g) for g in groups]},
                  "timing": f"step: median of {args.repeats} steps (each the slowest rank's) after a "
                            "compile step and a warm-up step; peaks: the largest rank's",
                  "torchtitan": previous.get("torchtitan", {})}
        if args.smoke:
            result["device"] = f"cpu, {groups[0].world} gloo ranks"
    result.setdefault("plans", {})
    memory = result["device_memory_bytes"]
    estimate = 0.0
    for group in groups:
        if not args.measure_only:
            estimate += predict_group(group, result, profile_path, memory)
        elif not any(r["group"] == group.name for r in result["rows"]):
            result["rows"] += [{"group": group.name, "layout_name": layout.describe(), "layout": layout.to_json(),
                                "world_size": group.world} for layout in group.grid()]
        write(out, result)
        if args.dry_run or args.predict_only:
            continue
        measure_group(args, group, out, deadline)
        result = json.loads(path.read_text())
        if not (args.smoke or args.no_torchtitan) and group.name not in result["torchtitan"]:
            entries = result["torchtitan"].setdefault(group.name, [])

            def keep(row, entries=entries):
                entries.append(row)
                write(out, result)
            titan.run_baseline(group.world, group.seq, group.layers, group.sequences,
                               out / "torchtitan" / group.name, deadline=deadline, on_row=keep)
    for row in result["rows"]:
        if row.get("chosen") and not (row.get("step_s") or row.get("oom") or row.get("error")):
            note = (f"{row['group']}: the planner's choice {row['layout_name']} has not been measured; "
                    "measure it with --measure-only --resume")
            if note not in result["notes"]:
                result["notes"].append(note)
    if args.dry_run:
        result["notes"].append(f"dry run: about {estimate:.0f} s of GPU time for {[g.name for g in groups]}")
    if not args.measure_only:
        result["predicted_with"] = {"torch": torch.__version__, "profile": profile_path}
    write(out, result)
    print(markdown(result))
    print(f"wall {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
