"""Sequence-parallel attention (DISTFLASHATTN): ``graphopt::sp_attention`` and its backward.

Each rank of the group holds a contiguous chunk of the sequence: q [B, Hq, S/P, D], k, v
[B, Hkv, S/P, D] for tokens [r*S/P, (r+1)*S/P). The op computes, on every rank, that chunk's rows of
attention over the WHOLE sequence -- causal or not -- as if q, k, v had been gathered:

    out_r, lse_r = attention(q_r, cat(k_0..k_{P-1}), cat(v_0..v_{P-1}))   # without the gather

following the steps of ``graphopt.distributed.sp_schedule.build_schedule``, opened and closed by
the two halves of the rank's own diagonal block (``split_diagonal``; config
``sp_split_diagonal``). A step's inputs (the peer's k/v, or a busy peer's query rows for a helper)
are requested one step ahead, so the transfer runs under the current step's block kernel
(``Exchanger`` on a CUDA communication stream). Partial results are kept as their kernels produced
them and merged once at the end, in float32 with their log-sum-exps, rounded once (one fused pass on
CUDA: no float32 accumulator is filled, updated per block and cast). Only the Hkv key/value heads
travel.

The backward takes the saved (q, k, v, out, lse) and the schedule's steps again; it never re-runs the
forward: owners get k/v again and return dk/dv partials, helpers get (q, dout, lse, out) rows --
delta = rowsum(dout * out) instead of out where graphopt's Triton backward runs the block -- and
return dq partials. The rank that owns a gradient sums its partials once at the end in float32,
rounded once (partials travel in q's dtype where torch's cuDNN kernel produced them so, else in
float32).

One implementation serves every device: the block math is ``graphopt.ops.attention`` (Triton kernels
on CUDA, torch's cuDNN attention for the blocks it computes exactly; the float32 torch reference
on CPU) and the transfers are torch.distributed P2P (NCCL on
CUDA, gloo on CPU), so CPU tests check the same function the GPUs run.

A causal mask may be narrowed by a sliding ``window`` and by packed documents (``positions``: this
rank's chunk of position ids that restart at every document). Blocks the mask leaves empty are
neither computed nor sent, and the others are shared between the two ranks that hold their rows and
keys so that every rank computes about the same number of visible (query, key) pairs
(``graphopt.distributed.sp_schedule.build_masked_schedule``).

Every call starts with one exchange among the group's ranks, on every rank (never cached): each
rank's call -- chunk length, shapes, dtype, options, forward or backward -- must equal every
other's, or every rank raises :class:`SequenceParallelError` naming the difference (two ranks given
33 and 32 tokens both stop there, at once); with documents, the exchange also gathers the position
ids, so every rank builds the same schedule. A rank whose peer never arrives gives up after
``peer_timeout_s`` with a graphopt error instead of waiting for the process group's timeout.

Under ``torch.utils.checkpoint`` pass ``context_fn=checkpoint_context_fn`` so the recomputation of
a layer reuses the saved (out, lse) instead of running distributed attention again.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import math
import struct
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from graphopt import _compat
from graphopt.distributed.p2p import exchanger_for, wait_for_peers
from graphopt.distributed.sp_schedule import (DIAGONAL, HELPER, OWNER, Step, Task,
                                              build_masked_schedule, build_schedule, index_range,
                                              local_blocks, split_diagonal, visible_keys)
from graphopt.ops.attention import (KERNELS, attention_block_backward, attention_block_forward,
                                    attention_delta, cudnn_eligible, document_bounds)

__all__ = ["sp_attention", "sp_attention_forward", "sp_attention_backward", "checkpoint_policy",
           "checkpoint_context_fn", "group_name_of", "SpOptions", "SequenceParallelError"]

# How long a rank waits for its peers at an attention before giving up (graphopt.config
# .sp_peer_timeout_s is what the pass emits).
DEFAULT_PEER_TIMEOUT_S = 30.0


class SequenceParallelError(RuntimeError):
    """The ranks of a sequence-parallel group called an attention differently; the message says
    how and what to fix."""


@dataclasses.dataclass(frozen=True)
class SpOptions:
    """Everything besides the tensors that a call of the op is given (the pass emits them from the
    compile's config, so nothing is read from graphopt.config when the op runs)."""

    scale: float
    causal: bool = True
    window: int = 0
    load_balance: bool = True
    split_diagonal: bool = True
    kernel: str = "auto"
    peer_timeout_s: float = DEFAULT_PEER_TIMEOUT_S

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel={self.kernel!r} is not one of {KERNELS}")
        if self.window < 0 or (self.window and not self.causal):
            raise ValueError(f"window={self.window}: a sliding window narrows a causal mask "
                             "(causal=True, window >= 1; 0 for none)")
        if not self.peer_timeout_s > 0:
            raise ValueError(f"peer_timeout_s={self.peer_timeout_s} must be > 0")


def group_name_of(group: Optional[dist.ProcessGroup]) -> str:
    """The name the custom op carries for ``group`` (None: the default group)."""
    return _compat.group_name(group)


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, positions: Optional[Tensor] = None) -> None:
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
    if positions is not None and (positions.dim() != 2 or positions.shape[1] != q.shape[2]
                                  or positions.shape[0] not in (1, q.shape[0])
                                  or positions.is_floating_point()):
        raise ValueError(
            f"positions must be this rank's chunk of integer position ids [1 or B, S/P] = [1 or "
            f"{q.shape[0]}, {q.shape[2]}]; got {positions.dtype} {tuple(positions.shape)}")


