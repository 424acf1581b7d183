"""Overlapped GEMM + collective ops and the overlap_matmul_collectives pass over gloo, P = 2 and 3.

One spawn of 3 processes covers both world sizes: P = 2 runs on the subgroup of ranks {0, 1}
(rank 2 sits those cases out), P = 3 on WORLD. Outputs and gradients with the pass on must equal
the unrewritten graph (chunking changes only GEMM blocking: float64 agrees to rounding).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from graphopt.distributed.launch import spawn

WORLD = 3
TOL = dict(rtol=1e-10, atol=1e-10)


def _groups() -> dict[int, dist.ProcessGroup]:
    return {2: dist.new_group([0, 1]), 3: dist.group.WORLD}


def _op_cases(rank: int, groups) -> int:
    """Hypothesis over kind, P, shapes and chunk counts; every rank draws the same examples."""
    from hypothesis import Phase, given, settings, strategies as st
    import graphopt.ops.matmul_collectives  # noqa: F401
    from graphopt import _compat
    ops = torch.ops.graphopt
    checked = []

    @settings(max_examples=12, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate])
    @given(kind=st.sampled_from(["all_reduce", "addmm", "bmm", "reduce_scatter", "all_gather"]),
           p=st.sampled_from([2, 3]), rows=st.integers(1, 9), n=st.integers(1, 7),
           k=st.integers(1, 7), chunks=st.integers(1, 5), dim=st.integers(0, 1),
           seed=st.integers(0, 1000))
    def case(kind, p, rows, n, k, chunks, dim, seed):
        if rank >= p:
            return
        group = groups[p]
        name = _compat.group_name(group)
        gen = torch.Generator().manual_seed(seed * 10 + rank)
        rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
        if kind in ("all_reduce", "addmm"):
            a, b = rand(rows, k), rand(k, n)
            bias = rand(n) if kind == "addmm" else None
            expected = a @ b + (bias if bias is not None else 0)
            dist.all_reduce(expected, group=group)
            got = ops.matmul_all_reduce(a, b, bias, name, "chunked", chunks, 0)
        elif kind == "bmm":
            a, b = rand(2, rows, k), rand(2, k, n)
            expected = torch.bmm(a, b)
            dist.all_reduce(expected, group=group)
            got = ops.matmul_all_reduce(a, b, None, name, "chunked", chunks, 0)
        elif kind == "reduce_scatter":
            a, b = rand(2, rows * p, k) if dim else rand(rows * p, 2, k), rand(k, n)
            full = a @ b
            dist.all_reduce(full, group=group)
            expected = full.chunk(p, dim=dim)[dist.get_rank(group)]
            got = ops.matmul_reduce_scatter(a, b, name, p, dim, "chunked", chunks, 0)
        else:
            shard, b = (rand(2, rows, k) if dim else rand(rows, 2, k)), rand(k, n)
            parts = [torch.empty_like(shard) for _ in range(p)]
            dist.all_gather(parts, shard, group=group)
            gathered_ref = torch.cat(parts, dim=dim)
            gathered, got = ops.all_gather_matmul(shard, b, name, p, dim, chunks)
            torch.testing.assert_close(gathered, gathered_ref, **TOL)
            expected = gathered_ref @ b
        torch.testing.assert_close(got, expected, **TOL)
        checked.append(kind)

    case()
    return len(checked)


LAYOUTS = ("all_reduce", "gather_scatter", "in_place", "in_place_3d")


class _Projections(nn.Module):
    """x -> relu(x @ w1) @ w2, with the collectives of a TP MLP written as functional collectives."""

    def __init__(self, group, p: int, layout: str):
        super().__init__()
        gen = torch.Generator().manual_seed(7)  # the same weights on every rank
        self.w1 = nn.Parameter(torch.randn(6, 8, generator=gen, dtype=torch.float64))
        self.w2 = nn.Parameter(torch.randn(8, 5, generator=gen, dtype=torch.float64))
        self.bias = nn.Parameter(torch.randn(5, generator=gen, dtype=torch.float64))
        self.bias_1 = nn.Parameter(torch.randn(8, generator=gen, dtype=torch.float64))
        from graphopt import _compat
        self.group, self.group_name, self.p, self.layout = group, _compat.group_name(group), p, layout

    def forward(self, x):
        import torch.distributed._functional_collectives as funcol
        if self.layout == "all_reduce":       # row-parallel output, bias inside the reduction
            hidden = torch.relu(x @ self.w1)
            out = torch.addmm(self.bias, hidden.flatten(0, 1), self.w2)
            return funcol.wait_tensor(funcol.all_reduce(out, "sum", self.group_name))
        if self.layout == "in_place":         # dist.all_reduce as a user writes it
            out = x.flatten(0, 1) @ self.w1
            dist.all_reduce(out, group=self.group)
            return torch.relu(out) @ self.w2
        if self.layout == "in_place_3d":      # ... of a 3-D linear with a bias
            out = nn.functional.linear(x, self.w1.t(), self.bias_1)
            dist.all_reduce(out, group=self.group)
            return torch.relu(out) @ self.w2
        gathered = funcol.wait_tensor(funcol.all_gather_tensor(x, 0, self.group_name))
        hidden = torch.relu(gathered.flatten(0, 1) @ self.w1)
        return funcol.wait_tensor(funcol.reduce_scatter_tensor(hidden @ self.w2, "sum", 0,
                                                               self.group_name))


def _compiled_cases(rank: int, groups) -> list[str]:
    import graphopt
    from graphopt.debug.dump import clear_compile_summaries, compile_summaries
    done = []
    for p, group in groups.items():
        if rank >= p:
            continue
        for layout in LAYOUTS:
            torch._dynamo.reset()
            clear_compile_summaries()
            x = torch.randn(4, 3, 6, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
            results = []
            for overlap in (False, True):
                model = _Projections(group, p, layout)
                compiled = torch.compile(model, backend=graphopt.backend(
                    codegen="eager", overlap_matmul_collectives=overlap, overlap_mode="chunked",
                    overlap_chunks=3, debug=True))
                xi = x.clone().requires_grad_()
                out = compiled(xi)
                out.square().sum().backward()
                results.append((out, xi.grad, model.w1.grad, model.w2.grad, model.bias.grad,
                                model.bias_1.grad))
            fused_sites = [entry["matched"] for summary in compile_summaries()
                           for entry in summary["passes"]
                           if entry["pass"] == "overlap_matmul_collectives" and entry.get("modified")]
            assert fused_sites, f"{layout}@{p}: the overlap pass fused nothing"
            for reference, fused in zip(*results):
                if reference is None and fused is None:
                    continue
                torch.testing.assert_close(fused, reference, **TOL)
            done.append(f"{layout}@{p}")
    return done


def _worker(rank: int, world: int) -> tuple[int, list[str]]:
    groups = _groups()
    return _op_cases(rank, groups), _compiled_cases(rank, groups)


def test_ops_and_pass_match_unfused_on_gloo_p2_p3():
    results = spawn(_worker, WORLD)
    checked, compiled = zip(*results)
    assert checked[0] > 0 and checked[2] > 0  # both world sizes drew examples
    assert compiled[0] == [f"{layout}@{p}" for p in (2, 3) for layout in LAYOUTS]
    assert compiled[2] == [f"{layout}@3" for layout in LAYOUTS]


def _llama_tensor_parallel(rank: int, world: int) -> dict[str, float]:
    import graphopt
    from graphopt.models.llama import Llama, LlamaConfig, llama_loss, parallelize_llama
    from graphopt.debug.dump import compile_summaries
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,))
    cfg = LlamaConfig.tiny(n_layers=LLAMA_LAYERS)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    targets = torch.roll(tokens, -1, dims=1)
    runs = []
    from graphopt.debug.dump import clear_compile_summaries
    clear_compile_summaries()
    for overlap in (False, True):
        torch.manual_seed(0)
        model = parallelize_llama(Llama(cfg).double(), mesh)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=graphopt.backend(
            codegen="eager", overlap_matmul_collectives=overlap, overlap_mode="chunked"))
        loss = llama_loss(compiled(tokens), targets)
        loss.backward()
        grads = {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
                 for name, p in model.named_parameters()}
        runs.append((loss.detach(), grads))
    fused_sites = sum(entry.get("matched", 0) for summary in compile_summaries()
                      for entry in summary["passes"]
                      if entry["pass"] == "overlap_matmul_collectives" and entry.get("modified"))
    (loss_ref, grads_ref), (loss, grads) = runs
    errors = {"loss": (loss - loss_ref).abs().item(), "fused_sites": fused_sites}
    errors["grad"] = max((grads[n] - grads_ref[n]).abs().max().item() for n in grads_ref)
    return errors


def _sequence_parallel_mlp(world: int) -> float:
    """DTensor column -> row parallel MLP on sequence shards (dim 1): all-gather and reduce-scatter
    go through DTensor's split/cat layout, which the pass must map onto gather/scatter dim 1."""
    import graphopt
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    mesh = init_device_mesh("cpu", (world,))
    x = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(dist.get_rank()),
                    dtype=torch.float64)
    runs = []
    for overlap in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8, bias=False), nn.ReLU(), nn.Linear(8, 6, bias=False))
        model = parallelize_module(model.double(), mesh, {
            "0": ColwiseParallel(input_layouts=Shard(1)), "2": RowwiseParallel(output_layouts=Shard(1))})
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=graphopt.backend(
            codegen="eager", overlap_matmul_collectives=overlap, overlap_mode="chunked", overlap_chunks=2))
        xi = x.clone().requires_grad_()
        out = compiled(xi)
        out.square().sum().backward()
        runs.append([out, xi.grad] + [p.grad.full_tensor() for p in model.parameters()])
    return max((a - b).abs().max().item() for a, b in zip(*runs))


def _tensor_parallel_models(rank: int, world: int) -> dict[str, float]:
    return {**_llama_tensor_parallel(rank, world), "sequence_parallel_mlp": _sequence_parallel_mlp(world)}


def test_tensor_parallel_models_with_and_without_pass_agree():
    for errors in spawn(_tensor_parallel_models, 2):
        assert errors["sequence_parallel_mlp"] < 1e-10, errors
        # per layer: wo and w2 forward all-reduces, plus the wq/wk/wv and w1/w3 input-grad ones
        assert errors["fused_sites"] >= 2 * LLAMA_LAYERS
        assert errors["loss"] < 1e-10 and errors["grad"] < 1e-10, errors


LLAMA_LAYERS = 1
