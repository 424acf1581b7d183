"""Sequence parallelism on transformers models: graphopt vs one GPU vs torch's context_parallel.

    torchrun --standalone --nproc-per-node=4 bench/sp_attention_hf.py --out $OUT
    torchrun --standalone --nproc-per-node=2 bench/sp_attention_hf.py --smoke --out DIR  # CPU, gloo

One training step (forward, cross entropy, backward; no gradient reduction, no optimizer) of a
transformers model at Llama-3-8B layer dimensions (``--layers`` layers, vocab 32000, random weights,
bf16, batch 1, ``use_cache=False``, sdpa attention) over S = P x S/P tokens, S/P in ``--seq-local``:

  causal     LlamaForCausalLM
  window     MistralForCausalLM, the same layers with ``sliding_window`` = ``--window`` (Llama's
             config has no sliding window; Mistral is Llama with one)
  documents  LlamaForCausalLM on packed documents of long-tailed lengths (Pareto), position ids
             restarting at every document (transformers builds the document mask from them)

Modes, in one run, each on the same weights and tokens:

  sequence_parallel  torch.compile(model, backend=graphopt.backend(sequence_parallel_attention=True))
                     on every rank's contiguous slice with its global position ids (shard_sequence),
                     as the README tells users; each rank's loss is its share of the global mean
  one_gpu            the same model compiled with graphopt on the whole sequence on one GPU (every
                     rank runs it on its own GPU, at once). Where it does not fit, the limit is
                     estimated from what does: P x (one-GPU step at S/P - L x attention(S/P))
                     + L x attention(S), attention timed alone (forward + backward, the case's
                     mask) -- the row says which
  context_parallel   torch's context_parallel on the same model (eager): the documented buffer
                     sharding of input ids, position ids and targets, head-tail load balancing,
                     ring rotation of K/V. It takes SDPA with is_causal only: for the causal case
                     the model runs through a transformers attention implementation registered
                     here whose mask is None (else transformers reads the head-tail reordered
                     position ids as packed documents and builds a mask); for sliding window and
                     documents the stock model's mask goes in, and what context_parallel answers
                     (a refusal, or a loss off the one-GPU loss) is recorded, never timed as a win

Per mode: step time (median over --iters, CUDA events, slowest rank), peak memory (max over ranks),
tokens/s/GPU, and the global loss against the one-GPU loss. Per row: efficiency = (one-GPU step /
P) / sequence-parallel step (1.0 is perfect scaling), speedup vs context_parallel. The JSON and
Markdown are rewritten after every row, so a run cut short keeps what it measured; ``--time-limit``
stops starting rows once that many seconds have passed. Runs at other world sizes into the same
--out are kept (same device), so P = 2, 4, 8 accumulate into one summary.

Targets (issue 29): efficiency >= 0.92 (causal) and >= 0.88 (documents) at S/P >= 16K; at least
as fast as context_parallel everywhere, >= 1.15x on packed documents.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout

import graphopt  # noqa: E402
from bench.hf_attention import LLAMA3_8B_LAYER, TINY_LAYER, Timer, versions  # noqa: E402
from graphopt import _compat  # noqa: E402
from graphopt.distributed.sharding import shard_sequence  # noqa: E402
from graphopt.ops.attention import flash_attention  # noqa: E402

CASES = ("causal", "window", "documents")
TARGETS = {"efficiency_min_causal": 0.92, "efficiency_min_documents": 0.88,
           "speedup_vs_context_parallel_min": 1.0,
           "speedup_vs_context_parallel_documents_min": 1.15}
LONG_SEQ_LOCAL = 16384  # the efficiency targets hold from this S/P on
# transformers' attention implementation for context_parallel's causal runs: sdpa with no mask.
CAUSAL_SDPA = "sdpa_is_causal"
SMOKE = dict(seq_local="16", layers=1, vocab=64, window=6, shortest_document=3, warmup=1, iters=1,
             codegen="eager")
LOSS_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _log(*parts) -> None:
    if dist.get_rank() == 0:
        print(*parts, flush=True)


def _max_over_ranks(value: float) -> float:
    found = torch.tensor([value], dtype=torch.float64, device=_device())
    dist.all_reduce(found, op=dist.ReduceOp.MAX)
    return found.item()


def _device() -> str:
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


# --- the models and the batch -------------------------------------------------------------------

def build_model(case: str, layer: dict, vocab: int, layers: int, window: int, dtype: torch.dtype):
    import transformers
    common = dict(vocab_size=vocab, num_hidden_layers=layers, max_position_embeddings=1 << 20,
                  attention_dropout=0.0, **layer)
    if case == "window":
        config, model_type = (transformers.MistralConfig(sliding_window=window, **common),
                              transformers.MistralForCausalLM)
    else:
        config, model_type = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)  # the same weights on every rank
    with torch.device(_device()):
        return model_type(config).to(dtype)


def long_tailed_documents(seq: int, shortest: int, alpha: float = 1.1, seed: int = 0) -> list[int]:
    """Document lengths summing to ``seq``: Pareto(alpha) from ``shortest`` (many short documents,
    a few long ones), each at most seq / 2, the last cut to fit."""
    gen = torch.Generator().manual_seed(seed)
    lengths: list[int] = []
    while sum(lengths) < seq:
        tail = float(torch.rand((), generator=gen)) ** (-1.0 / alpha)
        length = min(int(shortest * tail), seq // 2, seq - sum(lengths))
        lengths.append(length)
    return lengths


def make_batch(case: str, seq: int, vocab: int, shortest_document: int) -> dict:
    """tokens [1, S], next-token targets [1, S] (shifted once, before any sharding), position ids
    [1, S], and the document lengths."""
    gen = torch.Generator().manual_seed(1)
    stream = torch.randint(0, vocab, (1, seq + 1), generator=gen)
    lengths = long_tailed_documents(seq, shortest_document) if case == "documents" else [seq]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    device = _device()
    return dict(tokens=stream[:, :-1].to(device), targets=stream[:, 1:].to(device),
                positions=positions.to(device), documents=lengths)


def loss_of(model, tokens, positions, targets, total_tokens: int) -> torch.Tensor:
    """This call's share of the mean cross entropy over ``total_tokens`` (summed over the ranks it
    is the global mean). No ``labels=``: transformers would shift them again inside each slice."""
    logits = model(input_ids=tokens, position_ids=positions, use_cache=False).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                           reduction="sum") / total_tokens


# --- measuring -----------------------------------------------------------------------------------

def measure(step, args, timer: Timer, together: bool = True) -> dict:
    """Warm-up (the first call compiles), then timed calls: median ms, peak GiB and the last loss
    of this rank. ``together``: every rank runs ``step`` at once and each timed call starts after
    a barrier (collectives inside); else the rank runs alone, with no collective at all (so a rank
    that runs out of memory leaves its peers nowhere waiting)."""
    started = time.perf_counter()
    for _ in range(args.warmup):
        step()
    first_s = time.perf_counter() - started
    if timer.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(args.iters):
        if together:
            dist.barrier()
        times.append(timer(lambda: losses.append(step())))
    peak = torch.cuda.max_memory_allocated() / 2**30 if timer.cuda else 0.0
    return {"step_ms": statistics.median(times), "step_ms_rank0": times, "peak_gib": peak,
            "warmup_s": first_s, "loss": losses[-1]}


def over_ranks(row: dict, loss: str) -> dict:
    """A row of :func:`measure` for the group: the slowest rank's time, the fullest rank's peak,
    and the loss summed over the ranks ("sum": each held a share of the global mean) or the
    largest ("max": every rank ran the same)."""
    row["step_ms"] = _max_over_ranks(row["step_ms"])
    row["peak_gib"] = _max_over_ranks(row["peak_gib"])
    value = torch.tensor([row["loss"]], dtype=torch.float64, device=_device())
    dist.all_reduce(value, op=dist.ReduceOp.SUM if loss == "sum" else dist.ReduceOp.MAX)
    row["loss"] = value.item()
    return row


def train_step(model, runner, tokens, positions, targets, total_tokens: int):
    def step() -> float:
        loss = loss_of(runner, tokens, positions, targets, total_tokens)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss.detach().float())
    return step


def _mark_dynamic(*tensors) -> None:
    for tensor in tensors:
        torch._dynamo.maybe_mark_dynamic(tensor, 1)


def compiled(model, args, **flags):
    """The model compiled by graphopt (one compile serves every S/P unless --static)."""
    return torch.compile(model, dynamic=False if args.static else None,
                         backend=graphopt.backend(codegen=args.codegen, **flags))


def run_sequence_parallel(model, runner, batch: dict, args, timer: Timer) -> dict:
    tokens, positions = shard_sequence(batch["tokens"], batch["positions"])
    targets, _ = shard_sequence(batch["targets"])
    if not args.static:
        _mark_dynamic(tokens, positions, targets)
    return over_ranks(measure(train_step(model, runner, tokens, positions, targets,
                                         batch["tokens"].shape[1]), args, timer), "sum")


def run_one_gpu(model, runner, batch: dict, args, timer: Timer, seq: int) -> dict:
    """The first ``seq`` tokens on this GPU alone (the loss divided by all S tokens only when seq
    is all of them)."""
    tokens, positions, targets = (batch[name][:, :seq] for name in ("tokens", "positions",
                                                                     "targets"))
    if not args.static:
        _mark_dynamic(tokens, positions, targets)
    return measure(train_step(model, runner, tokens, positions, targets, seq), args, timer,
                   together=False)


def attention_ms(case: str, seq: int, batch: dict, layer: dict, window: int, args,
                 timer: Timer) -> float:
    """Forward + backward of one attention layer over ``seq`` tokens on one GPU, with the case's
    mask: SDPA's causal kernel for causal, graphopt's block-skipping kernels (what its mask pass
    picks on one GPU) for sliding window and documents."""
    heads, kv_heads, dim = (layer[k] for k in ("num_attention_heads", "num_key_value_heads",
                                               "head_dim"))
    gen = torch.Generator(device=_device()).manual_seed(0)
    q, dout = (torch.randn(1, heads, seq, dim, device=_device(), dtype=args.dtype, generator=gen)
               for _ in range(2))
    k, v = (torch.randn(1, kv_heads, seq, dim, device=_device(), dtype=args.dtype, generator=gen,
                        requires_grad=True) for _ in range(2))
    q.requires_grad_()
    positions = batch["positions"][:, :seq] if case == "documents" else None

    def attend():
        if case == "causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return flash_attention(q, k, v, causal=True, window=window if case == "window" else 0,
                               positions=positions)[0]

    def step() -> float:
        attend().backward(dout)
        for x in (q, k, v):
            x.grad = None
        return 0.0
    # one warm-up and fewer timed calls: at P = 8, S/P = 64K one call is seconds of pure compute
    brief = argparse.Namespace(warmup=1, iters=max(1, args.iters // 2))
    return _max_over_ranks(measure(step, brief, timer, together=False)["step_ms"])


def one_gpu_limit(case: str, model, runner, batch: dict, layer: dict, args,
                  timer: Timer) -> dict:
    """The whole sequence compiled by graphopt on one GPU; where it runs out of memory (on any
    rank), the estimate from S/P steps and attention alone."""
    world, seq = dist.get_world_size(), batch["tokens"].shape[1]
    try:
        row, fits = run_one_gpu(model, runner, batch, args, timer, seq), 1.0
    except torch.OutOfMemoryError as err:
        row, fits = {"out_of_memory": str(err).splitlines()[0]}, 0.0
    model.zero_grad(set_to_none=True)
    _free(timer)
    if _max_over_ranks(-fits) == -1.0:  # every rank fitted
        row["source"] = "measured: the whole sequence on one GPU"
        return over_ranks(row, "max")
    local = over_ranks(run_one_gpu(model, runner, batch, args, timer, seq // world), "max")
    window = args.window if case == "window" else 0
    attention_local = attention_ms(case, seq // world, batch, layer, window, args, timer)
    attention_whole = attention_ms(case, seq, batch, layer, window, args, timer)
    row.pop("loss", None)
    row.update(
        source="estimated (the whole sequence does not fit one GPU): P x (one-GPU step at S/P - "
               "L x attention(S/P)) + L x attention(S)",
        step_ms=world * (local["step_ms"] - args.layers * attention_local)
        + args.layers * attention_whole,
        step_ms_at_seq_local=local["step_ms"], attention_ms_at_seq_local=attention_local,
        attention_ms_at_seq=attention_whole, peak_gib=None)
    return row


def _register_causal_sdpa() -> None:
    """transformers' sdpa attention under a name whose mask builder returns no mask, so SDPA runs
    with is_causal=True: the one form context_parallel takes."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)
    AttentionMaskInterface.register(CAUSAL_SDPA, lambda *args, **kwargs: None)


