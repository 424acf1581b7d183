"""Random small models for differential fuzzing of graphopt's passes against eager.

A *case* is a JSON-able dict drawn by ``cases()`` (hypothesis): a model (blocks over a hidden
state ``h`` of shape [B, S, D]; attention as SDPA, decomposed, or SDPA under a mask built from
positions, each a module from its q/k/v projection to its output projection), its dtype and
inputs, and the graphopt flags it compiles with::

    {"seed": 3, "batch": 2, "seq": 8, "dim": 16, "dtype": "float32", "world": 1,
     "blocks": [["norm", "rms"], ["sdpa", 2, true], ["inplace", "slice_mul"], ...],
     "flags": {"memory_budget": 0.5, "offload_activations": true, ...},
     "dynamic": false, "forwards": 1}

``run_case(case)`` compiles the model with graphopt (codegen eager unless the flags say otherwise),
runs one training step (two forwards before one backward where ``forwards`` is 2; a second step at
another sequence length where ``dynamic``) and compares the output, the input's gradient, every
parameter's gradient and every buffer with the same model run eagerly (where attention_selection
ran, eager runs each attention on the samples the compiled step selected). With ``world`` 2 (inside a
gloo process pair) the compiled model runs sequence-parallel on rank r's half of the sequence,
with tensor-parallel MLPs whose collectives the overlap pass fuses, and is compared with the
whole model run eagerly on the whole sequence in one process.

A failure prints one line that reruns the case: ``python tests/fuzz/fuzz_models.py '<case>'``.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
# |compiled - eager| <= tolerance * (1 + max |eager|), per tensor. An error of 1e-4 in one value
# of an activation is caught in float32 and float64 (tests/fuzz: the injected-error test).
TOLERANCE = {"float64": 1e-9, "float32": 2e-5, "bfloat16": 3e-2}
# graphopt::sp_attention merges its blocks in float32 whatever the inputs' dtype (its docstring):
# sequence-parallel cases are held to float32's tolerance at best (and others, ``tolerance``).
SEQUENCE_PARALLEL_TOLERANCE = TOLERANCE["float32"]
ATTENTION_BLOCKS = ("sdpa", "attention", "masked_sdpa")
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh,
               "sigmoid": torch.sigmoid}


# --- the case generator ------------------------------------------------------------------------------

def cases(world: int = 1, codegen: str = "eager", offload: float = 0.8):
    """A hypothesis strategy of cases; ``world`` 2: sequence-parallel and tensor-parallel blocks
    (every block keeps the sequence local, at least one attention); ``offload``: how often
    offload_activations is on."""
    from hypothesis import strategies as st

    heads = st.sampled_from([1, 2, 4])
    sequence_local = [
        st.tuples(st.just("linear"), st.booleans()),
        st.tuples(st.just("act"), st.sampled_from(sorted(ACTIVATIONS))),
        st.tuples(st.just("norm"), st.sampled_from(["layer", "rms"])),
        st.tuples(st.just("residual"), st.sampled_from(sorted(ACTIVATIONS))),
        st.tuples(st.just("inplace"), st.sampled_from(["mul", "add", "relu", "slice_mul"])),
        st.tuples(st.just("view"), st.sampled_from(["heads", "rows", "glu", "transpose_back"])),
        st.tuples(st.just("sdpa"), heads, st.booleans()),
        st.tuples(st.just("attention"), heads, st.just(True) if world > 1 else st.booleans()),
        st.tuples(st.just("detach"), st.sampled_from(sorted(ACTIVATIONS))),
        st.tuples(st.just("buffer"), st.just("scale")),
    ]
    tp_mlp = st.tuples(st.just("tp_mlp"), st.sampled_from(
        ["gather_scatter", "all_reduce", "all_reduce_2d", "all_reduce_in_place"]), st.booleans())
    if world > 1:
        blocks = sequence_local + [tp_mlp]
    else:  # a mask built from positions, as transformers builds one (specialize_attention_masks)
        masked = st.tuples(st.just("masked_sdpa"), heads, st.sampled_from(["causal", "window", "full"]))
        blocks = sequence_local + [st.tuples(st.just("buffer"), st.just("running")), masked]
    flags = {
        "memory_budget": st.sampled_from([None, None, 0.1, 0.3, 0.5, 0.8, 1.0, "24KiB"]),
        "offload_activations": st.floats(0, 1).map(lambda u: u < offload),
        "offload_host_capacity": st.sampled_from([None, None, None, "3KiB"]),
        "offload_link_slack": st.sampled_from([0.0, 0.02, 0.5]),
        "codegen": st.just(codegen), "debug": st.just(True),
    }
    if world == 1:  # fine-tuning's attention selection (refused under sequence parallelism)
        flags.update(attention_selection=st.floats(0, 1).map(lambda u: u < 0.4),
                     attention_selection_kept_fraction=st.sampled_from([0.5, 1.0]))
    if world > 1:
        flags.update(sequence_parallel_attention=st.just(True), sp_load_balance=st.booleans(),
                     sp_split_diagonal=st.booleans(), overlap_matmul_collectives=st.just(True),
                     overlap_mode=st.sampled_from(["chunked", "chunked", "auto"]),
                     overlap_chunks=st.integers(0, 4))
    attention = st.tuples(st.sampled_from(["sdpa", "attention"]), heads, st.just(True))
    # a sequence-parallel model: blocks, an attention, a tensor-parallel MLP, blocks
    block_lists = (st.tuples(st.lists(st.one_of(*blocks), max_size=2), attention, tp_mlp,
                             st.lists(st.one_of(*blocks), max_size=2))
                   .map(lambda parts: parts[0] + [parts[1], parts[2]] + parts[3]) if world > 1
                   # half of them around an attention under a mask (the mask pass's work)
                   else st.tuples(st.lists(st.one_of(*blocks), max_size=2),
                                  st.one_of(masked, st.one_of(*blocks)),
                                  st.lists(st.one_of(*blocks), max_size=2))
                   .map(lambda parts: parts[0] + [parts[1]] + parts[2]))
    return st.fixed_dictionaries({
        "seed": st.integers(0, 2**16), "batch": st.integers(1, 3) if world == 1 else st.integers(1, 2),
        "seq": st.sampled_from([4, 6, 8, 12]) if world > 1 else st.integers(3, 12),
        "dim": st.sampled_from([8, 16]), "world": st.just(world),
        "dtype": st.sampled_from(["float32", "float64"] if world > 1
                                 else ["float32", "float32", "float64", "bfloat16"]),
        "blocks": block_lists.map(lambda bs: [list(b) for b in bs]),
        "flags": st.fixed_dictionaries(flags),
        "dynamic": st.just(False) if world > 1 or codegen != "eager" else st.sampled_from([False, False, True]),
        "forwards": st.just(1) if world > 1 else st.sampled_from([1, 1, 1, 2]),
    }).map(_one_selection_per_step)


def _one_selection_per_step(case: dict) -> dict:
    """With attention selection, one forward per step (the compiled model records only its last
    forward's selection, which is what the eager reference replays), two samples or more (the
    pass leaves a batch of one whole) and an attention block (a causal SDPA after the others
    where the draw has none)."""
    if not case["flags"].get("attention_selection"):
        return case
    blocks = case["blocks"]
    if not any(block[0] in ATTENTION_BLOCKS for block in blocks):
        blocks = blocks + [["sdpa", 2, True]]
    return {**case, "forwards": 1, "batch": max(case["batch"], 2), "blocks": blocks}


# --- the model ------------------------------------------------------------------------------------------

class AttentionLayer(nn.Module):
    """An attention block as models write one: a module from the q/k/v projection to the output
    projection (what attention_selection finds), its residual added by the caller. ``kind``:
    SDPA (``option`` causal or not), decomposed ("attention"), or SDPA under a mask built from
    positions ("masked_sdpa", ``option`` causal / window / full)."""

    def __init__(self, dim: int, kind: str, heads: int, option):
        super().__init__()
        self.kind, self.heads, self.option = kind, heads, option
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.as_sdpa = False   # a decomposed attention run as SDPA (see run_case)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, s, d = h.shape
        q, k, v = [t.view(b, s, self.heads, d // self.heads).transpose(1, 2)
                   for t in self.qkv(h).chunk(3, dim=-1)]
        if self.kind == "sdpa" or self.as_sdpa:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.option)
        elif self.kind == "masked_sdpa":
            positions = torch.arange(s, device=h.device)
            seen = positions[:, None] - positions[None, :]  # query - key
            visible = {"causal": seen >= 0, "window": (seen >= 0) & (seen < 3),
                       "full": seen == seen}[self.option]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            if self.option:
                scores = scores + torch.triu(torch.full((s, s), float("-inf"), dtype=scores.dtype,
                                                        device=scores.device), 1)
            out = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v
        return self.out(out.transpose(1, 2).reshape(b, s, d))


class FuzzModel(nn.Module):
    """The blocks of ``case`` over h [B, S, D]. ``rank`` None: the whole model, as eager runs it;
    else rank r's part of it in a run of ``case['world']`` ranks (tensor-parallel blocks hold the
    rows / columns of r, the group is WORLD), built by ``shard``."""

    def __init__(self, case: dict):
        super().__init__()
        torch.manual_seed(case["seed"])
        self.blocks = [tuple(b) for b in case["blocks"]]
        self.rank, self.world = None, case["world"]
        self.selection: dict[int, list[int]] = {}   # block index -> samples its attention ran on
        dim = case["dim"]
        self.layers = nn.ModuleList(self._make(block, dim) for block in self.blocks)
        dtype = DTYPES[case["dtype"]]
        self.to(dtype)

    def _make(self, block, dim: int) -> nn.Module:
        kind = block[0]
        layer = nn.Module()
        if kind == "linear":
            layer.linear = nn.Linear(dim, dim, bias=block[1])
        elif kind == "norm":
            layer.weight = nn.Parameter(1 + 0.1 * torch.randn(dim))
            layer.bias = nn.Parameter(0.1 * torch.randn(dim)) if block[1] == "layer" else None
        elif kind in ("residual", "detach"):
            layer.up, layer.down = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        elif kind == "inplace":
            layer.linear = nn.Linear(dim, dim)
        elif kind == "view":
            layer.linear = nn.Linear(dim, 2 * dim if block[1] == "glu" else dim)
        elif kind in ATTENTION_BLOCKS:
            layer = AttentionLayer(dim, *block)
        elif kind == "buffer":
            layer.register_buffer("state", 1 + 0.1 * torch.randn(dim) if block[1] == "scale"
                                  else torch.zeros(dim))
        elif kind == "tp_mlp":  # column-parallel up without a bias, as the overlap pass takes it
            layer.up = nn.Linear(dim, 2 * dim * self.world, bias=False)
            layer.down = nn.Linear(2 * dim * self.world, dim, bias=block[2])
        return layer

    def shard(self, rank: int) -> "FuzzModel":
        """Rank ``rank``'s model: tensor-parallel blocks keep their rows of ``up`` and columns of
        ``down`` (and 1/world of its bias, summed back by the reduction); the rest is copied."""
        part = copy.deepcopy(self)
        part.rank = rank
        for block, layer in zip(part.blocks, part.layers):
            if block[0] != "tp_mlp":
                continue
            width = layer.up.out_features // self.world
            rows = slice(rank * width, (rank + 1) * width)
            up = nn.Linear(layer.up.in_features, width, bias=False)
            down = nn.Linear(width, layer.down.out_features, bias=block[2])
            with torch.no_grad():
                up.weight.copy_(layer.up.weight[rows])
                down.weight.copy_(layer.down.weight[:, rows])
                if block[2]:
                    down.bias.copy_(layer.down.bias / self.world)
            layer.up, layer.down = up.to(layer.up.weight.dtype), down.to(layer.down.weight.dtype)
        return part

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for index, (block, layer) in enumerate(zip(self.blocks, self.layers)):
            if isinstance(layer, AttentionLayer):
                h = h + self._attend(index, layer, h)
            else:
                h = getattr(self, f"_{block[0]}")(layer, h, *block[1:])
        return h

    def _attend(self, index: int, layer: "AttentionLayer", h: torch.Tensor) -> torch.Tensor:
        """The attention block's output; where ``selection`` names the samples it ran on in the
        compiled model (attention_selection), only those, zero for the others."""
        chosen = self.selection.get(index)
        if chosen is None:
            return layer(h)
        idx = torch.tensor(chosen, dtype=torch.long, device=h.device)
        out = torch.zeros_like(h)
        return out.index_copy(0, idx, layer(h[idx])) if len(chosen) else out

    def _linear(self, layer, h, bias):
        return layer.linear(h)

    def _act(self, layer, h, name):
        return ACTIVATIONS[name](h)

    def _norm(self, layer, h, kind):
        if kind == "layer":
            return F.layer_norm(h, h.shape[-1:], layer.weight, layer.bias)
        return h * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(h.dtype) * layer.weight

    def _residual(self, layer, h, name):
        return h + layer.down(ACTIVATIONS[name](layer.up(h)))

    def _detach(self, layer, h, name):
        return h + 0.5 * layer.down(ACTIVATIONS[name](layer.up(h))).detach()

    def _inplace(self, layer, h, op):
        h = layer.linear(h)
        if op == "mul":
            h.mul_(0.5)
        elif op == "add":
            h.add_(0.25)
        elif op == "relu":
            h.relu_()
        else:
            h[..., : h.shape[-1] // 2].mul_(2.0)
        return h

    def _view(self, layer, h, kind):
        b, s, d = h.shape
        if kind == "heads":
            split = h.unflatten(-1, (2, d // 2)).transpose(1, 2)          # [B, 2, S, D/2]
            return layer.linear(split.transpose(1, 2).reshape(b, s, d))
        if kind == "rows":
            return layer.linear(h.reshape(b * s, d)).view(b, s, d)
        if kind == "glu":
            gate, value = layer.linear(h).chunk(2, dim=-1)
            return value * torch.sigmoid(gate)
        return layer.linear(h.transpose(1, 2).contiguous().transpose(1, 2))

    def _buffer(self, layer, h, kind):
        if kind == "scale":
            return h * layer.state
        layer.state.mul_(0.9).add_(0.1 * h.detach().mean(dim=(0, 1)))
        return h - layer.state

    def _tp_mlp(self, layer, h, kind, bias):
        """Tensor-parallel MLP over the sequence-sharded h: gather the sequence, column-parallel
        up, row-parallel down, then reduce-scatter back to this rank's rows -- or all-reduce and
        keep them. The whole model (rank None) is the plain MLP on the whole sequence."""
        if self.rank is None:
            return h + layer.down(F.gelu(layer.up(h)))
        import torch.distributed._functional_collectives as funcol
        group = dist.group.WORLD
        full = funcol.all_gather_tensor(h, 1, group)                      # [B, S, D]
        hidden = F.gelu(layer.up(full))
        if kind == "gather_scatter":
            return h + funcol.reduce_scatter_tensor(layer.down(hidden), "sum", 1, group)
        if kind == "all_reduce_2d":
            flat = layer.down(hidden.flatten(0, 1))
            out = funcol.all_reduce(flat, "sum", group).view(full.shape)
        elif kind == "all_reduce_in_place":
            out = layer.down(hidden)
            dist.all_reduce(out, group=group)
        else:
            out = funcol.all_reduce(layer.down(hidden), "sum", group)
        rows = h.shape[1]
        return h + out.narrow(1, self.rank * rows, rows)


# --- one case ------------------------------------------------------------------------------------------

def run_case(case: dict, inject=None) -> dict[str, Any]:
    """Compile ``case``'s model with graphopt, run it and eager; the largest error per compared
    tensor relative to its tolerance (``worst`` > 1 fails), the passes that ran and rewrote, and
    the line that reruns it. ``inject``: a context manager active while the compiled model runs
    (tests inject errors to see them caught)."""
    import contextlib

    import graphopt
    from graphopt.debug.dump import clear_compile_summaries, compile_summaries
    from graphopt.ops.attention_selection import selector

    torch._dynamo.reset()
    clear_compile_summaries()
    selector().reset()
    world = case["world"]
    rank = dist.get_rank() if world > 1 else None
    dtype = DTYPES[case["dtype"]]
    reference = FuzzModel(case)
    model = reference.shard(rank) if rank is not None else copy.deepcopy(reference)
    compiled = torch.compile(model, backend=graphopt.backend(**case["flags"]),
                             dynamic=case["dynamic"] or None if world == 1 else False)
    errors: dict[str, float] = {}
    lengths = [case["seq"], max(2, case["seq"] - 2)] if case["dynamic"] else [case["seq"]]
    for step, seq in enumerate(lengths):
        gen = torch.Generator().manual_seed(case["seed"] * 7 + step)
        inputs = [torch.randn(case["batch"], seq, case["dim"], generator=gen).to(dtype)
                  for _ in range(case["forwards"])]
        probe = torch.randn(case["batch"], seq, case["dim"], generator=gen).to(dtype)
        for module in (reference, model):
            module.zero_grad(set_to_none=True)
        rows = slice(None)
        if rank is not None:
            chunk = seq // world
            rows = slice(rank * chunk, (rank + 1) * chunk)
        local_inputs = [x[:, rows].clone().requires_grad_() for x in inputs]
        with (inject() if inject is not None else contextlib.nullcontext()):
            out = _loss_terms(compiled, local_inputs)
            (out * probe[:, rows]).sum().backward()
        # eager runs each attention on the samples the compiled step selected (all, without
        # attention_selection)
        reference.selection = recorded_selection()
        if dtype == torch.bfloat16 and _mask_pass_rewrote(compile_summaries()):
            # where the mask pass made a decomposed attention SDPA, so does eager in bfloat16:
            # torch's CPU SDPA backward in bfloat16 was 0.19 of scale off float64 where the
            # float32-softmax decomposition was 0.01 (a fuzzed 4-block model; graphopt equal to
            # eager SDPA), more than any bfloat16 tolerance that still catches errors
            for layer in reference.layers:
                if isinstance(layer, AttentionLayer) and layer.kind == "attention":
                    layer.as_sdpa = True
        truth = _float64_truth(reference, inputs, probe) if dtype == torch.bfloat16 and world == 1 else None
        eager_inputs = [x.clone().requires_grad_() for x in inputs]
        eager_out = _loss_terms(reference, eager_inputs)
        (eager_out * probe).sum().backward()
        _compare(errors, f"step{step}.output", out, eager_out[:, rows], case,
                 truth and truth["output"])
        for i, (mine, ref) in enumerate(zip(local_inputs, eager_inputs)):
            _compare(errors, f"step{step}.input{i}.grad", mine.grad, ref.grad[:, rows], case,
                     truth and truth["input_grads"][i])
        _compare_parameters(errors, f"step{step}", model, reference, case, truth)
        for (name, mine), (_, ref) in zip(model.named_buffers(), reference.named_buffers()):
            _compare(errors, f"step{step}.{name}", mine, ref, case, truth and truth["buffers"][name])
    passes = {}
    for summary in compile_summaries():
        for entry in summary["passes"]:
            if entry.get("ran"):
                seen = passes.setdefault(entry["pass"], {"ran": False, "rewrote": False})
                seen["ran"] = True
                seen["rewrote"] |= bool(entry.get("modified") or entry.get("matched"))
    return {"worst": max(errors.values(), default=0.0), "errors": errors, "passes": passes,
            "repro": repro(case)}


def _float64_truth(reference, inputs: list[torch.Tensor], probe: torch.Tensor) -> dict:
    """The step of ``reference`` (as it is before eager runs it) in float64: output, input and
    parameter gradients, buffers after the step. In bfloat16 two orders of the same arithmetic
    can each be 0.3 of scale off the truth (a fuzzed 5-block model: eager SDPA under a window mask
    and graphopt's float32 masked kernel, equally far from float64, 3.6 x tolerance apart)."""
    exact = copy.deepcopy(reference).to(torch.float64)
    exact_inputs = [x.to(torch.float64).requires_grad_() for x in inputs]
    out = _loss_terms(exact, exact_inputs)
    (out * probe.to(torch.float64)).sum().backward()
    return {"output": out.detach(), "input_grads": [x.grad for x in exact_inputs],
            "param_grads": {name: p.grad for name, p in exact.named_parameters()},
            "buffers": dict(exact.named_buffers())}


def _mask_pass_rewrote(summaries) -> bool:
    return any(entry["pass"] == "specialize_attention_masks" and entry.get("matched")
               for summary in summaries for entry in summary["passes"])


def recorded_selection() -> dict[int, list[int]]:
    """Block index -> the samples its attention ran on in the step just run, for every attention
    module attention_selection rewrote (module names end in the block's index)."""
    from graphopt.ops.attention_selection import selector
    chosen = {}
    for graph in selector().graphs:
        for name, (samples, _) in graph.read().items():
            chosen[int(name.rsplit(".", 1)[1])] = samples
    return chosen


def _loss_terms(module, inputs: list[torch.Tensor]) -> torch.Tensor:
    """The output the loss reads: one forward, or the difference of two forwards whose backward
    runs once for both (a siamese loss: both forwards' saved activations live at once)."""
    outs = [module(x) for x in inputs]
    return outs[0] if len(outs) == 1 else outs[0] - outs[1]


def _compare(errors: dict, name: str, got, expected, case: dict, truth=None) -> None:
    """``got`` against eager's ``expected``; with a float64 ``truth`` (bfloat16), ``got`` also
    passes where it is no farther from the truth than eager is (by more than the tolerance)."""
    if got is None and expected is None:
        return
    if got is None or expected is None or got.shape != expected.shape:
        errors[name] = math.inf
        return
    scale = tolerance(case) * (1 + expected.double().abs().max().item())

    def distance(a, b):
        return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0

    difference = distance(got, expected)
    if truth is not None and truth.shape == got.shape and not math.isnan(difference):
        difference = min(difference, max(0.0, distance(got, truth) - distance(expected, truth)))
    errors[name] = difference / scale if not math.isnan(difference) else math.inf


def tolerance(case: dict) -> float:
    """The case's tolerance: its dtype's, float32's at best where an attention computes in float32
    on one side -- sequence parallelism merges in float32; the decomposed attention's own softmax
    is float32, which the mask pass replaces by SDPA in the inputs' dtype; graphopt's masked
    kernel (a window) runs a float32 reference on CPU."""
    float32_attention = case["flags"].get("sequence_parallel_attention") or (
        case["flags"].get("specialize_attention_masks", True)
        and any(block[0] in ("attention", "masked_sdpa") for block in case["blocks"]))
    if float32_attention:
        return max(TOLERANCE[case["dtype"]], SEQUENCE_PARALLEL_TOLERANCE)
    return TOLERANCE[case["dtype"]]


def _compare_parameters(errors: dict, step: str, model: FuzzModel, reference: FuzzModel,
                        case: dict, truth: dict | None = None) -> None:
    """Gradients of every parameter; in a run of several ranks the replicated ones summed over the
    ranks (each saw its rows of the sequence) and the tensor-parallel ones against their rows /
    columns of the whole model's gradient."""
    world = case["world"]
    for (name, param), (_, ref) in zip(model.named_parameters(), reference.named_parameters()):
        grad, expected = param.grad, ref.grad
        if world > 1 and grad is not None:
            block = model.blocks[int(name.split(".")[1])]
            if block[0] == "tp_mlp":
                width = ref.shape[0 if name.endswith("up.weight") else -1] // world
                rows = slice(model.rank * width, (model.rank + 1) * width)
                if name.endswith("up.weight"):
                    expected = expected[rows]
                elif name.endswith("down.weight"):
                    expected = expected[:, rows]
            else:
                grad = grad.clone()
                dist.all_reduce(grad)
        _compare(errors, f"{step}.{name}.grad", grad, expected, case,
                 truth and truth["param_grads"].get(name))


def repro(case: dict) -> str:
    return f"PYTHONPATH=. python tests/fuzz/fuzz_models.py '{json.dumps(case, sort_keys=True)}'"


def _rerun(rank: int, world: int, case: dict) -> dict:
    return run_case(case)


def main(argv: list[str]) -> int:
    case = json.loads(argv[1])
    if case["world"] > 1:
        from graphopt.distributed.launch import spawn
        results = spawn(_rerun, case["world"], case)
    else:
        results = [run_case(case)]
    for rank, result in enumerate(results):
        bad = {name: round(e, 2) for name, e in result["errors"].items() if e > 1}
        print(f"rank {rank}: worst {result['worst']:.3g} x tolerance; over it: {bad or 'none'}; "
              f"passes: {result['passes']}")
    return int(any(r["worst"] > 1 for r in results))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
