"""specialize_attention_masks on transformers models compiled as users compile them: proven masks
become is_causal SDPA or graphopt's masked kernel, numerics stay those of eager, and what cannot
be proven stays as it was (with the reason in the pass's refusals)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import graphopt
from attention_helpers import tiny_model, transformers_version
from graphopt.debug.dump import compile_summaries

transformers = pytest.importorskip("transformers")
ISOLATES_DOCUMENTS = BUILDS_SDPA_MASKS = transformers_version() >= (4, 53)  # see attention_helpers

S = 16
PACKED = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3]])


def run(model, tokens, **kwargs):
    """(logits, {name: grad}) of one forward + backward."""
    model.zero_grad()
    logits = model(tokens, use_cache=False, **kwargs).logits
    logits.square().mean().backward()
    return logits.detach(), {n.removeprefix("_orig_mod."): p.grad.clone()
                             for n, p in model.named_parameters()}


def pass_entries() -> list[dict]:
    return [p for s in compile_summaries() for p in s["passes"]
            if p["pass"] == "specialize_attention_masks"]


@pytest.mark.parametrize("kind, attn, packed, became", [
    ("llama", "sdpa", False, "sdpa is_causal"),
    ("llama", "eager", False, "sdpa is_causal"),
    ("mistral", "sdpa", False, "graphopt.flash_attention (causal + window 5)"),
    ("mistral", "eager", True, "graphopt.flash_attention (causal + documents + window 5)"),
    ("llama", "sdpa", True, "graphopt.flash_attention (causal + documents)"),
])
def test_transformers_attention_gets_the_kernel_of_its_mask(kind, attn, packed, became):
    model = tiny_model(kind, attn)
    tokens = torch.randint(0, 64, (2, S))
    kwargs = dict(position_ids=PACKED.expand(2, -1)) if packed else {}
    expected = run(model, tokens, **kwargs)
    compiled = torch.compile(model, backend=graphopt.backend(codegen="eager"))
    logits, grads = run(compiled, tokens, **kwargs)
    torch.testing.assert_close(logits, expected[0], atol=1e-5, rtol=1e-4)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[1][name], atol=1e-5, rtol=1e-4)
    (entry,) = pass_entries()
    if not ISOLATES_DOCUMENTS:
        became = became.replace("causal + documents)", "causal)").replace(
            "causal + documents + ", "causal + ")
        if became == "graphopt.flash_attention (causal)":
            became = "sdpa is_causal"
    if attn == "sdpa" and became == "sdpa is_causal" and not BUILDS_SDPA_MASKS:
        assert not entry["modified"] and not entry["refusals"], entry
        return
    assert entry["stats"]["became"] == {became: 2} and not entry["refusals"], entry
    assert any("mask" in name for name in entry["removed_nodes"])


def test_before_and_after_are_in_the_dump(tmp_path):
    model = tiny_model("llama", "eager")
    torch.compile(model, backend=graphopt.backend(codegen="eager", dump_dir=str(tmp_path)))(
        torch.randint(0, 64, (1, S)), use_cache=False)
    after = next(tmp_path.rglob("*pre_grad.specialize_attention_masks.py")).read_text()
    before = next(tmp_path.rglob("*_pre_grad.py")).read_text()
    assert "softmax" in before and "scaled_dot_product_attention" not in before
    assert "softmax" not in after and after.count("is_causal = True") == 2


def _padding_masked(q, k, v, padding):
    keep = torch.ones(S, S, dtype=torch.bool).tril() & padding[:, None, None, :].bool()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


def _decomposed_with_dropout(q, k, v):
    mask = torch.full((S, S), float("-inf")).triu(1)
    probs = F.dropout(torch.softmax(q @ k.transpose(-2, -1) + mask, dim=-1), p=0.2, training=True)
    return probs @ v


@pytest.mark.parametrize("fn, extra, reason", [
    (_padding_masked, (torch.ones(2, S),), "mask not proven"),
    (_decomposed_with_dropout, (), "other random numbers"),
])
def test_what_cannot_be_specialised_is_left_with_the_reason(fn, extra, reason):
    args = tuple(torch.randn(2, 2, S, 8) for _ in range(3)) + extra
    torch.manual_seed(1)
    expected = fn(*args)
    torch.manual_seed(1)
    out = torch.compile(fn, backend=graphopt.backend(codegen="eager"))(*args)
    torch.testing.assert_close(out, expected)
    (entry,) = pass_entries()
    assert not entry["modified"] and reason in entry["refusals"][0], entry["refusals"]


def test_the_pass_can_be_switched_off():
    model = tiny_model("llama", "sdpa")
    torch.compile(model, backend=graphopt.backend(codegen="eager",
                                                  specialize_attention_masks=False))(
        torch.randint(0, 64, (1, S)), use_cache=False)
    assert pass_entries() == []


@pytest.mark.slow
@pytest.mark.parametrize("packed", [False, True])
def test_transformers_llama_through_inductor(packed, monkeypatch):
    """The specialised graph through the default codegen: same logits and gradients as eager.
    Packed documents go through graphopt::flash_attention, whose lowering is Inductor's fallback
    kernel (an argument named ``kernel`` in the op's schema once broke it there); the positions'
    documents check reaches every attention, forward and backward, as the same tensor, so none
    reads them again (cuDNN made to look eligible on CPU, so the check is read)."""
    from graphopt.kernels import launch_counts
    from graphopt.ops import attention as attention_ops
    monkeypatch.setattr(attention_ops, "cudnn_eligible",
                        lambda q, k, kernel="auto", masked=False: kernel == "auto")
    model = tiny_model("llama", "sdpa")
    tokens = torch.randint(0, 64, (2, S))
    kwargs = dict(position_ids=PACKED.expand(2, -1)) if packed else {}
    expected = run(model, tokens, **kwargs)
    blocking = launch_counts["positions_read_blocking"]
    logits, grads = run(torch.compile(model, backend="graphopt"), tokens, **kwargs)
    assert launch_counts["positions_read_blocking"] == blocking
    torch.testing.assert_close(logits, expected[0], atol=1e-4, rtol=1e-4)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[1][name], atol=1e-4, rtol=1e-4)
    (entry,) = pass_entries()
    became = "graphopt.flash_attention (causal + documents)" if packed else "sdpa is_causal"
    if packed and not ISOLATES_DOCUMENTS:
        became = "sdpa is_causal"
    assert entry["stats"]["became"] == {became: 2}


def test_positions_are_read_on_the_host_once_per_tensor_ahead_of_the_attention(monkeypatch):
    """Position ids passed in (one document per row, as a benchmark passes arange; or packed) go
    through one graphopt.checked_positions where they enter the graph; every attention of the step,
    forward and backward, reads that check (no blocking read), where cuDNN may run. On one H100
    with offload, the blocking read twice per layer and step waited behind the offload copies
    (transformers' Llama forwards 15-18 ms slower at 16K). cuDNN is made to look eligible on CPU, so
    the check is read; the attention then runs the float32 reference either way. (Through
    Inductor: test_transformers_llama_through_inductor.)"""
    from graphopt.kernels import launch_counts
    from graphopt.ops import attention as attention_ops
    monkeypatch.setattr(attention_ops, "cudnn_eligible",
                        lambda q, k, kernel="auto", masked=False: kernel == "auto")
    if not ISOLATES_DOCUMENTS:
        pytest.skip("transformers < 4.53 builds no document mask from position ids")
    for positions in (torch.arange(S).unsqueeze(0), PACKED):
        torch._dynamo.reset()
        model = tiny_model("llama", "sdpa")
        tokens = torch.randint(0, 64, (2, S))
        kwargs = dict(position_ids=positions.expand(2, -1))
        expected = run(model, tokens, **kwargs)
        blocking = launch_counts["positions_read_blocking"]
        compiled = torch.compile(model, backend=graphopt.backend(codegen="eager"))
        for _ in range(2):
            logits, grads = run(compiled, tokens, **kwargs)
        assert launch_counts["positions_read_blocking"] == blocking
        torch.testing.assert_close(logits, expected[0], atol=1e-4, rtol=1e-4)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected[1][name], atol=1e-4, rtol=1e-4)
        entry = pass_entries()[-1]
        assert entry["stats"]["became"] == {"graphopt.flash_attention (causal + documents)": 2}
        checks = [n for n in entry["added_nodes"] if n.startswith("checked_positions")]
        assert checks == ["checked_positions_default"]
