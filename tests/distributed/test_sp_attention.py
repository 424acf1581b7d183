"""graphopt::sp_attention and the shard_attention pass over gloo: every rank's chunk of the output
and every gradient equal single-process attention (and the reference Llama) over the full sequence.

One spawn of 4 processes runs every check of this file (the ``checks`` fixture); world sizes 2, 3
and 4 run inside it on subgroups of the first P ranks (ranks outside a subgroup sit that case out),
so P is drawn like any other parameter.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.distributed as dist

from attention_helpers import masked_reference
from graphopt.distributed.launch import spawn

WORLD = 4


def _subgroups() -> dict[int, dist.ProcessGroup]:
    """Process groups of ranks [0, P) for P = 2, 3, 4 (every rank must create every group)."""
    return {p: dist.new_group(list(range(p))) for p in (2, 3)} | {4: dist.group.WORLD}


def _document_positions(batch: int, seq: int, gen) -> torch.Tensor:
    """Position ids [batch, seq] of packed documents of random lengths (some longer than a chunk,
    some of one token), restarting at 0 at every document."""
    positions = torch.zeros(batch, seq, dtype=torch.long)
    for b in range(batch):
        start = 0
        while start < seq:
            length = int(torch.randint(1, seq, (1,), generator=gen)) if b % 2 == 0 else \
                int(torch.randint(1, 4, (1,), generator=gen))
            positions[b, start:start + length] = torch.arange(min(length, seq - start))
            start += length
    return positions


def _front_loaded_positions(seq: int, chunk: int) -> torch.Tensor:
    """One document filling the first chunk, two-token documents after it: all the work is on
    rank 0's diagonal block, which the other ranks must take rows of (assists) to balance."""
    return torch.cat([torch.arange(chunk), torch.arange(seq - chunk) % 2])[None]


def _op_case(rank: int, group, p: int, case: dict) -> dict[str, float]:
    """Max abs error of this rank's out, lse and grads against the full-sequence float64 result."""
    from graphopt.ops.sp_attention import group_name_of

    gen = torch.Generator().manual_seed(case["seed"])
    b, hq, hkv, chunk, d = case["batch"], case["hq"], case["hkv"], case["chunk"], case["dim"]
    seq = p * chunk
    q = torch.randn(b, hq, seq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, hkv, seq, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, hkv, seq, d, generator=gen, dtype=torch.float64)
    dout = torch.randn(b, hq, seq, d, generator=gen, dtype=torch.float64)
    dlse = torch.randn(b, hq, seq, generator=gen, dtype=torch.float64)
    dtype = getattr(torch, case.get("dtype", "float32"))
    q, k, v, dout = (x.to(dtype).double() for x in (q, k, v, dout))  # the inputs dtype can hold
    if not case.get("lse_grad", True):
        dlse.zero_()
    scale = case["scale"]
    window = case.get("window", 0)
    positions = None
    if case.get("documents") == "front_loaded":
        positions = _front_loaded_positions(seq, chunk)
    elif case.get("documents"):
        positions = _document_positions(1 if case.get("shared_documents") else b, seq, gen)
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    out_ref, lse_ref = masked_reference(*full, scale, case["causal"], window, positions)
    (out_ref * dout).sum().add_((lse_ref * dlse).sum()).backward()

    rows = slice(rank * chunk, (rank + 1) * chunk)
    local = [x[:, :, rows].to(dtype).requires_grad_() for x in (q, k, v)]
    out, lse = torch.ops.graphopt.sp_attention(
        *local, None if positions is None else positions[:, rows], scale, case["causal"], window,
        group_name_of(group), case["load_balance"], case.get("split_diagonal", True), "auto",
        30.0)
    loss = (out.float() * dout[:, :, rows].float()).sum()
    if case.get("lse_grad", True):
        loss = loss + (lse * dlse[:, :, rows].float()).sum()
    loss.backward()
    return {
        "out": (out.double() - out_ref[:, :, rows]).abs().max().item(),
        "lse": (lse.double() - lse_ref[:, :, rows]).abs().max().item(),
        **{f"d{name}": (x.grad.double() - ref.grad[:, :, rows]).abs().max().item()
           for name, x, ref in zip("qkv", local, full)},
    }


