"""shard_attention on Dynamo graphs: every attention becomes graphopt::sp_attention, or the compile
fails naming it; only attentions declared local stay.

A one-process gloo group makes sp_attention plain attention over the local sequence, so every
rewritten graph is also checked numerically against the original module.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import graphopt
import graphopt.ops.sp_attention  # noqa: F401  registers graphopt::sp_attention
from graphopt.distributed.launch import free_port
from graphopt.passes.manager import PassContext
from graphopt.passes.shard_attention import UnshardedAttentionError, shard_attention

SP_ATTENTION = torch.ops.graphopt.sp_attention.default
B, H, HKV, S, D = 2, 4, 2, 8, 16


def _capture(fn, *args):
    """(Dynamo's FX graph of fn, its example inputs)."""
    captured = []

    def backend(gm, example_inputs):
        captured.append((gm, example_inputs))
        return gm.forward

    torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)(*args)
    return captured[0]


def _run_pass(fn, *args, **flags):
    gm, inputs = _capture(fn, *args)
    ctx = PassContext("pre_grad", graphopt.config.snapshot(sequence_parallel_attention=True,
                                                           **flags), "t")
    result = shard_attention(gm, ctx)
    result.graph_module.recompile()
    return result, inputs


def _targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def _sp_nodes(gm):
    return [n for n in gm.graph.nodes if n.target is SP_ATTENTION]


@pytest.fixture(scope="module")
def one_rank_group():
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                                world_size=1)
    yield
    if started:
        dist.destroy_process_group()


def _qkv(hkv=HKV, dtype=torch.float32, s_k=S):
    torch.manual_seed(0)
    return (torch.randn(B, H, S, D, dtype=dtype), torch.randn(B, hkv, s_k, D, dtype=dtype),
            torch.randn(B, hkv, s_k, D, dtype=dtype))


def _check_rewritten(fn, args, *, causal, scale, kv_heads, atol=1e-5):
    result, inputs = _run_pass(fn, *args)
    gm = result.graph_module
    assert result.modified and result.matched == 1 and not result.refusals
    (node,) = _sp_nodes(gm)
    assert node.args[4] == pytest.approx(scale) and node.args[5] is causal
    assert node.args[1].meta["example_value"].shape[1] == kv_heads  # only Hkv heads travel
    assert "val" in node.meta and "example_value" in node.meta
    torch.testing.assert_close(gm(*inputs)[0], fn(*args), atol=atol, rtol=1e-4)
    return gm


def test_without_torch_distributed_the_compile_fails_naming_the_fix():
    """Runs before the module's process group exists (file order)."""
    if dist.is_initialized():
        pytest.skip("a process group from another test module is still initialised")
    with pytest.raises(UnshardedAttentionError, match="init_process_group"):
        _run_pass(_sdpa_gqa, *_qkv())


# --- scaled_dot_product_attention -----------------------------------------------------------------