def _rows(x: Tensor, start: int, stop: int) -> Tensor:
    return x[:, :, start:stop]


HELPED, ASSISTED = "helped", "assisted"


def _source_row_ranges(task: Task, chunk: int) -> list[tuple[str, tuple[int, int]]]:
    """The source's query rows ``task`` computes, in the order they travel: a helper's rows
    (against this rank's keys), then an assist's (against the source's own keys)."""
    ranges = []
    if task.kind == HELPER:
        ranges.append((HELPED, task.row_range(chunk)))
    if task.assist is not None:
        ranges.append((ASSISTED, task.assist_range(chunk)))
    return [(kind, (start, stop)) for kind, (start, stop) in ranges if start < stop]


# --- agreement: checked on every call, on every rank --------------------------------------------

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_CALL_FIELDS = ("positions per rank", "batch", "query heads", "key/value heads", "head dim",
                "dtype", "causal", "window", "load_balance", "split_diagonal", "kernel",
                "position-id rows", "pass (0 forward, 1 backward)", "scale (bits)")


def _call_header(q: Tensor, k: Tensor, positions: Optional[Tensor], options: SpOptions,
                 backward: bool) -> list[int]:
    dtype = _DTYPES.index(q.dtype) if q.dtype in _DTYPES else len(_DTYPES)
    scale_bits = struct.unpack("<q", struct.pack("<d", float(options.scale)))[0]
    return [q.shape[2], q.shape[0], q.shape[1], k.shape[1], q.shape[3], dtype, options.causal,
            options.window, options.load_balance, options.split_diagonal,
            KERNELS.index(options.kernel), 0 if positions is None else positions.shape[0],
            int(backward), scale_bits]


def _mismatch(headers: list[list[int]]) -> str:
    lines = []
    for index, field in enumerate(_CALL_FIELDS):
        values = [header[index] for header in headers]
        if len(set(values)) > 1:
            lines.append(f"{field}: " + ", ".join(f"rank {r} {v}" for r, v in enumerate(values)))
    fix = ("every rank needs S/P positions of one sequence: shard the batch with graphopt."
           "distributed.sharding.shard_sequence (it names the padding when S is not divisible by "
           "P)") if lines[0].startswith(_CALL_FIELDS[0]) else (
        "every rank of the group must run the same compiled model, with the same graphopt.config, "
        "on chunks of one batch")
    return "; ".join(lines) + ". Fix: " + fix


def _agree(group: dist.ProcessGroup, q: Tensor, k: Tensor, positions: Optional[Tensor],
           options: SpOptions, backward: bool) -> Optional[Tensor]:
    """Checks that every rank makes the same call (one all-gather, on every rank, every call) and
    returns the whole sequence's position ids [Bp, S] (a second all-gather) when given a chunk."""
    world = dist.get_world_size(group)
    header = torch.tensor(_call_header(q, k, positions, options, backward), dtype=torch.int64,
                          device=q.device)
    gathered = [torch.empty_like(header) for _ in range(world)]
    what = f"the other ranks of group {group.group_name!r} at sequence-parallel attention"
    wait_for_peers(dist.all_gather(gathered, header, group=group, async_op=True),
                   options.peer_timeout_s, what)
    headers = [h.tolist() for h in gathered]
    if any(h != headers[0] for h in headers):
        raise SequenceParallelError(
            f"graphopt: the ranks of sequence-parallel group {group.group_name!r} called attention "
            f"differently ({'backward' if backward else 'forward'}, this is rank "
            f"{dist.get_rank(group)}): {_mismatch(headers)}")
    if positions is None:
        return None
    local = positions.to(device=q.device, dtype=torch.int64).contiguous()
    chunks = [torch.empty_like(local) for _ in range(world)]
    wait_for_peers(dist.all_gather(chunks, local, group=group, async_op=True),
                   options.peer_timeout_s, what)
    return torch.cat(chunks, dim=1)