def _hypothesis_cases(rank: int, groups) -> int:
    """Random shapes, P, causal, balance and GQA; every rank draws the same examples."""
    from hypothesis import Phase, given, settings, strategies as st

    seen = []

    @settings(max_examples=15, deadline=None, derandomize=True, database=None,
              phases=[Phase.generate])
    @given(case=st.fixed_dictionaries(dict(
        world=st.sampled_from((2, 3, 4)), causal=st.booleans(), load_balance=st.booleans(),
        hq_per_kv=st.sampled_from((1, 2, 4)), hkv=st.integers(1, 2), batch=st.integers(1, 2),
        chunk=st.integers(1, 9), dim=st.sampled_from((4, 8, 16)),
        scale=st.floats(0.05, 1.0), seed=st.integers(0, 2**16))))
    def check(case):
        case = dict(case, hq=case["hq_per_kv"] * case["hkv"])
        seen.append(case)
        if rank < case["world"]:
            errors = _op_case(rank, groups[case["world"]], case["world"], case)
            assert max(errors.values()) < 2e-5, (case, errors)

    check()
    return len(seen)


def _count_block_forwards() -> list:
    """Wrap ``attention_block_forward`` where sp_attention calls it; one list entry per call."""
    import graphopt.ops.sp_attention as sp
    calls = []
    original = sp.attention_block_forward

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    sp.attention_block_forward = counted
    return calls


def _forwards_in_backward(rank: int, group, context_fn) -> tuple[int, int]:
    """(block forwards during forward, during backward) of a checkpointed layer around the op."""
    from torch.utils.checkpoint import checkpoint

    import graphopt.ops.sp_attention as sp
    torch.manual_seed(0)
    proj = torch.nn.Linear(8, 3 * 8)
    x = torch.randn(1, 2, 5, 8, requires_grad=True)

    def layer(x):
        q, k, v = proj(x).chunk(3, dim=-1)
        return sp.sp_attention(torch.tanh(q), k, v, causal=True, group=group).sin()

    calls = _count_block_forwards()
    kwargs = {"context_fn": context_fn} if context_fn is not None else {}
    out = checkpoint(layer, x, use_reentrant=False, **kwargs)
    in_forward = len(calls)
    out.sum().backward()
    return in_forward, len(calls) - in_forward


def _contract_forward(q, k, v, *, scale, is_causal):
    """Stand-in for torch's cuDNN forward (CUDA only): no offsets, top-left causal mask."""
    from graphopt.ops.attention import _reference_forward
    out, lse = _reference_forward(q, k, v, scale, is_causal, 0, 0)
    return out.to(q.dtype), lse


def _contract_backward(q, k, v, out, lse, dout, *, scale, is_causal):
    """Stand-in for torch's cuDNN backward: no offsets, delta derived from out."""
    from graphopt.ops.attention import _reference_backward
    dq, dk, dv = _reference_backward(q, k, v, out, lse, dout, scale, is_causal, 0, 0, None)
    # cuDNN: grads in the inputs' dtype, grouped heads summed inside the kernel
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _through_kernel_contract(rank: int, groups, cases: list[dict]) -> tuple[list, int]:
    """The grid again with eligible blocks routed to the stand-ins (no LSE gradient, so they are):
    helpers then receive out rows instead of delta rows. (errors, stand-in calls)."""
    import graphopt.ops.attention as attention
    calls = []

    def counted(fn):
        def call(*args, **kwargs):
            calls.append(1)
            return fn(*args, **kwargs)
        return call

    names = ("_cudnn_supports", "_cudnn_block_forward", "_cudnn_block_backward")
    saved = [getattr(attention, name) for name in names]
    for name, value in zip(names, (lambda q, k: True, counted(_contract_forward),
                                   counted(_contract_backward))):
        setattr(attention, name, value)
    try:
        errors = [_op_case(rank, groups[case["world"]], case["world"], dict(case, lse_grad=False))
                  for case in cases if rank < case["world"]]
        # bf16: cuDNN's partials travel in bf16 (half the bytes); the buffers must agree.
        errors_bf16 = [_op_case(rank, groups[case["world"]], case["world"],
                                dict(case, lse_grad=False, dtype="bfloat16"))
                       for case in cases if rank < case["world"]]
    finally:
        for name, value in zip(names, saved):
            setattr(attention, name, value)
    return errors, errors_bf16, len(calls)


