"""attention_selection on transformers' Llama (tiny random configs) and graphopt's own Llama.

What is checked: which modules are found and what they read; one compiled graph across steps with
different selections (no recompiles); outputs and every gradient equal to a reference that runs
each attention module by hand on the same samples only; everything selected equals the model
without the pass; a module at capacity 0 gives its parameters no gradient; LoRA adapters (peft) on
q/k/v/o; refusals (a module that mixes samples, evaluation graphs); flags; and the same through
Inductor (slow).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt.ops.attention_selection import selector
from graphopt.passes.plans import BudgetNotMetWarning

transformers = pytest.importorskip("transformers")

B, S, HIDDEN = 4, 8, 32


@pytest.fixture(autouse=True)
def _fresh_selector():
    selector().reset()
    yield
    selector().reset()


def _llama(layers: int = 2, seed: int = 0, attention: str = "sdpa") -> nn.Module:
    config = transformers.LlamaConfig(hidden_size=HIDDEN, intermediate_size=64,
                                      num_hidden_layers=layers, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=50,
                                      attn_implementation=attention)
    torch.manual_seed(seed)
    return transformers.LlamaModel(config)


def _step(model: nn.Module, fn, x: torch.Tensor):
    """Output, input gradient and parameter gradients of loss = sum(out * weights)."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    torch.manual_seed(1)
    (out * torch.randn_like(out)).sum().backward()
    grads = {name: p.grad.clone() if p.grad is not None else None
             for name, p in model.named_parameters()}
    return out.detach(), x.grad.clone(), grads


def _hidden(model):
    return lambda e: model(inputs_embeds=e, use_cache=False).last_hidden_state


def _compiled(model, **flags):
    flags.setdefault("codegen", "eager")
    return torch.compile(_hidden(model), dynamic=False,
                         backend=graphopt.backend(attention_selection=True, debug=True, **flags))


def _hand_skipped(model: nn.Module, chosen: list[list[int]]) -> None:
    """Make ``model``'s layers' attention run, in eager, on its chosen samples only (the others get
    zero)."""
    for layer, idx in zip(model.layers, chosen):
        run = layer.self_attn.forward

        def forward(hidden_states, *args, _run=run, _idx=torch.tensor(idx, dtype=torch.long),
                    **kwargs):
            batch = hidden_states.shape[0]
            if not len(_idx):
                return torch.zeros_like(hidden_states), None
            pick = {k: v[_idx] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == batch
                    else v for k, v in kwargs.items()}
            out, weights = _run(hidden_states[_idx], *args, **pick)
            return torch.zeros((batch, *out.shape[1:]), dtype=out.dtype).index_copy(0, _idx, out), \
                weights
        layer.self_attn.forward = forward


def _reference(model: nn.Module, chosen: list[list[int]], x: torch.Tensor,
               inner=lambda m: m):
    """_step on a hand-skipped copy of ``model`` (a copy, so the compiled model's guards never see
    the patch); ``inner(copy)``: the Llama inside it (peft wraps it)."""
    copied = copy.deepcopy(model)
    _hand_skipped(inner(copied), chosen)
    return _step(copied, _hidden(inner(copied)), x)


def _run_with(compiled, model, x, chosen: list[list[int]]):
    names = [m.name for m in selector().modules()]
    selector().choose(dict(zip(names, chosen)))
    return _step(model, compiled, x)


def _assert_same(ours, reference, atol=1e-5):
    out, x_grad, grads = ours
    ref_out, ref_x_grad, ref_grads = reference
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=1e-4)
    torch.testing.assert_close(x_grad, ref_x_grad, atol=atol, rtol=1e-4)
    for name, grad in grads.items():
        if ref_grads[name] is None:
            assert grad is None or not grad.any(), name
        else:
            torch.testing.assert_close(grad, ref_grads[name], atol=atol, rtol=1e-4, msg=name)


# --- finding modules ------------------------------------------------------------------------------