# --- masks ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Masks:
    """A causal mask's narrowing over the whole sequence, in global positions."""

    window: int = 0
    row_start: Optional[Tensor] = None  # [Bp, S] int32 on the device: where each document starts
    col_stop: Optional[Tensor] = None   # [Bp, S]: one past where it ends
    digest: str = ""                    # of row_start, for the schedule cache

    @property
    def narrowed(self) -> bool:
        return bool(self.window) or self.row_start is not None

    def block(self, q_offset: int, q_len: int, k_offset: int, k_len: int,
              backward: bool = False) -> dict:
        """Keyword arguments of the block functions for rows [q_offset, +q_len) and keys
        [k_offset, +k_len)."""
        found = dict(window=self.window)
        if self.row_start is not None:
            found["row_start"] = self.row_start[:, q_offset:q_offset + q_len]
            if backward:
                found["col_stop"] = self.col_stop[:, k_offset:k_offset + k_len]
        return found


def _masks(all_positions: Optional[Tensor], window: int) -> _Masks:
    if all_positions is None:
        return _Masks(window)
    row_start, col_stop = document_bounds(all_positions)
    if not bool((row_start != 0).any()):  # one document per row: plain causal
        return _Masks(window)
    digest = hashlib.sha1(row_start.cpu().numpy().tobytes()).hexdigest()
    return _Masks(window, row_start, col_stop, digest)


def _segments(parts: list[tuple], length: int):
    """The row ranges [lo, hi) between the bounds of every (start, stop, *tensors) part, over
    [0, length), each with the tensors of the parts covering it, sliced to it."""
    edges = sorted({0, length} | {edge for start, stop, *_ in parts for edge in (start, stop)})
    for lo, hi in zip(edges, edges[1:]):
        yield lo, hi, [tuple(_rows(x, lo - start, hi - start) for x in tensors)
                       for start, stop, *tensors in parts if start <= lo and hi <= stop]


class _RowPartials:
    """Partial results of this rank's rows by row range, each kept in the dtype its kernel produced
    and combined once at the end (``total``) in float32, rounded once. More than ``MAX_PENDING``
    are folded into one float32 partial, which bounds the memory they hold at any P."""

    MAX_PENDING = 8

    def __init__(self, rows: int):
        self.rows = rows
        self.parts: list[tuple] = []  # (start, stop, *tensors)

    def add(self, start: int, stop: int, *tensors: Tensor) -> None:
        if stop <= start:
            return
        self.parts.append((start, stop, *tensors))
        if len(self.parts) > self.MAX_PENDING:
            folded = self.total(torch.float32)
            self.parts = [(0, self.rows, *(folded if isinstance(folded, tuple) else (folded,)))]


def sum_partials(out: Tensor, inputs: list[Tensor]) -> None:
    """out = sum(inputs) in float32, rounded once to out's dtype: in one Triton pass on CUDA where
    the layouts allow (``graphopt.kernels.sum_partials``), in torch elsewhere -- so CPU runs need
    no triton; more inputs than the kernel takes are summed in float32 groups."""
    if not inputs:
        out.zero_()
        return
    if out.is_cuda:
        from graphopt.kernels import sum_partials as kernel
        if all(kernel.flat_heads_stride(x) is not None for x in (out, *inputs)):
            while len(inputs) > kernel.MAX_INPUTS:
                head = torch.empty(out.shape, dtype=torch.float32, device=out.device)
                kernel.sum_partials_fused(head, inputs[:kernel.MAX_INPUTS])
                inputs = [head] + inputs[kernel.MAX_INPUTS:]
            kernel.sum_partials_fused(out, inputs)
            return
    total = inputs[0].float()
    for x in inputs[1:]:
        total = total + x.float()
    out.copy_(total)