def _run_op_checks(rank: int, groups, cases: list[dict]) -> dict:
    import graphopt.ops.sp_attention as sp
    errors = [_op_case(rank, groups[case["world"]], case["world"], case)
              for case in cases if rank < case["world"]]
    errors_whole = [_op_case(rank, groups[case["world"]], case["world"],  # diagonal whole
                             dict(case, split_diagonal=False))
                    for case in cases if rank < case["world"]]
    masked = [(case, _op_case(rank, groups[case["world"]], case["world"], case))
              for case in _masked_cases() if rank < case["world"]]
    contract_errors, contract_bf16, contract_calls = _through_kernel_contract(rank, groups, cases)
    examples = _hypothesis_cases(rank, groups)
    original = sp.attention_block_forward
    with_policy = _forwards_in_backward(rank, groups[WORLD], sp.checkpoint_context_fn)
    sp.attention_block_forward = original
    without_policy = _forwards_in_backward(rank, groups[WORLD], None)
    sp.attention_block_forward = original
    return dict(errors=errors, errors_whole=errors_whole, examples=examples, with_policy=with_policy,
                without_policy=without_policy, contract_errors=contract_errors,
                contract_bf16=contract_bf16, contract_calls=contract_calls, masked=masked)


def _masked_cases() -> list[dict]:
    """P = 2, 3, 4 x sliding window (narrower and wider than a chunk) / packed documents (one row of
    position ids for the batch, or one per row) / both, balanced or not, GQA."""
    cases = []
    for world in (2, 3, 4):
        for seed, (window, documents, shared, load_balance) in enumerate((
                (3, False, False, True), (9, False, False, False), (0, True, True, True),
                (0, True, False, True), (5, True, False, False))):
            cases.append(dict(world=world, causal=True, load_balance=load_balance, hq=4, hkv=2,
                              batch=2, chunk=6, dim=8, scale=0.3, seed=seed + 10, window=window,
                              documents=documents, shared_documents=shared))
        cases.append(dict(world=world, causal=True, load_balance=True, hq=4, hkv=2, batch=2,
                          chunk=8, dim=8, scale=0.3, seed=20, documents="front_loaded"))
    return cases


def _grid_cases() -> list[dict]:
    """P = 2, 3, 4 x balanced causal / plain ring / non-causal; GQA in two of three."""
    cases = []
    for world in (2, 3, 4):
        for seed, (causal, load_balance, hkv) in enumerate(
                ((True, True, 2), (True, False, 4), (False, True, 2))):
            cases.append(dict(world=world, causal=causal, load_balance=load_balance, hq=4,
                              hkv=hkv, batch=2, chunk=6, dim=8, scale=1 / math.sqrt(8),
                              seed=seed))
    return cases


def test_sp_attention_matches_full_attention_for_every_schedule(op_checks):
    """Output, LSE and dq/dk/dv (with a gradient on the LSE too) equal float64 attention."""
    for key in ("errors", "errors_whole"):  # diagonal split (default) or whole
        errors = [e for rank in op_checks for e in rank[key]]
        assert len(errors) == 2 * 3 + 3 * 3 + 4 * 3  # every rank of every case reported
        worst = max(max(e.values()) for e in errors)
        assert worst < 2e-5, (key, errors)