def test_modules_are_the_attention_blocks_with_their_batched_inputs():
    from graphopt.passes.attention_modules import find_attention_modules
    model = _llama()
    captured = []

    def backend(gm, example_inputs):
        captured.append(gm)
        return gm.forward
    torch.compile(_hidden(model), backend=backend, dynamic=False)(torch.randn(B, S, HIDDEN))
    modules, refusals = find_attention_modules(captured[0])
    assert [m.path.split(".", 1)[1] for m in modules] == ["layers.0.self_attn", "layers.1.self_attn"]
    assert not refusals
    for module in modules:
        assert len(module.projections) == 4 and len(module.outputs) == 1
        names = {n.name for n in module.inputs}
        assert {"attention_mask", "cos_2", "sin_2"} <= names  # the mask, the rotary tables


# --- one graph, the reference's numerics ----------------------------------------------------------

def test_one_graph_serves_steps_with_different_selections_and_matches_hand_skipped_modules():
    model = _llama()
    compiled = _compiled(model, attention_selection_kept_fraction=0.5)
    torch._dynamo.utils.counters.clear()
    x = torch.randn(B, S, HIDDEN)
    _step(model, compiled, x)  # compiles, with the graph's own random draw
    selections = [[[0, 3], [1, 2]], [[1, 2], [0, 1]], [[2, 3], [0, 3]]]
    for chosen in selections:
        ours = _run_with(compiled, model, x, chosen)
        record = selector().end_step()
        assert [info["selected"] for info in record["modules"].values()] == chosen
        _assert_same(ours, _reference(model, chosen, x))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert len(selector().graphs) == 1


def test_a_float64_model_is_selected_alike():
    """Found by the fuzzer: the scores' norms were asked for in float32 of float64 activations,
    which linalg.vector_norm refuses (a RuntimeError at the first step)."""
    model = _llama().double()
    compiled = _compiled(model, attention_selection_kept_fraction=0.5)
    x = torch.randn(B, S, HIDDEN, dtype=torch.float64)
    _step(model, compiled, x)
    chosen = [[0, 3], [1, 2]]
    ours = _run_with(compiled, model, x, chosen)
    record = selector().end_step()
    scores = [info["scores"] for info in record["modules"].values()]
    assert len(scores) == 2 and all(len(row) == 2 and min(row) > 0 for row in scores), scores
    _assert_same(ours, _reference(model, chosen, x), atol=1e-10)


def test_written_out_attention_is_selected_alike():
    """attn_implementation='eager': matmul, mask add, softmax, matmul instead of SDPA."""
    model = _llama(attention="eager")
    compiled = _compiled(model, attention_selection_kept_fraction=0.5)
    x = torch.randn(B, S, HIDDEN)
    _step(model, compiled, x)
    assert [m.capacity for m in selector().modules()] == [2, 2]
    chosen = [[0, 3], [1, 2]]
    _assert_same(_run_with(compiled, model, x, chosen), _reference(model, chosen, x))


def test_without_a_plan_each_step_draws_a_new_random_selection():
    model = _llama()
    compiled = _compiled(model, attention_selection_kept_fraction=0.5)
    x = torch.randn(B, S, HIDDEN)
    seen = set()
    for _ in range(5):
        _step(model, compiled, x)
        record = selector().end_step()
        seen.add(tuple(tuple(info["selected"]) for info in record["modules"].values()))
        assert all(len(info["selected"]) == 2 and all(s > 0 for s in info["scores"])
                   for info in record["modules"].values())
    assert len(seen) > 1


def test_everything_selected_is_the_model_without_the_pass():
    model = _llama()
    x = torch.randn(B, S, HIDDEN)
    plain = torch.compile(_hidden(model), dynamic=False, backend=graphopt.backend(codegen="eager"))
    reference = _step(model, plain, x)
    torch._dynamo.reset()
    ours = _step(model, _compiled(model, attention_selection_kept_fraction=1.0), x)
    assert torch.equal(ours[0], reference[0]) and torch.equal(ours[1], reference[1])
    for name, grad in ours[2].items():
        expected = reference[2][name]
        assert (grad is None and expected is None) or torch.equal(grad, expected), name
    record = selector().end_step()  # scores are recorded for modules that run on every sample
    assert all(info["selected"] == list(range(B)) for info in record["modules"].values())