class _Partials(_RowPartials):
    """Gradient partials of one tensor ([B, H, S/P, D]), summed (``sum_partials``)."""

    def __init__(self, like: Tensor):
        super().__init__(like.shape[2])
        self.like = like

    def total(self, dtype: torch.dtype) -> Tensor:
        """The sum over every row (rows no partial covers are zero)."""
        result = torch.empty(self.like.shape, dtype=dtype, device=self.like.device)
        for lo, hi, covering in _segments(self.parts, self.rows):
            sum_partials(_rows(result, lo, hi), [partial for (partial,) in covering])
        return result


class _OutPartials(_RowPartials):
    """Partial attention results (out, lse) of this rank's query rows, merged with their
    log-sum-exps (``graphopt.ops.attention.merge_parts`` fuses the merge on CUDA)."""

    def __init__(self, q: Tensor):
        super().__init__(q.shape[2])
        self.q = q

    def total(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(out in ``dtype``, lse float32) over every row (rows no part covers: 0 and -inf)."""
        from graphopt.ops.attention import merge_parts
        out = torch.empty(self.q.shape, dtype=dtype, device=self.q.device)
        lse = torch.empty(self.q.shape[:3], dtype=torch.float32, device=self.q.device)
        for lo, hi, covering in _segments(self.parts, self.rows):
            merge_parts(_rows(out, lo, hi), _rows(lse, lo, hi), covering)
        return out, lse


class _Runner:
    """Walks a schedule: inputs of step t + 1 travel while step t computes."""

    def __init__(self, q: Tensor, group: dist.ProcessGroup, options: SpOptions, masks: _Masks,
                 backward: bool = False):
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.chunk = q.shape[2]
        self.causal = options.causal
        self.masks = masks
        self.timeout_s = options.peer_timeout_s if q.device.type == "cpu" else None
        schedule = _schedule(self.world, self.chunk, options.causal, options.load_balance, masks)
        if options.split_diagonal:
            # The diagonal needs no transfer: half of it opens the schedule and hides the first
            # step's inputs, the other half closes it and hides the last partials on their way back.
            self.schedule = split_diagonal(schedule)
        elif backward:
            # Whole, the diagonal goes where it hides the larger transfer: last in backward (the
            # returned dk/dv), first in forward (k/v in).
            self.schedule = schedule[1:] + schedule[:1]
        else:
            self.schedule = schedule
        self.exchanger = exchanger_for(group, q.device)

    def start(self, sends, recvs):
        return self.exchanger.start(sends, recvs, self.timeout_s)

    def offset(self, chunk_rank: int, row_start: int = 0) -> int:
        return chunk_rank * self.chunk + row_start

    def local_blocks(self, task: Task) -> list[tuple[int, int, int, int]]:
        """The (row start, row stop, key start, key stop) blocks of a diagonal task, each one a
        kernel without offsets computes exactly (a diagonal square, or every key visible); under a
        window or documents (graphopt's kernels, with offsets and masks) the task's rectangle."""
        if self.masks.narrowed:
            (r0, r1), (k0, k1) = task.row_range(self.chunk), task.key_range(self.chunk)
            return [(r0, r1, k0, min(k1, r1))] if r0 < r1 and k0 < min(k1, r1) else []
        blocks = []
        for rows, keys in local_blocks(task, self.causal):
            (r0, r1), (k0, k1) = index_range(rows, self.chunk), index_range(keys, self.chunk)
            if r0 < r1 and k0 < k1:
                blocks.append((r0, r1, k0, k1))
        return blocks

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


def _schedule(world: int, chunk: int, causal: bool, load_balance: bool,
              masks: _Masks) -> tuple[Step, ...]:
    if not masks.narrowed:
        return build_schedule(world, causal, load_balance)
    return _masked_schedule(world, chunk, masks.window, load_balance, masks.digest,
                            masks.row_start)


_MASKED_SCHEDULES: "collections.OrderedDict[tuple, tuple[Step, ...]]" = collections.OrderedDict()


def _masked_schedule(world, chunk, window, load_balance, digest, row_start):
    """One schedule per distinct (world, chunk, window, documents), kept for the layers of a step
    and its backward (every rank holds the same position ids, so every rank builds the same)."""
    key = (world, chunk, window, load_balance, digest)
    found = _MASKED_SCHEDULES.get(key)
    if found is None:
        counts = visible_keys(world, chunk, window, None if row_start is None else row_start.cpu())
        found = _MASKED_SCHEDULES[key] = build_masked_schedule(counts, load_balance)
        while len(_MASKED_SCHEDULES) > 16:
            _MASKED_SCHEDULES.popitem(last=False)
    return found


def sp_attention_forward(q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool,
                         group: Optional[dist.ProcessGroup] = None, load_balance: bool = True,
                         window: int = 0, positions: Optional[Tensor] = None,
                         split_diagonal: bool = True, kernel: str = "auto",
                         peer_timeout_s: float = DEFAULT_PEER_TIMEOUT_S) -> tuple[Tensor, Tensor]:
    """(out in q.dtype, lse float32 [B, Hq, S/P]) of this rank's chunk over the whole sequence."""
    options = SpOptions(float(scale), causal, window, load_balance, split_diagonal, kernel,
                        peer_timeout_s)
    _check_inputs(q, k, v, positions)
    group = _compat.resolve_process_group(group)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if dist.get_world_size(group) == 1:
        masks = _masks(positions, window)
        return attention_block_forward(q, k, v, scale=scale, causal=causal, kernel=kernel,
                                       **masks.block(0, q.shape[2], 0, k.shape[2]))
    masks = _masks(_agree(group, q, k, positions, options, backward=False), window)
    run = _Runner(q, group, options, masks)
    rank = run.rank
    parts = _OutPartials(q)
    # graphopt's Triton kernels keep a block's result in float32 (an accumulator of their own);
    # torch's cuDNN kernels return it in q's dtype, which is kept as it is until the merge.
    fp32_parts = not cudnn_eligible(q, k, kernel, masks.narrowed)

    def block(q_rows, k_cols, v_cols, q_offset, k_offset):
        acc = {}
        if fp32_parts:
            acc = dict(out_acc=torch.zeros(q_rows.shape, dtype=torch.float32, device=q.device),
                       lse_acc=torch.full(q_rows.shape[:3], float("-inf"), device=q.device))
        return attention_block_forward(q_rows, k_cols, v_cols, scale=scale, causal=causal,
                                       q_offset=q_offset, k_offset=k_offset, kernel=kernel,
                                       **masks.block(q_offset, q_rows.shape[2], k_offset,
                                                     k_cols.shape[2]), **acc)

    def start_inputs(step: Step):
        """k/v to a peer that owns a block of ours or assists our diagonal, query rows to a peer
        that helps with or assists ours; buffers for what this rank's task reads."""
        sends = []
        dst, src = step.destination(rank), step.source(rank)
        peer_task, task = step.tasks[dst], step.tasks[rank]
        if peer_task.needs_source_kv:
            sends += [(k, dst), (v, dst)]
        for _, rows in _source_row_ranges(peer_task, run.chunk):
            sends.append((_rows(q, *rows).contiguous(), dst))
        buffers = {}
        if task.needs_source_kv:
            buffers["kv"] = (torch.empty_like(k), torch.empty_like(v))
        buffers["rows"] = [(kind, rows, q.new_empty(q.shape[0], q.shape[1], rows[1] - rows[0],
                                                    q.shape[3]))
                           for kind, rows in _source_row_ranges(task, run.chunk)]
        recvs = list(buffers.get("kv", ())) + [buffer for _, _, buffer in buffers["rows"]]
        return run.start(sends, [(buffer, src) for buffer in recvs]), buffers

    def compute(step: Step, buffers):
        """This step's blocks; returns the (out, lse) partials that go back to the source."""
        task, src = step.tasks[rank], step.source(rank)
        start, stop = task.row_range(run.chunk)
        if task.kind == DIAGONAL:
            for r0, r1, k0, k1 in run.local_blocks(task):
                parts.add(r0, r1, *block(_rows(q, r0, r1), _rows(k, k0, k1), _rows(v, k0, k1),
                                         run.offset(rank, r0), run.offset(rank, k0)))
        elif task.kind == OWNER:
            k_src, v_src = buffers["kv"]
            parts.add(start, stop, *block(_rows(q, start, stop), k_src, v_src,
                                          run.offset(rank, start), run.offset(src)))
        results = []
        for kind, (r0, r1), q_src in buffers["rows"]:
            # A helper's rows against this rank's keys, an assist's against the source's own;
            # the result travels in q's dtype whichever kernel ran.
            (k_used, v_used), key_rank = ((k, v), rank) if kind == HELPED else (buffers["kv"], src)
            out, lse = attention_block_forward(
                q_src, k_used, v_used, scale=scale, causal=causal, q_offset=run.offset(src, r0),
                k_offset=run.offset(key_rank), kernel=kernel,
                **masks.block(run.offset(src, r0), r1 - r0, run.offset(key_rank), run.chunk))
            results += [(out, src), (lse, src)]
        return results

    def start_results(step: Step, sends):
        dst = step.destination(rank)
        buffers = []
        for _, (r0, r1) in _source_row_ranges(step.tasks[dst], run.chunk):
            rows = (q.shape[0], q.shape[1], r1 - r0)
            buffers.append(((r0, r1), q.new_empty(*rows, q.shape[3]),
                            torch.empty(rows, dtype=torch.float32, device=q.device)))
        recvs = [(x, dst) for _, out, lse in buffers for x in (out, lse)]
        return run.start(sends, recvs), buffers

    def finish_results(step: Step, buffers):
        for (r0, r1), out, lse in buffers:
            parts.add(r0, r1, out, lse)

    run.run(start_inputs, compute, start_results, finish_results)
    return parts.total(q.dtype)


def sp_attention_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor,
                          *, scale: float, causal: bool, group: Optional[dist.ProcessGroup] = None,
                          load_balance: bool = True, dlse: Optional[Tensor] = None,
                          window: int = 0, positions: Optional[Tensor] = None,
                          split_diagonal: bool = True, kernel: str = "auto",
                          peer_timeout_s: float = DEFAULT_PEER_TIMEOUT_S
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of this rank's chunk from the saved out and lse; no forward is re-run."""
    options = SpOptions(float(scale), causal, window, load_balance, split_diagonal, kernel,
                        peer_timeout_s)
    _check_inputs(q, k, v, positions)
    group = _compat.resolve_process_group(group)
    q, k, v, out, dout = (x.contiguous() for x in (q, k, v, out, dout))
    lse = lse.contiguous()
    lse_grad = dlse is not None
    # d lse / d scores = p, so a gradient on the LSE folds into delta: ds = p * (dp - (delta - dlse)).
    # torch's cuDNN backward derives delta from out itself: there it is not computed at all (a
    # block that falls back to graphopt's kernel then derives it from out too).
    single = dist.get_world_size(group) == 1
    masks = _masks(positions if single else _agree(group, q, k, positions, options, backward=True),
                   window)
    delta = None
    if lse_grad or not cudnn_eligible(q, k, kernel, masks.narrowed):
        delta = attention_delta(out, dout)
        delta = delta - dlse if lse_grad else delta
    if single:
        return attention_block_backward(q, k, v, out, lse, dout, scale=scale, causal=causal,
                                        delta=delta, lse_grad_in_delta=lse_grad, kernel=kernel,
                                        **masks.block(0, q.shape[2], 0, k.shape[2], True))
    run = _Runner(q, group, options, masks, backward=True)
    rank = run.rank
    # A helper's block sees every key. Where torch's cuDNN backward computes it, the helper needs
    # the owner's out rows (the kernel derives delta itself); otherwise delta rows, 1/D the bytes.
    # Every rank decides alike: the choice depends only on dtype, head dim, device and config.
    # Partials that travel keep the dtype cuDNN produces them in (q's: half the bytes of float32,
    # no conversion); graphopt's kernels produce float32 partials, which travel as they are.
    helper_rows, dq_wire, kv_wire = (q, dout, lse, delta), torch.float32, torch.float32
    if delta is None:
        # Grouped heads too: cuDNN sums dK/dV over each query group itself, in k's dtype.
        helper_rows, dq_wire, kv_wire = (q, dout, lse, out), q.dtype, k.dtype
    dq_parts, dk_parts, dv_parts = _Partials(q), _Partials(k), _Partials(v)

    def block_grads(q_rows, k_cols, v_cols, out_rows, lse_rows, dout_rows, delta_rows, q_offset,
                    k_offset):
        """(dq, dk, dv) of one block in the wire dtypes (graphopt's kernels: float32)."""
        dq = None
        if dq_wire == torch.float32:
            dq = torch.zeros(q_rows.shape, dtype=torch.float32, device=q.device)
        return attention_block_backward(
            q_rows, k_cols, v_cols, out_rows, lse_rows, dout_rows, scale=scale, causal=causal,
            q_offset=q_offset, k_offset=k_offset, delta=delta_rows, dq_acc=dq,
            kv_grad_dtype=kv_wire, lse_grad_in_delta=lse_grad, kernel=kernel,
            **masks.block(q_offset, q_rows.shape[2], k_offset, k_cols.shape[2], True))

    def start_inputs(step: Step):
        sends = []
        dst, src = step.destination(rank), step.source(rank)
        peer_task, task = step.tasks[dst], step.tasks[rank]
        if peer_task.needs_source_kv:
            sends += [(k, dst), (v, dst)]
        for _, (start, stop) in _source_row_ranges(peer_task, run.chunk):
            sends += [(_rows(x, start, stop).contiguous(), dst) for x in helper_rows]
        buffers = {}
        if task.needs_source_kv:
            buffers["kv"] = (torch.empty_like(k), torch.empty_like(v))
        buffers["rows"] = [(kind, (start, stop), tuple(torch.empty_like(_rows(x, start, stop))
                                                       for x in helper_rows))
                           for kind, (start, stop) in _source_row_ranges(task, run.chunk)]
        recvs = list(buffers.get("kv", ())) + [x for _, _, rows in buffers["rows"] for x in rows]
        return run.start(sends, [(buffer, src) for buffer in recvs]), buffers

    def compute(step: Step, buffers):
        """This step's blocks; returns what goes back to the source: dk/dv partials of its keys
        (owner, assist), dq partials of its rows (helper, assist)."""
        task, src = step.tasks[rank], step.source(rank)
        start, stop = task.row_range(run.chunk)
        source_kv_grads = None
        if task.kind == DIAGONAL:
            for r0, r1, k0, k1 in run.local_blocks(task):
                dq, dk, dv = block_grads(
                    _rows(q, r0, r1), _rows(k, k0, k1), _rows(v, k0, k1), _rows(out, r0, r1),
                    _rows(lse, r0, r1), _rows(dout, r0, r1),
                    None if delta is None else _rows(delta, r0, r1),
                    run.offset(rank, r0), run.offset(rank, k0))
                dq_parts.add(r0, r1, dq)
                dk_parts.add(k0, k1, dk)
                dv_parts.add(k0, k1, dv)
        elif task.kind == OWNER:
            k_src, v_src = buffers["kv"]
            dq, dk, dv = block_grads(
                _rows(q, start, stop), k_src, v_src, _rows(out, start, stop),
                _rows(lse, start, stop), _rows(dout, start, stop),
                None if delta is None else _rows(delta, start, stop),
                run.offset(rank, start), run.offset(src))
            dq_parts.add(start, stop, dq)
            source_kv_grads = [dk, dv]
        dq_back = []
        for kind, (r0, r1), (q_src, dout_src, lse_src, last) in buffers["rows"]:
            out_src, delta_src = (last, None) if helper_rows[-1] is out else (None, last)
            if kind == HELPED:  # against this rank's keys
                dq, dk, dv = block_grads(q_src, k, v, out_src, lse_src, dout_src, delta_src,
                                         run.offset(src, r0), run.offset(rank))
                dk_parts.add(0, run.chunk, dk)
                dv_parts.add(0, run.chunk, dv)
            else:  # an assist: against the source's own keys, whose gradients go back too
                k_src, v_src = buffers["kv"]
                dq, dk, dv = block_grads(q_src, k_src, v_src, out_src, lse_src, dout_src,
                                         delta_src, run.offset(src, r0), run.offset(src))
                source_kv_grads = [dk, dv] if source_kv_grads is None else [
                    source_kv_grads[0].add_(dk), source_kv_grads[1].add_(dv)]
            dq_back.append(dq)
        return [(x, src) for x in (source_kv_grads or []) + dq_back]

    def start_results(step: Step, sends):
        dst = step.destination(rank)
        peer_task = step.tasks[dst]
        kv_grads = ()
        if peer_task.needs_source_kv:
            kv_grads = (torch.empty_like(k, dtype=kv_wire), torch.empty_like(v, dtype=kv_wire))
        dq_rows = [((start, stop), torch.empty_like(_rows(q, start, stop), dtype=dq_wire,
                                                    memory_format=torch.contiguous_format))
                   for _, (start, stop) in _source_row_ranges(peer_task, run.chunk)]
        recvs = list(kv_grads) + [buffer for _, buffer in dq_rows]
        return run.start(sends, [(buffer, dst) for buffer in recvs]), (kv_grads, dq_rows)

    def finish_results(step: Step, buffers):
        kv_grads, dq_rows = buffers
        if kv_grads:
            dk_parts.add(0, run.chunk, kv_grads[0])
            dv_parts.add(0, run.chunk, kv_grads[1])
        for (start, stop), dq in dq_rows:
            dq_parts.add(start, stop, dq)

    run.run(start_inputs, compute, start_results, finish_results)
    return dq_parts.total(q.dtype), dk_parts.total(k.dtype), dv_parts.total(v.dtype)


# --- custom ops ------------------------------------------------------------------------------------

@torch.library.custom_op("graphopt::sp_attention", mutates_args=())
def _sp_attention_op(q: Tensor, k: Tensor, v: Tensor, positions: Optional[Tensor], scale: float,
                     causal: bool, window: int, group_name: str, load_balance: bool,
                     split_diagonal: bool, kernel_choice: str,
                     peer_timeout_s: float) -> tuple[Tensor, Tensor]:
    # "kernel_choice", not "kernel": see graphopt.ops.attention._flash_attention_op.
    return sp_attention_forward(q, k, v, scale=scale, causal=causal, group=group_name,
                                load_balance=load_balance, window=window, positions=positions,
                                split_diagonal=split_diagonal, kernel=kernel_choice,
                                peer_timeout_s=peer_timeout_s)


@_sp_attention_op.register_fake
def _(q, k, v, positions, scale, causal, window, group_name, load_balance, split_diagonal,
      kernel_choice, peer_timeout_s):
    _check_inputs(q, k, v, positions)
    SpOptions(scale, causal, window, load_balance, split_diagonal, kernel_choice, peer_timeout_s)
    # The real outputs are contiguous whatever the strides of q (q is often a transposed view).
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("graphopt::sp_attention_backward", mutates_args=())
def _sp_attention_backward_op(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                              dout: Tensor, dlse: Optional[Tensor], positions: Optional[Tensor],
                              scale: float, causal: bool, window: int, group_name: str,
                              load_balance: bool, split_diagonal: bool, kernel_choice: str,
                              peer_timeout_s: float) -> tuple[Tensor, Tensor, Tensor]:
    return sp_attention_backward(q, k, v, out, lse, dout, scale=scale, causal=causal,
                                 group=group_name, load_balance=load_balance, dlse=dlse,
                                 window=window, positions=positions,
                                 split_diagonal=split_diagonal, kernel=kernel_choice,
                                 peer_timeout_s=peer_timeout_s)


@_sp_attention_backward_op.register_fake
def _(q, k, v, out, lse, dout, dlse, positions, scale, causal, window, group_name, load_balance,
      split_diagonal, kernel_choice, peer_timeout_s):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, positions, *options = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, positions)
    ctx.options = tuple(options)
    # An unused LSE must reach backward as None, not zeros: a gradient on the LSE keeps every block
    # on graphopt's Triton backward (torch's cuDNN backward cannot take one).
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, positions = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.graphopt.sp_attention_backward(q, k, v, out, lse, dout, dlse, positions,
                                                          *ctx.options)
    return (dq, dk, dv) + (None,) * (1 + len(ctx.options))


_sp_attention_op.register_autograd(_backward, setup_context=_setup_context)


def sp_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None,
                 causal: bool = True, group: Optional[dist.ProcessGroup] = None,
                 load_balance: bool = True, window: int = 0, positions: Optional[Tensor] = None,
                 split_diagonal: bool = True, kernel: str = "auto",
                 peer_timeout_s: float = DEFAULT_PEER_TIMEOUT_S) -> Tensor:
    """Differentiable attention of this rank's chunk over the sequence sharded across ``group``;
    ``window`` and the documents of ``positions`` (this rank's chunk of position ids) narrow a
    causal mask."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    out, _ = torch.ops.graphopt.sp_attention(q, k, v, positions, float(scale), bool(causal),
                                             int(window), group_name_of(group), bool(load_balance),
                                             bool(split_diagonal), kernel, float(peer_timeout_s))
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