def _refusal(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0]}"[:300]


def masked_sdpa_refusal(case: str, batch: dict, layer: dict, args, mesh) -> str | None:
    """What context_parallel answers to one SDPA call with the case's mask, on every rank alike
    (None: it took it). The model itself is not the probe: transformers builds each rank's mask
    from its own slice of position ids, so some ranks may pass a mask and others none, and a rank
    that refuses leaves its peers waiting in context_parallel's collectives. The probe covers the
    first 256 tokens per rank (a mask of the whole S x S would not fit; the answer is the same),
    through the CUDA kernels that take a mask (memory-efficient, cuDNN): context_parallel has a
    ring for those; on CPU it has none (the causal row shows its answer), so CPU is not probed."""
    from torch.distributed.tensor.experimental import context_parallel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if _device() != "cuda":
        return ("not probed on CPU: context_parallel's ring runs CUDA attention kernels only "
                "(flash, memory-efficient, cuDNN)")
    seq = min(batch["tokens"].shape[1], 256 * dist.get_world_size())
    heads, dim = layer["num_attention_heads"], layer["head_dim"]
    q, k, v = (torch.randn(1, heads, seq, dim, device=_device(), dtype=args.dtype)
               for _ in range(3))
    rows = torch.arange(seq, device=q.device)
    keep = rows[None, :] <= rows[:, None]
    if case == "window":
        keep &= rows[:, None] - rows[None, :] < args.window
    else:  # documents, delimited where a position is not the previous one plus one
        positions = batch["positions"][:, :seq]
        starts = torch.ones_like(positions, dtype=torch.bool)
        starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
        document = starts.cumsum(1)[0]
        keep &= document[:, None] == document[None, :]
    mask = keep[None, None]  # [1, 1, S, S]: each rank keeps its query rows, as q
    with context_parallel(mesh, buffers=[q, k, v, mask], buffer_seq_dims=[2, 2, 2, 2],
                          no_restore_buffers={q, k, v, mask}), \
            sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        try:
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        except Exception as err:  # noqa: BLE001 -- context_parallel's answer is the measurement
            return _refusal(err)
    return None


