"""GEMM fused with the collective that consumes (or feeds) it, as functional custom ops.

Three ops, each the function of the unfused pair it replaces (sum reduction only):

    graphopt::matmul_all_reduce(a, b, bias?, group, mode, chunks, comm_sms, taper=1, replay=False)
        = all_reduce_sum(a @ b + bias)                          a [M, K] or [B, M, K]
    graphopt::matmul_reduce_scatter(a, b, group, world, scatter_dim, mode, chunks, comm_sms, taper=1,
                                    replay=False)
        = reduce_scatter_sum(a @ b, scatter_dim)                a [..., K], out dim scatter_dim / P
    graphopt::all_gather_matmul(a_shard, b, group, world, gather_dim, chunks)
        = (g, g @ b) with g = all_gather(a_shard, gather_dim)

``mode`` picks the runtime: "chunked" (this module, any device and backend), "copy_engine" (this
module, cuBLAS chunks + peer-to-peer copies on symmetric memory; CUDA only) or "tile" (the
tile-triggered Triton kernel on symmetric memory, ``graphopt.kernels.matmul_tile_signal``; CUDA
only; ``comm_sms`` communication CTAs). All compute the same function; the graph pass chooses with
``graphopt.analysis.overlap_cost``.

Chunked runtime: the GEMM is cut into ``chunks`` row blocks; after each block is written, its
collective is issued asynchronously (``async_op=True``). On NCCL the collective runs on NCCL's
stream, which waits only for the chunk just written, so it overlaps the next chunks' GEMMs; on gloo
it runs on gloo's worker thread. All handles are waited before the op returns, so the result is an
ordinary tensor.

Chunk layouts:
- all-reduce: rows of ``a`` (dim -2); every chunk of the output is a contiguous row block.
- reduce-scatter: the output layout must stay "rank r holds block r of scatter_dim". Chunk j takes
  sub-block j of EVERY rank's block (rows r * M/P + [j*s, (j+1)*s) for all r), stacks them rank-major,
  and reduce-scatters that stack, which hands rank r its own sub-block j; it is written to rows
  [j*s, (j+1)*s) of the result. So the chunk count must divide M / P.
- all-gather: the shard is cut into ``chunks`` row blocks along gather_dim; gathering block j of every
  rank yields rows r * M/P + [j*s, (j+1)*s) of the gathered input, whose GEMM runs while block j+1
  is still in flight.

Copy-engine runtime (2-D mm, no bias): the GEMM stays in cuBLAS and the communication leaves the
SMs: it is peer-to-peer ``copy_`` (cudaMemcpyAsync, run by the copy engines) out of the peers'
symmetric buffers, on a communication stream. Rank r's rows [M] are cut into P rank blocks and
every block into ``chunks`` sub-chunks (the same bounds on every rank). For P = 2, rank r:

    phase 1, block d of the peer (d = r + 1), sub-chunk j = 0 .. c-1:
        compute: partial[d_j] = a[d_j] @ b                        (cuBLAS into the symmetric buffer)
        comm:    wait for it; hand-off; pull peer's partial[r_j] -> mine[r_j]
    phase 2, own block r, sub-chunk j:
        compute: wait for pull j; mine[r_j] += a[r_j] @ b         (addmm: the reduction is in the GEMM)
        all-reduce only -- compute: out[r_j] = partial[r_j]   (a local copy)
                           comm: wait for the GEMM; barrier; pull peer's partial[d_j] -> out[d_j]
    end: comm: barrier (reduce-scatter only: every rank has finished reading this call's buffer);
         compute waits for comm

``mine`` is the reduce-scatter output, or (all-reduce) the own block of the symmetric buffer, so that
the peers can pull the reduced rows. For P > 2 phase 1 has P - 1 steps (block r + s from step s;
the pull of step s comes from rank r - s, which computes block r at its step s; steps after the
first pull into a staging buffer and add, on the communication stream), and phase 2 pulls from every
peer. Every block is reduced by its owner alone and copied bitwise by the others, so an all-reduce is
bitwise identical on every rank; the operands of each sum are fixed, so results never depend on
timing.

Sub-chunk sizes (``taper``, the copy-engine runtime only): with taper 1 the sub-chunks of a block
are near-equal; with taper q < 1 sub-chunk j is about q^j times the first (trailing ones in whole
``ROW_UNIT`` rows; the bounds come from ``graphopt.analysis.overlap_schedule``, which the cost model
walks too). What stays exposed after the last GEMM is the communication of the last sub-chunk
(all-reduce: barrier + pull-back of its rows), so a small last sub-chunk shortens the tail; a large
first one costs nothing on P = 2, where phase 2's first GEMM waits for that pull only after the
whole of phase 1. ``chunks`` and ``taper`` are chosen by the cost model, which walks this schedule.

Synchronisation: a peer's rows are pulled only after that peer has signalled, after the event of
the GEMM writing them (read after write). In phase 1 the step's producer is one rank (the source),
so the step is a hand-off: signal the rank that pulls from this one (dest), wait for the source's
signal -- two flags and a reset, where a barrier would signal and wait for every peer (3 (P - 1)
driver operations; measured at 4.6 us of host time each, and a barrier's GPU time grows with P).
Phase 2 of the all-reduce and the end of the reduce-scatter are barriers. The caller's stream waits
for the last barrier before returning, so the next call's GEMMs and pulls, which overwrite the
symmetric buffer, start only after every rank has finished reading it (write after read;
tests/unit/test_overlap_copy_engine.py checks both orders on a simulator with vector clocks). All
synchronisations run on one stream in the same order on every rank.
Nothing syncs the host, so the call can be captured in a CUDA graph once the workspace exists
(``graphopt.distributed.symm_mem.copy_engine_workspace``).

Replay (``replay=True``, what the pass emits under ``config.overlap_graph_replay``): the call is
issued through ``graphopt.distributed.graph_replay``: eagerly the first time a (a, b, output)
address / shape / stride combination is seen, captured in a CUDA graph the second time, replayed
after that. Issued op by op a call costs 0.4-2.9 ms of host time (P = 2-4), more than the GPU time of
the smaller shapes; replayed, 0.09-0.27 ms. The device work, and so the result, is the same bits
either way.

The ops run after autograd (in the joint graph) and so have no autograd formula; they never mutate
their inputs.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from graphopt import _compat
from graphopt.analysis.overlap_schedule import chunk_bounds, copy_engine_blocks
from graphopt.distributed import faults

log = logging.getLogger("graphopt.ops.matmul_collectives")

MODES = ("chunked", "copy_engine", "tile", "tracked", "tracked_two_shot")
# torch 2.13 renamed these (same arguments); 2.11 has only the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _group(group_name: str):
    return _compat.resolve_process_group(group_name)


def _check_mode(mode: str, a: Tensor) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    if mode == "tile" and not a.is_cuda:
        raise ValueError("mode='tile' runs the Triton tile kernel on symmetric memory and needs CUDA "
                         "tensors; use mode='chunked' on CPU")
    if mode == "copy_engine" and not a.is_cuda:
        raise ValueError("mode='copy_engine' copies between CUDA symmetric-memory buffers and needs "
                         "CUDA tensors; use mode='chunked' on CPU")
    if mode.startswith("tracked") and not a.is_cuda:
        raise ValueError(f"mode={mode!r} runs cuBLASLt's tracked GEMM on symmetric memory and needs "
                         "CUDA tensors; use mode='chunked' on CPU")


def _tracked(a: Tensor, b: Tensor, bias: Optional[Tensor], group_name: str, mode: str, chunks: int,
             comm_sms: int, scatter: bool, replay: bool) -> Tensor:
    """The tracked runtime (``graphopt.ops.tracked_collectives``), or the copy-engine runtime where
    cuBLASLt refuses the counters (logged once with the reason)."""
    from graphopt.ops import tracked_collectives

    if bias is not None or a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"mode={mode!r} supports a plain 2-D mm (no bias, no batch); the pass "
                         "chooses 'chunked' for addmm and bmm")
    collective = "reduce-scatter" if scatter else "all-reduce"
    if tracked_collectives.fallback_reason(a, b, chunks, "out", collective) is not None:
        world = _group(group_name).size()
        return _copy_engine(a, b, group_name, max(1, chunks // world), 1.0, scatter, replay)
    return tracked_collectives.matmul_reduce(a, b, group_name, chunks, comm_sms, scatter,
                                             two_shot=mode == "tracked_two_shot")


# --- copy-engine runtime ---------------------------------------------------------------------------

class _CudaStreams:
    """The copy-engine pipeline's effects on CUDA: GEMMs on the caller's stream; barriers and copies
    on the workspace's communication stream (inside ``on_comm()``); events order the two.

    Host cost matters here: the call issues a few ops per sub-chunk, and where they take longer to
    issue than the GPU takes to run them the pipeline starves. Hence one stream switch per
    communication step and events reused from the workspace rather than created per call.
    """

    def __init__(self, workspace):
        self.workspace = workspace
        self.partial = workspace.partial
        self.compute = torch.cuda.current_stream()
        self.comm = workspace.comm_stream
        self._events = iter(workspace.events)

    def _event(self):
        event = next(self._events, None)
        if event is None:
            event = torch.cuda.Event()
            self.workspace.events.append(event)
        return event

    def on_comm(self):
        return torch.cuda.stream(self.comm)

    def peer(self, rank: int) -> Tensor:
        return self.workspace.peers[rank]

    def gemm(self, a: Tensor, b: Tensor, out: Tensor, accumulate: bool) -> None:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)

    def compute_copy(self, dst: Tensor, src: Tensor) -> None:
        # On the caller's stream: the communication stream stays free for the peer pulls.
        dst.copy_(src)

    def compute_token(self):
        event = self._event()
        event.record(self.compute)
        return event

    def comm_token(self):
        event = self._event()
        event.record(self.comm)
        return event

    def comm_wait(self, token) -> None:
        self.comm.wait_event(token)

    def compute_wait(self, token) -> None:
        self.compute.wait_event(token)

    def barrier(self) -> None:
        self.workspace.barrier(self.comm)

    def handoff(self, dest: int, source: int) -> None:
        self.workspace.handoff(dest, source, self.comm)

    def copy(self, dst: Tensor, src: Tensor) -> None:
        dst.copy_(src)

    def add(self, dst: Tensor, src: Tensor) -> None:
        dst.add_(src)


def copy_engine_pipeline(io, a: Tensor, b: Tensor, out: Tensor, rank: int, world: int, chunks: int,
                         scatter: bool, taper: float = 1.0) -> None:
    """Run the copy-engine schedule (module docstring) through ``io`` (``_CudaStreams`` on GPU; the
    CPU tests pass a simulator that checks every read against the barriers).

    Work is issued in schedule order: each sub-chunk's communication right after its GEMM, so a
    pull is queued before the next GEMM is. (Issuing a step's GEMMs first and its communication
    after them switches streams less often; in two consecutive bench runs on one 2 x H200 machine
    its host time per call measured lower, e.g. 275 vs 606 us for a 2-sub-chunk all-reduce, though
    such timings vary up to 2x between runs, but its GPU time did not improve: reduce-scatter
    0-8% slower, all-reduce within 3%.)"""
    blocks = copy_engine_blocks(a.shape[0], world, chunks, taper)
    own = blocks[rank]
    own_start = own[0][0]

    def mine(start: int, end: int) -> Tensor:
        return out[start - own_start:end - own_start] if scatter else io.partial[start:end]

    staging = out.new_empty(max(e - s for s, e in own), out.shape[1]) if world > 2 else None
    pulled = []
    for step in range(1, world):
        dest, source = (rank + step) % world, (rank - step) % world
        for j, ((start, end), (own_lo, own_hi)) in enumerate(zip(blocks[dest], own)):
            io.gemm(a[start:end], b, io.partial[start:end], accumulate=False)
            written = io.compute_token()
            with io.on_comm():
                io.comm_wait(written)
                if step == 1 and j == 0 and not scatter:
                    # The all-reduce's first write to its own rows (the pull below) must follow
                    # every peer's pull-back of them in the previous call: a barrier, not a hand-off.
                    io.barrier()
                else:
                    io.handoff(dest, source)   # dest may pull what the GEMM wrote; source's rows are ready
                remote = io.peer(source)[own_lo:own_hi]
                if step == 1:
                    io.copy(mine(own_lo, own_hi), remote)
                else:
                    piece = staging[:own_hi - own_lo]
                    io.copy(piece, remote)
                    io.add(mine(own_lo, own_hi), piece)
                if step == world - 1:
                    pulled.append(io.comm_token())
    for j, (start, end) in enumerate(own):
        if pulled:
            io.compute_wait(pulled[j])
        io.gemm(a[start:end], b, mine(start, end), accumulate=world > 1)
        if not scatter:
            reduced = io.compute_token()
            io.compute_copy(out[start:end], io.partial[start:end])
            with io.on_comm():
                io.comm_wait(reduced)
                io.barrier()
                for peer in range(world):
                    if peer != rank:
                        p_start, p_end = blocks[peer][j]
                        io.copy(out[p_start:p_end], io.peer(peer)[p_start:p_end])
    with io.on_comm():
        if scatter:
            # Write after read: the peers' last pulls from this buffer are done before the next
            # call's GEMMs overwrite it. (All-reduce needs no extra barrier: its phase-2 barriers
            # order every read of phase 1, and its own rows are next written after the first one.)
            io.barrier()
        done = io.comm_token()
    io.compute_wait(done)


def _layout(t: Tensor) -> tuple:
    return t.data_ptr(), tuple(t.shape), t.stride(), t.dtype


def _copy_engine(a: Tensor, b: Tensor, group_name: str, chunks: int, taper: float,
                 scatter: bool, replay: bool) -> Tensor:
    from graphopt.distributed import symm_mem

    if a.dim() != 2 or b.dim() != 2:
        raise ValueError("mode='copy_engine' supports a plain 2-D mm (no bias, no batch); the pass "
                         "chooses 'chunked' for addmm and bmm")
    m, n = a.shape[0], b.shape[1]
    workspace = symm_mem.copy_engine_workspace(group_name, m, n, a.dtype, a.device)
    world, rank = workspace.world_size, workspace.rank
    out = a.new_empty(m // world if scatter else m, n)
    chunks = min(chunks, (symm_mem.MAX_SYNCS - 1) // world)

    def issue() -> None:
        workspace.begin_call()
        copy_engine_pipeline(_CudaStreams(workspace), a, b, out, rank, world, chunks, scatter, taper)

    if replay:
        # Everything a graph of this call bakes in besides the workspace (which owns the graphs).
        key = (_layout(a), _layout(b), out.data_ptr(), chunks, taper, scatter, symm_mem.HANDOFFS,
               symm_mem.BATCH_MEMOPS)
        workspace.graphs.run(key, issue)
    else:
        issue()
    return out


def _tile(a: Tensor, b: Tensor, group_name: str, comm_sms: int, scatter: bool) -> Tensor:
    """The tile-triggered kernel on this group's cached symmetric workspace for the shape."""
    from graphopt.distributed import symm_mem
    from graphopt.kernels import matmul_tile_signal as kernel

    kernel.check_operands(a, b)
    m, n = a.shape[0], b.shape[1]
    workspace = symm_mem.tile_workspace(group_name, m, n, a.dtype, a.device,
                                        kernel.flag_count(m, n, _group(group_name).size()))
    run = kernel.matmul_reduce_scatter_tile if scatter else kernel.matmul_all_reduce_tile
    return run(a, b, workspace, comm_sms)


