"""Sequence-parallel attention (DISTFLASHATTN): ``graphopt::sp_attention`` and its backward.

Each rank of the group holds a contiguous chunk of the sequence: q [B, Hq, S/P, D], k, v
[B, Hkv, S/P, D] for tokens [r*S/P, (r+1)*S/P). The op computes, on every rank, that chunk's rows of
attention over the WHOLE sequence -- causal or not -- as if q, k, v had been gathered:

    out_r, lse_r = attention(q_r, cat(k_0..k_{P-1}), cat(v_0..v_{P-1}))   # without the gather

following the steps of ``graphopt.distributed.sp_schedule.build_schedule``. A step's inputs (the
peer's k/v, or a busy peer's query rows for a helper) are requested one step ahead, so the transfer
runs under the current step's block kernel (``Exchanger`` on a CUDA communication stream). Partial
results are merged in float32 with their log-sum-exps. Only the Hkv key/value heads travel.

The backward takes the saved (q, k, v, out, lse) and the schedule's steps again; it never re-runs the
forward: owners get k/v again and return dk/dv partials, helpers get (q, dout, lse, out) rows --
delta = rowsum(dout * out) instead of out where graphopt's Triton backward runs the block -- and
return dq partials, all summed in float32 by the rank that owns them (partials travel in q's dtype
where torch's cuDNN kernel produced them so, else in float32).

One implementation serves every device: the block math is ``graphopt.ops.attention`` (Triton kernels
on CUDA, torch's cuDNN attention for the blocks it computes exactly; the float32 torch reference
on CPU) and the transfers are torch.distributed P2P (NCCL on
CUDA, gloo on CPU), so CPU tests check the same function the GPUs run.

Under ``torch.utils.checkpoint`` pass ``context_fn=checkpoint_context_fn`` so the recomputation of
a layer reuses the saved (out, lse) instead of running distributed attention again.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from graphopt import _compat
from graphopt.distributed.p2p import exchanger_for
from graphopt.distributed.sp_schedule import DIAGONAL, HELPER, OWNER, Step, build_schedule
from graphopt.ops.attention import (attention_block_backward, attention_block_forward,
                                    attention_delta, merge_attention_blocks,
                                    cudnn_eligible)

__all__ = ["sp_attention", "sp_attention_forward", "sp_attention_backward", "checkpoint_policy",
           "checkpoint_context_fn", "group_name_of"]


def group_name_of(group: Optional[dist.ProcessGroup]) -> str:
    """The name the custom op carries for ``group`` (None: the default group)."""
    return _compat.group_name(group)


def _check_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(
            f"sp_attention expects q [B, Hq, S/P, D] and k, v [B, Hkv, S/P, D]; got q "
            f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"sp_attention is self-attention over one sequence chunk per rank: q has {q.shape[2]} "
            f"positions and k {k.shape[2]}; shard q, k and v with the same chunk "
            "(graphopt.distributed.sharding.shard_sequence)")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")


def _rows(x: Tensor, start: int, stop: int) -> Tensor:
    return x[:, :, start:stop]


_CHECKED_CHUNKS: set[tuple[str, int]] = set()


def _check_equal_chunks(group: dist.ProcessGroup, chunk: int, device: torch.device) -> None:
    """Every rank must hold the same number of positions; checked once per group and length."""
    key = (group.group_name, chunk)
    if key in _CHECKED_CHUNKS:
        return
    bounds = torch.tensor([chunk, -chunk], device=device)
    dist.all_reduce(bounds, op=dist.ReduceOp.MAX, group=group)
    longest, shortest = int(bounds[0]), -int(bounds[1])
    if longest != shortest:
        raise ValueError(
            f"sequence-parallel ranks hold chunks of different lengths ({shortest} to {longest} "
            f"positions; this rank {chunk}): every rank needs S/P positions of one sequence. Shard "
            "the batch with graphopt.distributed.sharding.shard_sequence (it names the padding when "
            "S is not divisible by P)")
    _CHECKED_CHUNKS.add(key)


class _Runner:
    """Walks a schedule: inputs of step t + 1 travel while step t computes."""

    def __init__(self, q: Tensor, group: dist.ProcessGroup, causal: bool, load_balance: bool,
                 diagonal_last: bool = False):
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.chunk = q.shape[2]
        _check_equal_chunks(group, self.chunk, q.device)
        schedule = build_schedule(self.world, causal, load_balance)
        # The diagonal needs no transfer: first, it hides the first step's inputs; last, it hides
        # the last step's returned partials (the backward's float32 dk/dv, the larger transfer).
        self.schedule = schedule[1:] + schedule[:1] if diagonal_last else schedule
        self.exchanger = exchanger_for(group, q.device)

    def offset(self, chunk_rank: int, row_start: int = 0) -> int:
        return chunk_rank * self.chunk + row_start

    def run(self, start_inputs, compute, start_results, finish_results) -> None:
        """start_inputs(step) -> (transfer, buffers); compute(step, buffers) -> result sends;
        start_results(step, sends) -> (transfer, buffers); finish_results(step, buffers)."""
        steps = self.schedule
        upcoming = start_inputs(steps[0])
        in_flight = []
        for index, step in enumerate(steps):
            transfer, buffers = upcoming
            if index + 1 < len(steps):
                upcoming = start_inputs(steps[index + 1])
            transfer.wait()
            sends = compute(step, buffers)
            in_flight.append((step, start_results(step, sends)))
            # Results of the previous step have had a whole block of compute to arrive.
            while len(in_flight) > 1:
                self._finish(in_flight.pop(0), finish_results)
        for item in in_flight:
            self._finish(item, finish_results)

    @staticmethod
    def _finish(item, finish_results) -> None:
        step, (transfer, buffers) = item
        transfer.wait()
        finish_results(step, buffers)


def sp_attention_forward(q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool,
                         group: Optional[dist.ProcessGroup] = None,
                         load_balance: bool = True) -> tuple[Tensor, Tensor]:
    """(out in q.dtype, lse float32 [B, Hq, S/P]) of this rank's chunk over the whole sequence."""
    _check_inputs(q, k, v)
    group = _compat.resolve_process_group(group)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if dist.get_world_size(group) == 1:
        return attention_block_forward(q, k, v, scale=scale, causal=causal)
    run = _Runner(q, group, causal, load_balance)
    rank = run.rank
    out_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse_acc = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)

    def start_inputs(step: Step):
        sends, recvs = [], []
        dst, src = step.destination(rank), step.source(rank)
        peer_task, task = step.tasks[dst], step.tasks[rank]
        if peer_task.kind == OWNER:
            sends += [(k, dst), (v, dst)]
        elif peer_task.kind == HELPER:
            sends.append((_rows(q, *peer_task.row_range(run.chunk)).contiguous(), dst))
        if task.kind == OWNER:
            buffers = (torch.empty_like(k), torch.empty_like(v))
        elif task.kind == HELPER:
            start, stop = task.row_range(run.chunk)
            buffers = (q.new_empty(q.shape[0], q.shape[1], stop - start, q.shape[3]),)
        else:
            buffers = ()
        recvs += [(buffer, src) for buffer in buffers]
        return run.exchanger.start(sends, recvs), buffers

    def compute(step: Step, buffers):
        task, src = step.tasks[rank], step.source(rank)
        start, stop = task.row_range(run.chunk)
        if task.kind == DIAGONAL:
            attention_block_forward(q, k, v, scale=scale, causal=causal, q_offset=run.offset(rank),
                                    k_offset=run.offset(rank), out_acc=out_acc, lse_acc=lse_acc)
        elif task.kind == OWNER:
            k_src, v_src = buffers
            attention_block_forward(_rows(q, start, stop), k_src, v_src, scale=scale, causal=causal,
                                    q_offset=run.offset(rank, start), k_offset=run.offset(src),
                                    out_acc=_rows(out_acc, start, stop),
                                    lse_acc=_rows(lse_acc, start, stop))
        elif task.kind == HELPER:
            (q_src,) = buffers
            out, lse = attention_block_forward(q_src, k, v, scale=scale, causal=causal,
                                               q_offset=run.offset(src, start),
                                               k_offset=run.offset(rank))
            return [(out, src), (lse, src)]
        return []

    def start_results(step: Step, sends):
        peer_task = step.tasks[step.destination(rank)]
        buffers = ()
        if peer_task.kind == HELPER:
            start, stop = peer_task.row_range(run.chunk)
            rows = (q.shape[0], q.shape[1], stop - start)
            buffers = (q.new_empty(*rows, q.shape[3]),
                       torch.empty(rows, dtype=torch.float32, device=q.device))
        recvs = [(buffer, step.destination(rank)) for buffer in buffers]
        return run.exchanger.start(sends, recvs), buffers

    def finish_results(step: Step, buffers):
        if buffers:
            start, stop = step.tasks[step.destination(rank)].row_range(run.chunk)
            merge_attention_blocks(_rows(out_acc, start, stop), _rows(lse_acc, start, stop),
                                   *buffers)

    run.run(start_inputs, compute, start_results, finish_results)
    return out_acc.to(q.dtype), lse_acc