def run_context_parallel(case: str, model, batch: dict, layer: dict, args, timer: Timer,
                         mesh) -> dict:
    """The model under context_parallel (causal), or what context_parallel answers to the case's
    mask (sliding window, documents)."""
    from torch.distributed.tensor.experimental import context_parallel
    if case != "causal":
        refused = masked_sdpa_refusal(case, batch, layer, args, mesh)
        row = {"attention": "sdpa", "load_balance": "head-tail",
               "probe": refused or f"took SDPA with the {case} mask"}
        row["refused"] = (f"SDPA with the {case} mask: {refused}" if refused else
                          f"not run: transformers builds each rank's {case} mask over its own S/P "
                          "keys from its own head-tail reordered position ids, not over the S "
                          "keys context_parallel's ring brings (wrong numbers), and a rank whose "
                          "slice needs no mask would wait in the ring for one that refuses")
        return row
    attention = model.config._attn_implementation
    model.config._attn_implementation = CAUSAL_SDPA
    row = {"attention": CAUSAL_SDPA, "load_balance": "head-tail"}
    buffers = [batch[name].clone() for name in ("tokens", "positions", "targets")]
    try:
        with context_parallel(mesh, buffers=buffers, buffer_seq_dims=[1, 1, 1],
                              no_restore_buffers=set(buffers)):
            row.update(measure(train_step(model, model, *buffers, batch["tokens"].shape[1]),
                               args, timer))
        over_ranks(row, "sum")
    except Exception as err:  # noqa: BLE001 -- context_parallel's answer is the measurement
        row["refused"] = _refusal(err)
    finally:
        model.config._attn_implementation = attention
        model.zero_grad(set_to_none=True)
    return row