# --- matmul + all-reduce ---------------------------------------------------------------------------

def _finish(work) -> None:
    """Wait for one chunk's collective; where it fails because a peer failed, say which and why."""
    try:
        work.wait()
    except RuntimeError as error:
        failed = faults.failure() if faults.several_ranks() else None
        if failed:
            raise RuntimeError(f"graphopt's chunked collective could not finish: {failed}") from error
        raise


def _matmul_all_reduce_chunked(a: Tensor, b: Tensor, bias: Optional[Tensor], group_name: str,
                               chunks: int) -> Tensor:
    group = _group(group_name)
    out = torch.empty(*a.shape[:-1], b.shape[-1], dtype=a.dtype, device=a.device)
    works = []
    rows = a.shape[-2]
    for start, end in chunk_bounds(rows, chunks):
        a_rows = a.narrow(-2, start, end - start)
        if a.dim() == 2:
            target = out.narrow(0, start, end - start)  # a contiguous row block: no copy
            if bias is None:
                torch.mm(a_rows, b, out=target)
            else:
                bias_rows = bias if bias.dim() < 2 else bias.narrow(0, start, end - start)
                torch.addmm(bias_rows, a_rows, b, out=target)
        else:
            # bmm: rows of every batch form a strided block; reduce a contiguous copy of it.
            target = torch.bmm(a_rows, b)
            if bias is not None:
                target = target + (bias if bias.dim() < 2 else bias.narrow(-2, start, end - start))
        works.append((dist.all_reduce(target, group=group, async_op=True), target, start, end))
    for work, target, start, end in works:
        _finish(work)
        if a.dim() != 2:
            out.narrow(-2, start, end - start).copy_(target)
    return out