def sp_attention_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor,
                          *, scale: float, causal: bool, group: Optional[dist.ProcessGroup] = None,
                          load_balance: bool = True,
                          dlse: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of this rank's chunk from the saved out and lse; no forward is re-run."""
    _check_inputs(q, k, v)
    group = _compat.resolve_process_group(group)
    q, k, v, out, dout = (x.contiguous() for x in (q, k, v, out, dout))
    lse = lse.contiguous()
    # d lse / d scores = p, so a gradient on the LSE folds into delta: ds = p * (dp - (delta - dlse)).
    delta = attention_delta(out, dout)
    if dlse is not None:
        delta = delta - dlse
    if dist.get_world_size(group) == 1:
        return attention_block_backward(q, k, v, out, lse, dout, scale=scale, causal=causal,
                                        delta=delta, lse_grad_in_delta=dlse is not None)
    run = _Runner(q, group, causal, load_balance, diagonal_last=True)
    rank = run.rank
    lse_grad = dlse is not None
    # A helper's block sees every key. Where torch's cuDNN backward computes it, the helper needs
    # the owner's out rows (the kernel derives delta itself); otherwise delta rows, 1/D the bytes.
    # Every rank decides alike: the choice depends only on dtype, head dim, device and config.
    # Partials that travel keep the dtype cuDNN produces them in (q's: half the bytes of float32,
    # no conversion); graphopt's kernels produce float32 partials, which travel as they are.
    helper_rows, dq_wire, kv_wire = (q, dout, lse, delta), torch.float32, torch.float32
    if not lse_grad and cudnn_eligible(q, k):
        helper_rows, dq_wire = (q, dout, lse, out), q.dtype
        if q.shape[1] == k.shape[1]:  # grouped heads are summed in float32
            kv_wire = k.dtype
    dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk_acc = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv_acc = torch.zeros(v.shape, dtype=torch.float32, device=v.device)

    def start_inputs(step: Step):
        sends = []
        dst, src = step.destination(rank), step.source(rank)
        peer_task, task = step.tasks[dst], step.tasks[rank]
        if peer_task.kind == OWNER:
            sends += [(k, dst), (v, dst)]
        elif peer_task.kind == HELPER:
            start, stop = peer_task.row_range(run.chunk)
            sends += [(_rows(x, start, stop).contiguous(), dst) for x in helper_rows]
        if task.kind == OWNER:
            buffers = (torch.empty_like(k), torch.empty_like(v))
        elif task.kind == HELPER:
            start, stop = task.row_range(run.chunk)
            buffers = tuple(torch.empty_like(_rows(x, start, stop)) for x in helper_rows)
        else:
            buffers = ()
        return run.exchanger.start(sends, [(buffer, src) for buffer in buffers]), buffers

    def compute(step: Step, buffers):
        task, src = step.tasks[rank], step.source(rank)
        start, stop = task.row_range(run.chunk)
        if task.kind == DIAGONAL:
            attention_block_backward(
                q, k, v, out, lse, dout, scale=scale, causal=causal, q_offset=run.offset(rank),
                k_offset=run.offset(rank), delta=delta, dq_acc=dq_acc, dk_acc=dk_acc,
                dv_acc=dv_acc, lse_grad_in_delta=lse_grad)
        elif task.kind == OWNER:
            k_src, v_src = buffers
            _, dk, dv = attention_block_backward(
                _rows(q, start, stop), k_src, v_src, _rows(out, start, stop),
                _rows(lse, start, stop), _rows(dout, start, stop), scale=scale, causal=causal,
                q_offset=run.offset(rank, start), k_offset=run.offset(src),
                delta=_rows(delta, start, stop), dq_acc=_rows(dq_acc, start, stop),
                kv_grad_dtype=kv_wire, lse_grad_in_delta=lse_grad)
            return [(dk, src), (dv, src)]
        elif task.kind == HELPER:
            q_src, dout_src, lse_src, last = buffers
            out_src, delta_src = (last, None) if helper_rows[-1] is out else (None, last)
            dq = None
            if dq_wire == torch.float32:
                dq = torch.zeros(q_src.shape, dtype=torch.float32, device=q.device)
            dq, _, _ = attention_block_backward(
                q_src, k, v, out_src, lse_src, dout_src, scale=scale, causal=causal,
                q_offset=run.offset(src, start), k_offset=run.offset(rank), delta=delta_src,
                dq_acc=dq, dk_acc=dk_acc, dv_acc=dv_acc, lse_grad_in_delta=lse_grad)
            return [(dq.to(dq_wire), src)]
        return []

    def start_results(step: Step, sends):
        dst = step.destination(rank)
        peer_task = step.tasks[dst]
        if peer_task.kind == OWNER:
            buffers = (torch.empty_like(dk_acc, dtype=kv_wire),
                       torch.empty_like(dv_acc, dtype=kv_wire))
        elif peer_task.kind == HELPER:
            rows = _rows(dq_acc, *peer_task.row_range(run.chunk))
            buffers = (torch.empty_like(rows, dtype=dq_wire, memory_format=torch.contiguous_format),)
        else:
            buffers = ()
        return run.exchanger.start(sends, [(buffer, dst) for buffer in buffers]), buffers

    def finish_results(step: Step, buffers):
        peer_task = step.tasks[step.destination(rank)]
        if peer_task.kind == OWNER:
            dk_acc.add_(buffers[0])
            dv_acc.add_(buffers[1])
        elif peer_task.kind == HELPER:
            _rows(dq_acc, *peer_task.row_range(run.chunk)).add_(buffers[0])

    run.run(start_inputs, compute, start_results, finish_results)
    return dq_acc.to(q.dtype), dk_acc.to(k.dtype), dv_acc.to(v.dtype)