def per_document_balancer() -> str:
    balancer = _compat.context_parallel_per_document_balancer()
    if balancer is None:
        return f"torch {torch.__version__} has no per-document load balancer for context_parallel"
    return (f"torch {torch.__version__} has {balancer.__name__}, for flex_attention's BlockMask "
            "through the private module-wrapper API (K/V all-gathered, not a ring); "
            "context_parallel's SDPA path, which this baseline runs, takes no mask, so it does "
            "not apply here")


# --- one row: a case at one S/P -----------------------------------------------------------------

def bench_case(case: str, layer: dict, args, timer: Timer, mesh):
    """The rows of one case, one per S/P (a generator: the caller writes each as it comes), on
    one model whose two compiled runners serve every S/P."""
    world = dist.get_world_size()
    torch._dynamo.reset()
    model = build_model(case, layer, args.vocab, args.layers, args.window, args.dtype)
    sequence_parallel = compiled(model, args, sequence_parallel_attention=True)
    one_gpu = compiled(model, args)
    for seq_local in (int(s) for s in args.seq_local.split(",")):
        seq = seq_local * world
        batch = make_batch(case, seq, args.vocab, args.shortest_document)
        row = {"case": case, "world_size": world, "seq_local": seq_local, "seq": seq,
               "window": args.window if case == "window" else None,
               "model": type(model).__name__}
        if case == "documents":
            lengths = sorted(batch["documents"])
            row["documents"] = {"count": len(lengths), "shortest": lengths[0],
                                "median": lengths[len(lengths) // 2], "longest": lengths[-1]}
        modes = row["modes"] = {}
        modes["sequence_parallel"] = run_sequence_parallel(model, sequence_parallel, batch, args,
                                                           timer)
        _log(case, seq_local, "sequence_parallel", json.dumps(modes["sequence_parallel"]))
        _free(timer)
        modes["one_gpu"] = one_gpu_limit(case, model, one_gpu, batch, layer, args, timer)
        _log(case, seq_local, "one_gpu", json.dumps(modes["one_gpu"]))
        _free(timer)
        if not args.skip_context_parallel:
            modes["context_parallel"] = run_context_parallel(case, model, batch, layer, args,
                                                             timer, mesh)
            _log(case, seq_local, "context_parallel", json.dumps(modes["context_parallel"]))
            _free(timer)
        derive(row, args.dtype)
        yield row


def _free(timer: Timer) -> None:
    if timer.cuda:
        torch.cuda.empty_cache()


def derive(row: dict, dtype: torch.dtype) -> None:
    """Efficiency, tokens/s/GPU, loss agreement and the speedup vs context_parallel of a row."""
    modes, world = row["modes"], row["world_size"]
    ours = modes["sequence_parallel"]["step_ms"]
    row["tokens_per_s_per_gpu"] = row["seq_local"] / (ours * 1e-3)
    row["efficiency"] = modes["one_gpu"]["step_ms"] / world / ours
    reference = modes["one_gpu"].get("loss")
    tolerance = LOSS_TOLERANCE[dtype]
    for name in ("sequence_parallel", "context_parallel"):
        mode = modes.get(name, {})
        if reference is not None and mode.get("loss") is not None:
            mode["loss_diff_vs_one_gpu"] = abs(mode["loss"] - reference)
            mode["loss_ok"] = mode["loss_diff_vs_one_gpu"] <= tolerance * max(1.0, abs(reference))
    cp = modes.get("context_parallel", {})
    if "step_ms" in cp and cp.get("loss_ok", True):
        row["speedup_vs_context_parallel"] = cp["step_ms"] / ours
    elif "step_ms" in cp:
        row["context_parallel_wrong"] = (f"context_parallel's loss is off the one-GPU loss by "
                                         f"{cp['loss_diff_vs_one_gpu']:.3g}: not compared")


def summarize(rows: list[dict]) -> dict:
    long = [r for r in rows if r["seq_local"] >= LONG_SEQ_LOCAL] or rows

    def lowest(values, why):
        values = [v for v in values if v is not None]
        return (min(values), None) if values else (None, why)

    summary, notes = {}, {}
    for key, case in (("efficiency_min_causal", "causal"),
                      ("efficiency_min_documents", "documents")):
        summary[key], notes[key] = lowest([r["efficiency"] for r in long if r["case"] == case],
                                          f"no {case} row measured")
    refusals = sorted({r["modes"].get("context_parallel", {}).get("refused") or
                       r.get("context_parallel_wrong", "") for r in rows} - {""})
    summary["speedup_vs_context_parallel_min"], notes["speedup_vs_context_parallel_min"] = lowest(
        [r.get("speedup_vs_context_parallel") for r in rows],
        "context_parallel ran in no row: " + "; ".join(refusals))
    documents = [r for r in rows if r["case"] == "documents"]
    key = "speedup_vs_context_parallel_documents_min"
    summary[key], notes[key] = lowest(
        [r.get("speedup_vs_context_parallel") for r in documents],
        "context_parallel did not run packed documents: " + "; ".join(sorted(
            {r["modes"].get("context_parallel", {}).get("refused") or
             r.get("context_parallel_wrong", "not run") for r in documents})))
    summary["world_sizes"] = sorted({r["world_size"] for r in rows})
    summary["efficiency_by_case"] = {
        case: {f"P={r['world_size']} S/P={r['seq_local']}": round(r["efficiency"], 4)
               for r in rows if r["case"] == case} for case in CASES}
    summary["loss_ok_sequence_parallel"] = all(
        r["modes"]["sequence_parallel"].get("loss_ok", True) for r in rows)
    summary["meets"] = {k: (summary[k] is not None and summary[k] >= t)
                        for k, t in TARGETS.items()}
    summary["not_measured"] = {k: v for k, v in notes.items() if v}
    return summary


# --- output --------------------------------------------------------------------------------------

def _fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(result: dict) -> str:
    info = result["versions"]
    lines = [f"# Sequence parallelism on HF models: graphopt vs one GPU vs context_parallel "
             f"({info['device']})", "",
             f"{result['model']}; torch {info['torch']}, triton {info['triton']}, transformers "
             f"{info['transformers']}; codegen {result['codegen']}; step = forward + cross entropy "
             f"+ backward, median of {result['iters']} after {result['warmup']} warm-up, slowest "
             "rank; peak = fullest rank.", "",
             "| case | P | S/P | graphopt SP ms | peak GiB | one GPU ms (S) | one-GPU source | "
             "context_parallel ms | efficiency | vs CP | tokens/s/GPU | SP loss diff |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in result["rows"]:
        sp, one, cp = (row["modes"].get(m, {}) for m in ("sequence_parallel", "one_gpu",
                                                          "context_parallel"))
        cp_cell = _fmt(cp.get("step_ms")) if "step_ms" in cp else (
            "refused" if "refused" in cp else "-")
        lines.append(
            f"| {row['case']} | {row['world_size']} | {row['seq_local']} | {sp['step_ms']:.1f} | "
            f"{_fmt(sp['peak_gib'], 2)} | {one['step_ms']:.1f} | "
            f"{'measured' if one['source'].startswith('measured') else 'estimated'} | {cp_cell} | "
            f"{row['efficiency']:.3f} | {_fmt(row.get('speedup_vs_context_parallel'), 2)} | "
            f"{row['tokens_per_s_per_gpu']:.0f} | {_fmt(sp.get('loss_diff_vs_one_gpu'), 6)} |")
    lines += ["", "| summary | measured | target | met |", "| --- | ---: | ---: | --- |"]
    summary = result["summary"]
    for key, target in TARGETS.items():
        lines.append(f"| {key} | {_fmt(summary[key], 3)} | {target} | {summary['meets'][key]} |")
    lines += ["", f"World sizes: {summary['world_sizes']}."]
    lines += [f"- {key} not measured: {why}" for key, why in summary["not_measured"].items()]
    refusals = sorted({r["modes"]["context_parallel"]["refused"] for r in result["rows"]
                       if "refused" in r["modes"].get("context_parallel", {})})
    lines += [f"- context_parallel refused: {why}" for why in refusals]
    lines += [f"- Per-document balancer: {result['per_document_balancer']}",
              "- One-GPU rows marked estimated did not fit one GPU; see the JSON for the parts."]
    return "\n".join(lines) + "\n"


def write(out_dir: str, result: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "sp_attention_hf.json"), "w") as handle:
        json.dump(result, handle, indent=1)
    with open(os.path.join(out_dir, "sp_attention_hf.md"), "w") as handle:
        handle.write(markdown(result))


def earlier_rows(out_dir: str, device: str, world: int) -> list[dict]:
    """Rows of other world sizes measured on the same device into the same --out."""
    path = os.path.join(out_dir, "sp_attention_hf.json")
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        earlier = json.load(handle)
    if earlier.get("versions", {}).get("device") != device:
        return []
    return [r for r in earlier.get("rows", []) if r["world_size"] != world]


# --- driver --------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, gloo, a tiny model at toy sizes, eager codegen")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--seq-local", default="16384,32768,65536", help="S/P values")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--window", type=int, default=4096, help="sliding window of 'window'")
    parser.add_argument("--shortest-document", type=int, default=256,
                        help="packed document lengths: Pareto(1.1) from this, at most S/2")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--codegen", default="inductor", choices=("inductor", "eager"))
    parser.add_argument("--static", action="store_true",
                        help="compile every length on its own (dynamic=False)")
    parser.add_argument("--skip-context-parallel", action="store_true")
    parser.add_argument("--time-limit", type=float, default=0.0,
                        help="seconds after which no new row starts (0: none)")
    if parser.parse_known_args(argv)[0].smoke:  # toy defaults; flags given still win
        parser.set_defaults(**SMOKE)
    args = parser.parse_args(argv)
    args.cases = [c for c in args.cases.split(",") if c]
    unknown = set(args.cases) - set(CASES)
    if unknown:
        parser.error(f"--cases {sorted(unknown)}: choose from {','.join(CASES)}")
    args.dtype = torch.float32 if args.smoke else torch.bfloat16
    return args


def init_distributed(smoke: bool) -> str:
    """gloo on CPU for --smoke, NCCL with one GPU per rank otherwise (reuses a group already up)."""
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: run with --smoke for the CPU check")
    device = "cpu" if smoke else "cuda"
    if not dist.is_initialized():
        if device == "cuda":
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group("gloo")
    if (dist.get_backend() == "nccl") != (device == "cuda"):
        raise SystemExit(f"--smoke runs on gloo, GPUs on NCCL; the process group is "
                         f"{dist.get_backend()}")
    return device


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = init_distributed(args.smoke)
    world = dist.get_world_size()
    if device == "cuda":
        from graphopt.kernels import flash_attention_fwd
        flash_attention_fwd.AUTOTUNE = False  # the Hopper config, untimed (as bench/hf_attention)
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(device, (world,))
    _compat.set_context_parallel_rotate_method("alltoall")  # context_parallel as a ring
    _register_causal_sdpa()
    layer = TINY_LAYER if args.smoke else LLAMA3_8B_LAYER
    info = versions(device)
    rows = earlier_rows(args.out, info["device"], world)
    result = {"model": f"{args.layers} layers of {layer}, vocab {args.vocab}, "
                       f"{str(args.dtype).replace('torch.', '')}, batch 1, sdpa attention",
              "versions": info, "codegen": args.codegen, "warmup": args.warmup,
              "iters": args.iters, "static": args.static, "rows": rows,
              "per_document_balancer": per_document_balancer(), "targets": TARGETS,
              "time_limit_s": args.time_limit or None, "stopped_by_time_limit": False}
    timer = Timer(device)
    started = time.time()
    for case in args.cases:
        for row in bench_case(case, layer, args, timer, mesh):
            rows.append(row)
            result["summary"] = summarize(rows)
            result["elapsed_s"] = time.time() - started
            if dist.get_rank() == 0:
                write(args.out, result)
            # rank 0's clock decides for all, so every rank starts the same rows
            over = torch.tensor([float(args.time_limit > 0 and
                                       time.time() - started > args.time_limit)], device=device)
            dist.broadcast(over, 0)
            if over.item():
                result["stopped_by_time_limit"] = True
                break
        if result["stopped_by_time_limit"]:
            break
    result["summary"] = summarize(rows) if rows else {}
    result["elapsed_s"] = time.time() - started
    if dist.get_rank() == 0 and rows:
        write(args.out, result)
        print(markdown(result), flush=True)
    return result


if __name__ == "__main__":
    try:
        main()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