@torch.library.custom_op("graphopt::matmul_all_reduce", mutates_args=())
def matmul_all_reduce(a: Tensor, b: Tensor, bias: Optional[Tensor], group_name: str, mode: str,
                      chunks: int, comm_sms: int, taper: float = 1.0, replay: bool = False) -> Tensor:
    """all_reduce_sum(a @ b + bias) over ``group_name``, overlapped (see the module docstring;
    ``replay``: the copy-engine runtime replays CUDA graphs of repeated calls)."""
    _check_mode(mode, a)
    if mode == "tile":
        if bias is not None or a.dim() != 2:
            raise ValueError("mode='tile' supports plain 2-D mm (no bias, no batch); the pass "
                             "chooses 'chunked' for addmm and bmm")
        return _tile(a, b, group_name, comm_sms, scatter=False)
    if mode == "copy_engine":
        if bias is not None:
            raise ValueError("mode='copy_engine' supports plain mm (no bias); the pass chooses "
                             "'chunked' for addmm")
        return _copy_engine(a, b, group_name, chunks, taper, scatter=False, replay=replay)
    if mode.startswith("tracked"):
        return _tracked(a, b, bias, group_name, mode, chunks, comm_sms, False, replay)
    return _matmul_all_reduce_chunked(a, b, bias, group_name, chunks)