def _sdpa_gqa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def _sdpa_repeat_interleave(q, k, v):
    k, v = k.repeat_interleave(H // HKV, dim=1), torch.repeat_interleave(v, H // HKV, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _sdpa_expand(q, k, v):
    def repeat(x):
        return x[:, :, None].expand(B, HKV, H // HKV, S, D).reshape(B, H, S, D)
    return F.scaled_dot_product_attention(q, repeat(k), repeat(v), is_causal=True)


def _sdpa_noncausal_scaled(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, scale=0.3, enable_gqa=True)


@pytest.mark.parametrize("fn, causal, scale", [
    (_sdpa_gqa, True, 1 / math.sqrt(D)),
    (_sdpa_repeat_interleave, True, 1 / math.sqrt(D)),
    (_sdpa_expand, True, 1 / math.sqrt(D)),
    (_sdpa_noncausal_scaled, False, 0.3),
])
def test_sdpa_becomes_sp_attention(one_rank_group, fn, causal, scale):
    gm = _check_rewritten(fn, _qkv(), causal=causal, scale=scale, kv_heads=HKV)
    targets = _targets(gm)
    assert F.scaled_dot_product_attention not in targets
    assert not {"repeat_interleave", "expand", torch.repeat_interleave} & set(targets)


# --- the decomposed pattern -------------------------------------------------------------------------

def _llama_style(q, k, v):  # fp32 softmax, additive triu(-inf) mask, scale by division
    mask = torch.full((S, S), float("-inf"), device=q.device).triu(1)
    scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(D) + mask
    return torch.matmul(F.softmax(scores.float(), dim=-1).type_as(q), v)


def _masked_fill_bool(q, k, v):  # boolean keep-mask inverted, scale on q, Tensor.softmax
    keep = torch.tril(torch.ones(S, S, dtype=torch.bool, device=q.device))
    scores = (q * 0.25) @ k.mT
    return scores.masked_fill(~keep[None, None], float("-inf")).softmax(-1) @ v


def _upcast_everything(q, k, v):  # bf16 inputs computed in fp32 end to end: output stays fp32
    mask = torch.ones(S, S, device=q.device).tril()
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * (1 / math.sqrt(D))
    probs = torch.softmax(scores.masked_fill(mask == 0, float("-inf")), dim=-1)
    return torch.matmul(probs, v.float())


def _noncausal_decomposed(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1) @ v


@pytest.mark.parametrize("fn, causal, scale, dtype, atol", [
    (_llama_style, True, 1 / math.sqrt(D), torch.float32, 1e-5),
    (_masked_fill_bool, True, 0.25, torch.float32, 1e-5),
    (_upcast_everything, True, 1 / math.sqrt(D), torch.bfloat16, 1e-2),
    (_noncausal_decomposed, False, 0.5, torch.float32, 1e-5),
])
def test_decomposed_attention_becomes_sp_attention(one_rank_group, fn, causal, scale, dtype, atol):
    gm = _check_rewritten(fn, _qkv(hkv=H, dtype=dtype), causal=causal, scale=scale, kv_heads=H,
                          atol=atol)
    targets = _targets(gm)
    assert not {F.softmax, torch.softmax, "softmax", torch.matmul, "masked_fill", torch.triu,
                torch.full, "triu", "float"} & set(targets)
    out = [n for n in gm.graph.nodes if n.op == "output"][0].args[0][0]
    assert out.meta["example_value"].dtype == fn(*_qkv(hkv=H, dtype=dtype)).dtype


# --- never silently local: the compile fails naming the attention ---------------------------------

def _sdpa_dropout(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1, is_causal=True)


def _sdpa_mask(q, k, v):
    mask = torch.ones(S, S, dtype=torch.bool).tril(-1)  # not a plain causal mask
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _decomposed_input_mask(q, k, v, mask):
    scores = q @ k.transpose(-2, -1) + mask
    return torch.softmax(scores, dim=-1) @ v


def _decomposed_off_by_one(q, k, v):
    mask = torch.full((S, S), float("-inf")).triu(2)  # one extra diagonal: not causal
    return torch.softmax(q @ k.transpose(-2, -1) + mask, dim=-1) @ v


def _decomposed_dropout(q, k, v):
    mask = torch.full((S, S), float("-inf")).triu(1)
    probs = F.dropout(torch.softmax(q @ k.transpose(-2, -1) + mask, dim=-1), p=0.2, training=True)
    return probs @ v


def _scaled_by_tensor(q, k, v):
    scores = (q @ k.transpose(-2, -1)) * q.new_tensor(0.5)
    return torch.softmax(scores, dim=-1) @ v


def _probs_returned(q, k, v):
    probs = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
    return probs @ v, probs


def _cross_attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("fn, extra, reason", [
    (_sdpa_dropout, (), "dropout p=0.1"),
    (_sdpa_mask, (), "cannot be proven"),
    (_decomposed_input_mask, (torch.zeros(S, S),), "adds data"),
    (_decomposed_off_by_one, (), "k - q - 1 <= 0"),
    (_decomposed_dropout, (), "dropout p=0.2"),
    (_probs_returned, (), "used outside"),
    (_scaled_by_tensor, (), "not a positive constant"),
])
def test_unshardable_attention_fails_the_compile_naming_line_reason_and_fix(one_rank_group, fn,
                                                                            extra, reason):
    args = _qkv(hkv=H) + extra
    gm, _ = _capture(fn, *args)
    ctx = PassContext("pre_grad", graphopt.config.snapshot(sequence_parallel_attention=True), "t")
    with pytest.raises(UnshardedAttentionError) as raised:
        shard_attention(gm, ctx)
    message = str(raised.value)
    assert reason in message and "test_shard_attention.py" in message and "fix:" in message
    assert "sp_local_attention" in message


def test_cross_attention_fails_the_compile(one_rank_group):
    with pytest.raises(UnshardedAttentionError, match="differ in length"):
        _run_pass(_cross_attention, *_qkv(hkv=H, s_k=2 * S))


class _CrossAttention(torch.nn.Module):
    def forward(self, q, context):
        return F.scaled_dot_product_attention(q, context, context)


class _TwoAttentions(torch.nn.Module):
    """An encoder attention over a separate (unsharded) context, and a causal self-attention."""

    def __init__(self):
        super().__init__()
        self.encoder = _CrossAttention()

    def forward(self, q, k, v, context):
        local = self.encoder(q, context)
        return F.scaled_dot_product_attention(local, k, v, is_causal=True)


def test_declared_local_attention_is_kept_and_the_rest_rewritten(one_rank_group):
    q, k, v = _qkv(hkv=H)
    context = torch.randn(B, H, 3 * S, D)
    module = _TwoAttentions()
    with pytest.raises(UnshardedAttentionError, match="differ in length"):
        _run_pass(module, q, k, v, context)
    gm, inputs = _capture(module, q, k, v, context)
    ctx = PassContext("pre_grad", graphopt.config.snapshot(
        sequence_parallel_attention=True, sp_local_attention=("encoder*",)), "t")
    result = shard_attention(gm, ctx)
    gm.recompile()
    assert result.matched == 1 and "kept local" in result.refusals[0]
    assert F.scaled_dot_product_attention in _targets(gm) and len(_sp_nodes(gm)) == 1
    torch.testing.assert_close(gm(*inputs)[0], module(q, k, v, context), atol=1e-5, rtol=1e-4)


def test_backend_flags_reach_the_op_when_it_runs(one_rank_group, monkeypatch):
    """graphopt.backend(sp_split_diagonal=False, ...) is what the op gets at run time: the pass
    emits the snapshot's values as arguments; nothing reads graphopt.config then."""
    import graphopt.ops.sp_attention as sp
    seen, original = [], sp.sp_attention_forward

    def recorded(*args, **kwargs):
        seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(sp, "sp_attention_forward", recorded)
    compiled = torch.compile(_sdpa_gqa, backend=graphopt.backend(
        codegen="eager", sequence_parallel_attention=True, sp_split_diagonal=False,
        attention_kernel="triton", sp_load_balance=False, sp_peer_timeout_s=7))
    with graphopt.config.patch(sp_split_diagonal=True, attention_kernel="auto"):
        compiled(*_qkv())
    assert seen and all(call["split_diagonal"] is False and call["kernel"] == "triton"
                        and call["load_balance"] is False and call["peer_timeout_s"] == 7.0
                        for call in seen)


def test_sequence_that_does_not_split_evenly_names_the_fix(one_rank_group):
    from graphopt.distributed.sharding import (SequenceNotDivisibleError, chunk_bounds,
                                               shard_sequence)
    with pytest.raises(SequenceNotDivisibleError, match="length 1000 is not divisible by the "
                       "sequence-parallel world size 3; pad the batch by 2 tokens to 1002"):
        chunk_bounds(1000, 3, 0)
    assert chunk_bounds(12, 3, 2) == (8, 12)
    tokens, positions = shard_sequence(torch.arange(10).reshape(2, 5))  # one rank: everything
    assert tokens.shape == (2, 5) and positions.tolist() == [list(range(5))] * 2


def test_matmuls_that_are_not_attention_are_not_candidates(one_rank_group):
    result, _ = _run_pass(lambda a, b: torch.matmul(torch.relu(a @ b), b), torch.randn(4, 4),
                          torch.randn(4, 4))
    assert not result.modified and not result.refusals
    router = torch.nn.Linear(4, 3)
    result, _ = _run_pass(lambda x: torch.softmax(router(x), -1).topk(2).values, torch.randn(5, 4))
    assert not result.modified and not result.refusals


# --- through the backend ---------------------------------------------------------------------------

def _count_block_forwards(monkeypatch) -> list:
    import graphopt.ops.sp_attention as sp
    calls, original = [], sp.attention_block_forward

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(sp, "attention_block_forward", counted)
    return calls


@pytest.mark.parametrize("memory_budget", [None, 0.3])
def test_llama_through_the_backend_replaces_every_layer(one_rank_group, monkeypatch,
                                                        memory_budget):
    """Compiled with the pass on a one-rank group: same logits and gradients as eager; with
    graphopt's rematerialization planner too, and neither backward runs attention forward."""
    from graphopt.debug.dump import compile_summaries
    from graphopt.models.llama import Llama, LlamaConfig

    torch.manual_seed(0)
    model = Llama(LlamaConfig.tiny())
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 16))
    expected = model(tokens)
    expected.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, backend=graphopt.backend(
        codegen="eager", sequence_parallel_attention=True, memory_budget=memory_budget))
    calls = _count_block_forwards(monkeypatch)
    logits = compiled(tokens)
    in_forward = len(calls)
    logits.square().mean().backward()
    assert in_forward == model.cfg.n_layers and len(calls) == in_forward
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], atol=1e-5, rtol=1e-4)
    passes = [p for s in compile_summaries() for p in s["passes"] if p["pass"] == "shard_attention"]
    assert sum(p["matched"] for p in passes) == model.cfg.n_layers


