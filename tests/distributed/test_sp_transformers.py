"""Sequence parallelism on transformers models, as users train them (``use_cache=False``), over
gloo: every rank compiles the stock model on its chunk of tokens and global position ids; the
gathered logits and every parameter gradient (summed over ranks) equal single-process eager over
the full sequence. Causal Llama with grouped-query heads (sdpa and eager attention), a sliding-window
Mistral, packed documents (position ids that restart), P = 2 and 3. A mask that cannot be proven
(a padding mask from the batch) fails the compile instead of running local attention.

One spawn of 3 processes runs every case (P = 2 on a subgroup of ranks 0 and 1).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from attention_helpers import tiny_model
from graphopt.distributed.launch import spawn

transformers = pytest.importorskip("transformers")

WORLD = 3
SEQ = 24  # splits over 2 and 3 ranks
PACKED = [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0, 1, 2, 0, 1]


CASES = [  # (model, attention, packed documents, P)
    ("llama", "sdpa", False, 2),
    ("llama", "sdpa", False, 3),
    ("llama", "eager", True, 3),
    ("llama", "sdpa", True, 2),
    ("mistral", "sdpa", False, 3),
    ("mistral", "eager", True, 2),
]


def _case(rank: int, group, kind: str, attn: str, packed: bool, codegen: str = "eager") -> dict:
    import graphopt
    from graphopt.distributed.sharding import gather_sequence, shard_sequence

    torch._dynamo.reset()
    model = tiny_model(kind, attn)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 64, (2, SEQ), generator=gen)
    weights = torch.randn(2, SEQ, 64, generator=gen)
    positions = (torch.tensor(PACKED) if packed else torch.arange(SEQ)).expand(2, -1)
    full = model(tokens, position_ids=positions, use_cache=False).logits
    (full * weights).sum().backward()
    full_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    local_tokens, local_positions = shard_sequence(tokens, positions, group=group)
    local_weights, _ = shard_sequence(weights, group=group)
    compiled = torch.compile(model, dynamic=False, backend=graphopt.backend(
        codegen=codegen, sequence_parallel_attention=True, sp_group=group))
    logits = compiled(local_tokens, position_ids=local_positions, use_cache=False).logits
    (logits * local_weights).sum().backward()
    errors = {}
    for name, param in model.named_parameters():
        grad = param.grad.clone()
        dist.all_reduce(grad, group=group)
        errors[name] = (grad - full_grads[name]).abs().max().item()
    gathered = gather_sequence(logits.detach(), group=group)
    return dict(logits=(gathered - full.detach()).abs().max().item(), grads=errors,
                scale=full.abs().max().item())


def _padding_mask_raises(rank: int, group) -> str:
    import graphopt
    from graphopt.distributed.sharding import shard_sequence

    torch._dynamo.reset()
    model = tiny_model("llama", "sdpa")
    tokens, positions = shard_sequence(torch.randint(0, 64, (2, SEQ)), group=group)
    padding = torch.ones_like(tokens)
    compiled = torch.compile(model, backend=graphopt.backend(
        codegen="eager", sequence_parallel_attention=True, sp_group=group))
    try:
        compiled(tokens, position_ids=positions, attention_mask=padding, use_cache=False)
    except Exception as err:  # Dynamo wraps the backend's error; its message is kept
        return f"{type(err).__name__}: {err}"
    return "no error"


def _run(rank: int, world: int) -> dict:
    groups = {2: dist.new_group([0, 1]), 3: dist.group.WORLD}
    results = {}
    for index, (kind, attn, packed, p) in enumerate(CASES):
        if rank < p:
            results[index] = _case(rank, groups[p], kind, attn, packed)
    results["padding"] = _padding_mask_raises(rank, groups[3])
    return results


@pytest.fixture(scope="module")
def results():
    return spawn(_run, WORLD, timeout_s=600)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{k}-{a}-{'packed' if d else 'causal'}"
                                                          f"-P{p}" for k, a, d, p in CASES])
def test_logits_and_every_gradient_equal_full_sequence_eager(results, index):
    p = CASES[index][3]
    for rank in range(p):
        result = results[rank][index]
        assert result["logits"] < 1e-5 * max(1.0, result["scale"]), (CASES[index], result)
        assert max(result["grads"].values()) < 1e-4, (CASES[index], result["grads"])


def test_an_unprovable_mask_fails_the_compile_on_every_rank(results):
    for rank in range(WORLD):
        message = results[rank]["padding"]
        assert "UnshardedAttentionError" in message and "cannot run across" in message, message
        assert "mask cannot be proven" in message and "sp_local_attention" in message


def _inductor_case(rank: int, world: int) -> dict:
    return _case(rank, dist.group.WORLD, "llama", "sdpa", True, codegen="inductor")


@pytest.mark.slow
def test_through_inductor():
    """One case through the default codegen: packed documents, P = 2."""
    for result in spawn(_inductor_case, 2, timeout_s=600):
        assert result["logits"] < 1e-4 * max(1.0, result["scale"]), result
        assert max(result["grads"].values()) < 1e-4, result["grads"]