@matmul_all_reduce.register_fake
def _(a, b, bias, group_name, mode, chunks, comm_sms, taper=1.0, replay=False):
    return a.new_empty(*a.shape[:-1], b.shape[-1])


# --- matmul + reduce-scatter -----------------------------------------------------------------------

def _scatter_front(a: Tensor, scatter_dim: int) -> Tensor:
    """``a`` [..., K] with the scatter dim moved to the front (a view)."""
    return a.movedim(scatter_dim, 0)


def _matmul_reduce_scatter_chunked(a: Tensor, b: Tensor, group_name: str, world_size: int,
                                   scatter_dim: int, chunks: int) -> Tensor:
    group = _group(group_name)
    front = _scatter_front(a, scatter_dim)            # [S, rest..., K]
    block = front.shape[0] // world_size
    stacked = front.unflatten(0, (world_size, block))  # [P, S/P, rest..., K]
    out_front = torch.empty(block, *front.shape[1:-1], b.shape[-1], dtype=a.dtype, device=a.device)
    works = []
    for start, end in chunk_bounds(block, chunks):
        partial = torch.matmul(stacked.narrow(1, start, end - start), b).contiguous()
        piece = torch.empty_like(partial[0])
        works.append((_reduce_scatter_single(piece, partial.flatten(0, 1), group=group,
                                                async_op=True),
                      piece, start, end))
    for work, piece, start, end in works:
        _finish(work)
        out_front.narrow(0, start, end - start).copy_(piece)
    return out_front.movedim(0, scatter_dim).contiguous()