@pytest.mark.parametrize("context_fn", ["plain", "graphopt_policy"])
def test_checkpointed_region_is_rewritten_and_attention_not_recomputed(one_rank_group, context_fn):
    """Inside torch.utils.checkpoint (a higher-order op's subgraph) the pass rewrites too, and the
    recomputed region reuses (out, lse): no block forward runs during backward, for a plain
    checkpoint (the pass gives it the policy) as for one with checkpoint_context_fn."""
    from torch.utils.checkpoint import checkpoint

    import graphopt.ops.sp_attention as sp
    from graphopt.debug.dump import compile_summaries

    torch.manual_seed(0)
    proj = torch.nn.Linear(D, 3 * D)

    def layer(x):
        q, k, v = proj(x).chunk(3, dim=-1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).sin()

    def model(x):
        if context_fn == "plain":
            return checkpoint(layer, x, use_reentrant=False)
        return checkpoint(layer, x, use_reentrant=False, context_fn=sp.checkpoint_context_fn)

    x = torch.randn(B, H, S, D, requires_grad=True)
    layer(x).sum().backward()
    expected = x.grad.clone()
    x.grad = None
    calls = []
    original = sp.attention_block_forward

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    sp.attention_block_forward = counted
    try:
        compiled = torch.compile(model, backend=graphopt.backend(
            codegen="eager", sequence_parallel_attention=True))
        out = compiled(x)
        in_forward = len(calls)
        out.sum().backward()
    finally:
        sp.attention_block_forward = original
    assert in_forward == 1 and len(calls) == in_forward
    torch.testing.assert_close(x.grad, expected, atol=1e-5, rtol=1e-4)
    passes = [p for s in compile_summaries() for p in s["passes"] if p["pass"] == "shard_attention"]
    assert sum(p["matched"] for p in passes) == 1


@pytest.mark.slow
def test_llama_through_inductor(one_rank_group):
    """The rewritten graph also compiles through Inductor (the custom op stays an extern call)."""
    from graphopt.models.llama import Llama, LlamaConfig

    torch.manual_seed(0)
    model = Llama(LlamaConfig.tiny(n_layers=1))
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 16))
    expected = model(tokens)
    expected.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, backend=graphopt.backend(sequence_parallel_attention=True))
    logits = compiled(tokens)
    logits.sum().backward()
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], atol=1e-4, rtol=1e-4)