# --- custom ops ------------------------------------------------------------------------------------

@torch.library.custom_op("graphopt::sp_attention", mutates_args=())
def _sp_attention_op(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool,
                     group_name: str, load_balance: bool) -> tuple[Tensor, Tensor]:
    return sp_attention_forward(q, k, v, scale=scale, causal=causal, group=group_name,
                                load_balance=load_balance)


@_sp_attention_op.register_fake
def _(q, k, v, scale, causal, group_name, load_balance):
    _check_inputs(q, k, v)
    # The real outputs are contiguous whatever the strides of q (q is often a transposed view).
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("graphopt::sp_attention_backward", mutates_args=())
def _sp_attention_backward_op(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                              dout: Tensor, dlse: Optional[Tensor], scale: float, causal: bool,
                              group_name: str, load_balance: bool) -> tuple[Tensor, Tensor, Tensor]:
    return sp_attention_backward(q, k, v, out, lse, dout, scale=scale, causal=causal,
                                 group=group_name, load_balance=load_balance, dlse=dlse)


@_sp_attention_backward_op.register_fake
def _(q, k, v, out, lse, dout, dlse, scale, causal, group_name, load_balance):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, causal, group_name, load_balance = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.options = (scale, causal, group_name, load_balance)
    # An unused LSE must reach backward as None, not zeros: a gradient on the LSE keeps every block
    # on graphopt's Triton backward (torch's cuDNN backward cannot take one).
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.graphopt.sp_attention_backward(q, k, v, out, lse, dout, dlse,
                                                          *ctx.options)
    return dq, dk, dv, None, None, None, None


_sp_attention_op.register_autograd(_backward, setup_context=_setup_context)


def sp_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None,
                 causal: bool = True, group: Optional[dist.ProcessGroup] = None,
                 load_balance: bool = True) -> Tensor:
    """Differentiable attention of this rank's chunk over the sequence sharded across ``group``."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    out, _ = torch.ops.graphopt.sp_attention(q, k, v, float(scale), bool(causal),
                                             group_name_of(group), bool(load_balance))
    return out


# --- rematerialization ---------------------------------------------------------------------------

def checkpoint_policy(ctx, op, *args, **kwargs):
    """Selective-checkpoint policy: keep attention's (out, lse), recompute everything else."""
    from torch.utils.checkpoint import CheckpointPolicy
    if op in (torch.ops.graphopt.sp_attention.default, torch.ops.graphopt.flash_attention.default):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_context_fn():
    """``torch.utils.checkpoint.checkpoint(fn, ..., use_reentrant=False,
    context_fn=checkpoint_context_fn)``: the layer is recomputed, attention is not."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts
    return create_selective_checkpoint_contexts(checkpoint_policy)