def test_blocks_routed_to_cudnn_keep_outputs_and_gradients_exact(op_checks):
    """With torch's cuDNN kernels (stand-ins with their contract on CPU) taking every block they
    can, helpers' backward blocks fed with out rows, outputs and gradients equal float64 attention."""
    errors = [e for rank in op_checks for e in rank["contract_errors"]]
    assert len(errors) == 2 * 3 + 3 * 3 + 4 * 3
    assert all(rank["contract_calls"] > 0 for rank in op_checks), [r["contract_calls"] for r in op_checks]
    worst = max(max(e.values()) for e in errors)
    assert worst < 2e-5, errors
    bf16 = [e for rank in op_checks for e in rank["contract_bf16"]]
    assert len(bf16) == len(errors) and max(max(e.values()) for e in bf16) < 5e-2, bf16


def test_sliding_window_and_documents_match_full_attention(op_checks):
    """With a window and/or packed documents (position ids sharded with the sequence), every rank's
    output, LSE and gradients equal float64 attention with the mask written out."""
    results = [r for rank in op_checks for r in rank["masked"]]
    assert len(results) == 6 * (2 + 3 + 4)
    for case, errors in results:
        assert max(errors.values()) < 2e-5, (case, errors)


def test_sp_attention_hypothesis_shapes_world_sizes_gqa(op_checks):
    assert all(rank["examples"] >= 10 for rank in op_checks)


def test_checkpointed_layer_never_reruns_attention_forward(op_checks):
    """With checkpoint_context_fn the recomputed layer reuses (out, lse); without it, the counter
    sees attention run again -- so the count is a real measurement."""
    for rank in op_checks:
        forwards, backward_forwards = rank["with_policy"]
        assert forwards > 0 and backward_forwards == 0
        assert rank["without_policy"][1] == rank["without_policy"][0]


# --- the reference Llama, compiled with the pass on each rank's shard ---------------------------

def _llama_case(rank: int, group, model, tokens, weights, full_logits, full_grads) -> dict:
    import graphopt
    import graphopt.ops.sp_attention as sp
    from graphopt.distributed.sharding import gather_sequence, shard_sequence

    torch._dynamo.reset()
    local_tokens, positions = shard_sequence(tokens, group=group)
    local_weights, _ = shard_sequence(weights, group=group)
    compiled = torch.compile(model, dynamic=False, backend=graphopt.backend(
        codegen="eager", sequence_parallel_attention=True, sp_group=group))
    model.zero_grad()
    calls = _count_block_forwards()
    logits = compiled(local_tokens, positions)
    in_forward = len(calls)
    (logits * local_weights).sum().backward()
    in_backward = len(calls) - in_forward
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad.clone()
        dist.all_reduce(grad, group=group)
        grads[name] = (grad - full_grads[name]).abs().max().item()
    logits_error = (gather_sequence(logits.detach(), group=group) - full_logits).abs().max().item()
    return dict(logits=logits_error, grads=grads, forwards=in_forward,
                backward_forwards=in_backward, scale=full_logits.abs().max().item())


def _run_llama_checks(rank: int, groups) -> dict:
    import graphopt.ops.sp_attention as sp
    from graphopt.models.llama import Llama, LlamaConfig

    torch.manual_seed(0)
    model = Llama(LlamaConfig.tiny())
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 24))  # 24 splits over 2, 3 and 4 ranks
    weights = torch.randn(2, 24, model.cfg.vocab_size)
    full_logits = model(tokens)
    (full_logits * weights).sum().backward()
    full_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    original = sp.attention_block_forward
    results = {}
    for p in (2, 3, 4):
        if rank < p:
            results[p] = _llama_case(rank, groups[p], model, tokens, weights, full_logits.detach(),
                                     full_grads)
        sp.attention_block_forward = original
    return results