def test_a_module_at_capacity_zero_gives_its_parameters_no_gradient():
    model = _llama()
    x = torch.randn(B, S, HIDDEN)
    compiled = _compiled(model, attention_selection_layer_fractions=(0.0, 0.5))
    _step(model, compiled, x)
    ours = _run_with(compiled, model, x, [[], [1, 3]])
    _assert_same(ours, _reference(model, [[], [1, 3]], x))
    for name, grad in ours[2].items():
        if "layers.0.self_attn" in name:
            assert grad is None or not grad.any(), name


class _Attention(nn.Module):
    def __init__(self, dim: int = 8, heads: int = 2):
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, h):
        b, s, d = h.shape
        q, k, v = [t.view(b, s, self.heads, d // self.heads).transpose(1, 2)
                   for t in self.qkv(h).chunk(3, dim=-1)]
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d))


class _AttentionInARow(nn.Module):
    """Two attention modules with nothing between them: the second reads the first's h + y."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Attention(), _Attention()])
        self.chosen: list = []

    def forward(self, h):
        for layer, chosen in zip(self.layers, self.chosen or [None] * len(self.layers)):
            if chosen is None:
                h = h + layer(h)
            else:
                idx = torch.tensor(chosen, dtype=torch.long)
                y = torch.zeros_like(h)
                h = h + (y.index_copy(0, idx, layer(h[idx])) if chosen else y)
        return h


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.0, 0.5), (1.0, 0.5)])
def test_attention_modules_in_a_row_are_each_selected(fractions):
    """Found by the fuzzer: the second module's input is the first's residual add, which the
    first's rewrite replaces (by add_selected, or by h where the capacity is 0): the pass read the
    erased add (StopIteration at compile). Each module now runs on its own samples."""
    torch.manual_seed(0)
    model = _AttentionInARow()
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, dynamic=False, backend=graphopt.backend(
        codegen="eager", attention_selection=True, attention_selection_layer_fractions=fractions))
    x = torch.randn(B, S, 8)
    _step(model, compiled, x)
    chosen = [list(range(B)) if f == 1.0 else [] if f == 0.0 else [1, 2] for f in fractions]
    names = [m.name for m in selector().modules()]
    selector().choose({n: c for n, c in zip(names, chosen) if 0 < len(c) < B})
    ours = _step(model, compiled, x)
    reference.chosen = chosen
    _assert_same(ours, _step(reference, reference, x))


def test_lora_adapters_and_frozen_weights_are_skipped_alike():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_llama(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        lora_dropout=0.0, init_lora_weights=False))
    base = model.base_model.model
    x = torch.randn(B, S, HIDDEN)
    compiled = _compiled(base, attention_selection_kept_fraction=0.5)
    _step(model, compiled, x)
    chosen = [[0, 2], [1, 3]]
    ours = _run_with(compiled, model, x, chosen)
    _assert_same(ours, _reference(model, chosen, x, inner=lambda m: m.base_model.model))
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in name for name in trained)
    assert all(ours[2][name] is not None for name in trained if "self_attn" in name)


def test_graphopt_llama_with_per_sample_rotary_tables():
    from graphopt.models.llama import Llama, LlamaConfig
    model = Llama(LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=64))
    tokens = torch.randint(0, 64, (B, S))
    flags = dict(codegen="eager", attention_selection=True, attention_selection_kept_fraction=0.5)
    compiled = torch.compile(model, dynamic=False, backend=graphopt.backend(**flags))
    compiled(tokens).sum().backward()
    names = [m.name for m in selector().modules()]
    assert len(names) == 2 and all(m.reference == "residual" for m in selector().modules())
    selector().choose(dict(zip(names, [[0, 1], [2, 3]])))
    model.zero_grad()
    out = compiled(tokens)
    out.sum().backward()
    wq0 = model.layers[0].attention.wq.weight.grad.clone()
    # by hand: layer 0's attention on samples 0, 1 only
    model.zero_grad()
    originals = [layer.attention.forward for layer in model.layers]
    for layer, idx in zip(model.layers, ([0, 1], [2, 3])):
        def forward(x, cos, sin, _run=layer.attention.forward, _idx=torch.tensor(idx)):
            out = _run(x[_idx], cos[_idx], sin[_idx])
            return torch.zeros_like(x).index_copy(0, _idx, out)
        layer.attention.forward = forward
    try:
        reference = model(tokens)
        reference.sum().backward()
    finally:
        for layer, original in zip(model.layers, originals):
            layer.attention.forward = original
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(wq0, model.layers[0].attention.wq.weight.grad, atol=1e-5, rtol=1e-4)


# --- what is left alone ---------------------------------------------------------------------------

class _BatchMixingAttention(nn.Module):
    """Attention that subtracts the batch mean of its input: not per sample."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(HIDDEN, 3 * HIDDEN)
        self.out = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x):
        x = x - x.mean(0, keepdim=True)
        q, k, v = self.qkv(x).view(x.shape[0], S, 3, 4, 8).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(o.transpose(1, 2).reshape(x.shape[0], S, HIDDEN))