@torch.library.custom_op("graphopt::matmul_reduce_scatter", mutates_args=())
def matmul_reduce_scatter(a: Tensor, b: Tensor, group_name: str, world_size: int, scatter_dim: int,
                          mode: str, chunks: int, comm_sms: int, taper: float = 1.0,
                          replay: bool = False) -> Tensor:
    """reduce_scatter_sum(a @ b) along ``scatter_dim`` of the output, overlapped."""
    _check_mode(mode, a)
    if a.shape[scatter_dim] % world_size:
        raise ValueError(f"dim {scatter_dim} of size {a.shape[scatter_dim]} is not divisible by "
                         f"world size {world_size}; reduce-scatter needs equal blocks")
    if mode == "tile":
        if a.dim() != 2 or scatter_dim != 0:
            raise ValueError("mode='tile' supports a 2-D mm scattered along rows; the pass chooses "
                             "'chunked' otherwise")
        return _tile(a, b, group_name, comm_sms, scatter=True)
    if mode == "copy_engine":
        if scatter_dim != 0:
            raise ValueError("mode='copy_engine' scatters along rows (dim 0) only; the pass chooses "
                             "'chunked' otherwise")
        return _copy_engine(a, b, group_name, chunks, taper, scatter=True, replay=replay)
    if mode.startswith("tracked"):
        if scatter_dim != 0 or mode != "tracked":
            raise ValueError(f"mode={mode!r}: the tracked reduce-scatter scatters along rows (dim 0), "
                             "one-shot; the pass chooses 'chunked' otherwise")
        return _tracked(a, b, None, group_name, mode, chunks, comm_sms, True, replay)
    return _matmul_reduce_scatter_chunked(a, b, group_name, world_size, scatter_dim, chunks)