def _unequal_chunks(rank: int, group) -> tuple[str, float]:
    """The issue's case: both ranks ran 32-token chunks, then get 33 and 32 tokens."""
    from graphopt.ops.sp_attention import SequenceParallelError, sp_attention
    q = torch.randn(1, 2, 32, 8)
    sp_attention(q, q, q, causal=True, group=group)
    q = torch.randn(1, 2, 33 - rank, 8)
    start = time.monotonic()
    try:
        sp_attention(q, q, q, causal=True, group=group)
    except SequenceParallelError as err:
        return str(err), time.monotonic() - start
    return "no error", time.monotonic() - start


def _absent_peer(rank: int, group) -> tuple[str, float]:
    """Rank 1 skips an attention rank 0 makes (another graph, say): rank 0 gives up in seconds."""
    from graphopt.distributed.p2p import PeerTimeout
    from graphopt.ops.sp_attention import sp_attention
    if rank == 1:
        time.sleep(4)
        return "skipped", 0.0
    q = torch.randn(1, 2, 8, 8)
    start = time.monotonic()
    try:
        sp_attention(q, q, q, causal=True, group=group, peer_timeout_s=2.0)
    except PeerTimeout as err:
        return str(err), time.monotonic() - start
    return "no error", time.monotonic() - start


def _run_all_checks(rank: int, world: int, cases: list[dict]) -> dict:
    groups = _subgroups()  # once: every rank must create the same groups in the same order
    results = {"op": _run_op_checks(rank, groups, cases), "llama": _run_llama_checks(rank, groups),
               "unequal": _unequal_chunks(rank, groups[2]) if rank < 2 else None}
    # Last: after a peer is given up on, the group is not used again.
    results["absent"] = _absent_peer(rank, groups[2]) if rank < 2 else None
    return results


@pytest.fixture(scope="module")
def checks():
    """One spawn for the whole file (starting 4 processes costs more than the checks)."""
    return spawn(_run_all_checks, WORLD, _grid_cases(), timeout_s=600)


@pytest.fixture
def op_checks(checks):
    return [rank["op"] for rank in checks]


@pytest.fixture
def llama_checks(checks):
    return [rank["llama"] for rank in checks]


def test_compiled_llama_on_shards_matches_full_sequence(llama_checks):
    """Logits (gathered) and every parameter gradient (summed over ranks) equal the eager model on
    the full sequence, for P = 2, 3, 4."""
    for rank, results in enumerate(llama_checks):
        assert sorted(results) == [p for p in (2, 3, 4) if rank < p]
        for p, result in results.items():
            assert result["logits"] < 1e-5 * max(1.0, result["scale"]), (p, result)
            assert max(result["grads"].values()) < 1e-4, (p, result["grads"])


def test_compiled_llama_backward_never_runs_attention_forward(llama_checks):
    """The partitioned backward consumes the saved (out, lse); no block forward runs in it."""
    for results in llama_checks:
        for result in results.values():
            assert result["forwards"] > 0 and result["backward_forwards"] == 0, result



def test_unequal_chunks_fail_on_every_rank_at_once_naming_the_fix(checks):
    """Both ranks ran 32-token chunks, then got 33 and 32: every rank raises, in well under the
    10 s budget (no rank skips the check: it runs on every call)."""
    for message, seconds in (rank["unequal"] for rank in checks[:2]):
        assert "positions per rank: rank 0 33, rank 1 32" in message, message
        assert "shard_sequence" in message and seconds < 10


def test_a_rank_skipping_an_attention_is_a_graphopt_error_within_seconds(checks):
    message, seconds = checks[0]["absent"]
    assert "waited 2 s" in message and "sp_peer_timeout_s" in message, message
    assert 2 <= seconds < 10