class _Block(nn.Module):
    def __init__(self, attention: nn.Module):
        super().__init__()
        self.attention = attention

    def forward(self, x):
        return x + self.attention(x)


def _pass_result(module: nn.Module, x: torch.Tensor, **flags):
    from graphopt.passes.attention_selection import select_attention
    from graphopt.passes.manager import PassContext
    captured = []

    def backend(gm, example_inputs):
        captured.append(gm)
        return gm.forward
    torch.compile(module, backend=backend, dynamic=False)(x)
    cfg = graphopt.config.snapshot(attention_selection=True, **flags)
    return select_attention(captured[0], PassContext("pre_grad", cfg, "test_graph"))


def test_a_module_that_mixes_samples_is_left_whole_and_says_why():
    result = _pass_result(_Block(_BatchMixingAttention()), torch.randn(B, S, HIDDEN))
    assert not result.modified
    assert any("along dim 0" in reason or "dim 0" in reason for reason in result.refusals), \
        result.refusals


def test_an_evaluation_graph_keeps_every_attention():
    model = _llama()
    compiled = _compiled(model, attention_selection_kept_fraction=0.5)
    x = torch.randn(B, S, HIDDEN)
    with torch.no_grad():
        out = compiled(x)
        torch.testing.assert_close(out, _hidden(model)(x), atol=1e-5, rtol=1e-4)
    assert selector().graphs == []


def test_per_layer_fractions_must_name_every_module():
    with pytest.raises(ValueError, match="has 3 entries but graph .* has 1 attention modules"):
        _pass_result(_Block(_StandardAttention()), torch.randn(B, S, HIDDEN),
                     attention_selection_layer_fractions=(1.0, 0.5, 0.5))
    with pytest.raises(ValueError, match="'layer' needs per-module capacities"):
        _pass_result(_Block(_StandardAttention()), torch.randn(B, S, HIDDEN),
                     attention_selection_strategy="layer")


class _StandardAttention(_BatchMixingAttention):
    def forward(self, x):
        q, k, v = self.qkv(x).view(x.shape[0], S, 3, 4, 8).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(o.transpose(1, 2).reshape(x.shape[0], S, HIDDEN))