@matmul_reduce_scatter.register_fake
def _(a, b, group_name, world_size, scatter_dim, mode, chunks, comm_sms, taper=1.0, replay=False):
    shape = [*a.shape[:-1], b.shape[-1]]
    shape[scatter_dim] //= world_size
    return a.new_empty(shape)


# --- all-gather + matmul ---------------------------------------------------------------------------

def _all_gather_matmul_chunked(a_shard: Tensor, b: Tensor, group_name: str, world_size: int,
                               gather_dim: int, chunks: int) -> tuple[Tensor, Tensor]:
    group = _group(group_name)
    block = a_shard.shape[gather_dim]
    gathered_shape = list(a_shard.shape)
    gathered_shape[gather_dim] *= world_size
    gathered = a_shard.new_empty(gathered_shape)
    out = a_shard.new_empty(*gathered_shape[:-1], b.shape[-1])
    # Rank-major views: [..., P, S/P, ...] along the gather dim.
    gathered_ranks = gathered.unflatten(gather_dim, (world_size, block))
    out_ranks = out.unflatten(gather_dim, (world_size, block))
    pending = []
    for start, end in chunk_bounds(block, chunks):
        piece = a_shard.narrow(gather_dim, start, end - start).contiguous()
        received = piece.new_empty(world_size, *piece.shape)
        work = _all_gather_single(received.flatten(0, 1), piece, group=group, async_op=True)
        pending.append((work, received, start, end))
    for work, received, start, end in pending:
        _finish(work)
        product = torch.matmul(received, b)  # [P, piece..., N]
        gathered_ranks.narrow(gather_dim + 1, start, end - start).copy_(received.movedim(0, gather_dim))
        out_ranks.narrow(gather_dim + 1, start, end - start).copy_(product.movedim(0, gather_dim))
    return gathered, out


@torch.library.custom_op("graphopt::all_gather_matmul", mutates_args=())
def all_gather_matmul(a_shard: Tensor, b: Tensor, group_name: str, world_size: int, gather_dim: int,
                      chunks: int, mode: str = "chunked") -> tuple[Tensor, Tensor]:
    """(g, g @ b) with g = all_gather(a_shard) along ``gather_dim``, overlapped chunk by chunk
    (``mode`` "tracked": the GEMM's in-counters gate each gathered chunk, copy engine; where
    cuBLASLt refuses them, the chunked runtime, logged once)."""
    if mode == "tracked":
        from graphopt.ops import tracked_collectives

        _check_mode(mode, a_shard)
        if a_shard.dim() != 2 or gather_dim != 0:
            raise ValueError("mode='tracked' gathers a 2-D shard along rows (dim 0); the pass "
                             "chooses 'chunked' otherwise")
        total = world_size * len(chunk_bounds(a_shard.shape[0], chunks))
        if tracked_collectives.fallback_reason(a_shard, b, total, "in", "all-gather",
                                               a_rows=a_shard.shape[0] * world_size) is None:
            return tracked_collectives.all_gather_matmul(a_shard, b, group_name, chunks)
    elif mode != "chunked":
        raise ValueError(f"all_gather_matmul mode={mode!r} is not 'chunked' or 'tracked'")
    return _all_gather_matmul_chunked(a_shard, b, group_name, world_size, gather_dim, chunks)


@all_gather_matmul.register_fake
def _(a_shard, b, group_name, world_size, gather_dim, chunks, mode="chunked"):
    shape = list(a_shard.shape)
    shape[gather_dim] *= world_size
    return a_shard.new_empty(shape), a_shard.new_empty(*shape[:-1], b.shape[-1])