def test_flags_are_checked_where_they_are_set():
    with pytest.raises(graphopt.config.ConfigError, match=r"is not in \(0, 1\]"):
        graphopt.config.patch(attention_selection_kept_fraction=0.0)
    with pytest.raises(graphopt.config.ConfigError, match="more than 1"):
        graphopt.config.patch(attention_selection_layer_fractions=(0.5, 1.5))
    with pytest.raises(graphopt.config.ConfigError, match="did you mean 'score'"):
        graphopt.config.patch(attention_selection_strategy="scores")
    assert graphopt.config.snapshot(attention_selection_layer_fractions="1, 0.5,0") \
        .attention_selection_layer_fractions == (1.0, 0.5, 0.0)


def test_choose_rejects_a_selection_that_does_not_fill_the_capacity():
    model = _llama()
    compiled = _compiled(model, attention_selection_kept_fraction=0.5)
    _step(model, compiled, torch.randn(B, S, HIDDEN))
    name = selector().modules()[0].name
    with pytest.raises(ValueError, match="runs on 2 distinct samples of 4"):
        selector().choose({name: [0, 1, 2]})
    with pytest.raises(KeyError, match="no selected attention module"):
        selector().choose({"nope": [0, 1]})


# --- with the memory planners ---------------------------------------------------------------------

@pytest.mark.parametrize("flags", [dict(memory_budget="1KiB"),
                                   dict(memory_budget=0.3, offload_activations=True)],
                         ids=["recompute_everything", "budget_and_offload"])
def test_the_graphs_own_draw_survives_recomputation_and_offload(flags):
    """Under a budget no plan meets (the planner recomputes all it can) and with offload, the
    backward uses the samples the forward drew: the draw is a random op and the selection ops are
    graphopt:: ops, never recomputed. Each step's recorded selection, run by hand, gives the same
    output and gradients."""
    model = _llama()
    compiled = _compiled(model, attention_selection_kept_fraction=0.5, **flags)
    x = torch.randn(B, S, HIDDEN)
    draws = []
    for _ in range(3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BudgetNotMetWarning)
            ours = _step(model, compiled, x)
        chosen = [info["selected"] for info in selector().end_step()["modules"].values()]
        draws.append(chosen)
        _assert_same(ours, _reference(model, chosen, x), atol=1e-4)
    assert all(len(module) == B // 2 for chosen in draws for module in chosen)


# --- through Inductor -----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("flags", [{}, dict(memory_budget=0.3, offload_activations=True)],
                         ids=["selection", "with_budget_and_offload"])
def test_inductor_graph_matches_hand_skipped_modules(flags):
    model = _llama()
    compiled = _compiled(model, codegen="inductor", attention_selection_kept_fraction=0.5, **flags)
    torch._dynamo.utils.counters.clear()
    x = torch.randn(B, S, HIDDEN)
    _step(model, compiled, x)
    for chosen in ([[0, 3], [1, 2]], [[1, 2], [0, 3]]):
        ours = _run_with(compiled, model, x, chosen)
        selector().end_step()
        _assert_same(ours, _reference(model, chosen, x), atol=1e-4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_the_dump_shows_capacities_and_work_and_the_per_step_log_the_selections(tmp_path):
    import json
    model = _llama()
    compiled = _compiled(model, attention_selection_kept_fraction=0.5, dump_dir=str(tmp_path))
    x = torch.randn(B, S, HIDDEN)
    for _ in range(2):
        _step(model, compiled, x)
        selector().end_step()
    (folder,) = [p for p in tmp_path.iterdir() if (p / "summary.json").exists()]
    notes = json.loads((folder / "summary.json").read_text())["notes"]["attention_selection"]
    assert [m["capacity"] for m in notes["modules"]] == [2, 2]
    assert all(m["flops_per_sample"] > 0 for m in notes["modules"])
    assert "capacity / batch" in (folder / "attention_selection.txt").read_text()
    steps = [json.loads(line) for line in
             (folder / "attention_selection_steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [0, 1]
    for record in steps:
        assert all(len(m["selected"]) == 2 and len(m["scores"]) == 2
                   for m in record["modules"].values())
