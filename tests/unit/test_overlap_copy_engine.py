"""The copy-engine schedule of graphopt::matmul_all_reduce / matmul_reduce_scatter, on CPU.

``copy_engine_pipeline`` runs here against a simulator instead of CUDA streams: P threads play the
P ranks, each with a symmetric buffer the others can read, real barriers and real pairwise
hand-offs (signal one peer, wait for another). The simulator keeps the happens-before of the GPU
runtime (vector clocks), not the thread interleaving: a GEMM on the compute stream may run any time
after the last event it waited for, a copy on the communication stream any time after its last
synchronisation. It raises ``Race`` where a rank reads a peer's rows that no barrier has
published since they were written (read after write), or overwrites rows that a peer may still be
reading (write after read, also across calls), or where one stream reads what the other wrote
without an event. The outputs are checked against the unfused reduction in float64.
"""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch
from hypothesis import given, settings, strategies as st

from graphopt.analysis.overlap_schedule import ROW_UNIT, copy_engine_blocks
from graphopt.ops.matmul_collectives import MODES, copy_engine_pipeline


class Race(AssertionError):
    pass


class _Row:
    """One row of a rank's symmetric buffer: when its last write became readable, who read it when."""

    def __init__(self):
        self.published: int | None = 0       # the owner's clock at which peers may read it
        self.reads: list[tuple[int, int]] = []   # (reader, reader's clock) of the peers' reads


def _join(clock: list[int], other: list[int]) -> None:
    for index, value in enumerate(other):
        clock[index] = max(clock[index], value)


class SimulatedRank:
    """``_CudaStreams`` for one simulated rank (see the module docstring).

    Happens-before is a vector clock per stream: component q of a clock is how many of rank q's
    synchronisations (barriers, hand-offs) this stream is ordered after. A synchronisation of rank r
    advances its own component and publishes the buffer rows written before it, stamped with it; a
    barrier joins every rank's clock, a hand-off gives the destination this rank's clock. A peer may
    read a row once its clock has reached the row's stamp; a row may be overwritten once the writing
    stream's clock has passed every read of it."""

    def __init__(self, rank: int, world: "SimulatedWorld", rows: int, cols: int):
        self.rank, self.world = rank, world
        size = world.size
        self.partial = torch.full((rows, cols), float("nan"), dtype=torch.float64)
        self.rows = [_Row() for _ in range(rows)]
        self.out: torch.Tensor | None = None
        self.clock = [0] * size          # the communication stream's
        self.compute_clock = [0] * size  # what the compute stream last waited for
        self.syncs = 0                   # synchronisations issued (hand-off slots line up by it)
        self.compute_seq = self.comm_seq = 0
        self.comm_saw_compute = self.compute_saw_comm = 0
        self.unpublished: list[tuple[int, int]] = []    # (compute seq, row) of buffer writes
        self.comm_buffer_writes: list[int] = []         # rows the comm stream wrote since the last sync
        self.local_writer: dict[tuple[str, int], tuple[str, int]] = {}

    # --- locating views -----------------------------------------------------------------------
    def _where(self, view: torch.Tensor) -> tuple[str, int, range]:
        for owner in self.world.ranks:
            for name, base in (("partial", owner.partial), ("out", owner.out)):
                if base is None:
                    continue
                offset = view.data_ptr() - base.data_ptr()
                row_bytes = base.stride(0) * base.element_size()
                if 0 <= offset < base.numel() * base.element_size():
                    if owner is not self:
                        assert name == "partial", "a peer's output is never touched"
                    first = offset // row_bytes
                    return name, owner.rank, range(first, first + view.shape[0])
        return "staging", self.rank, range(0)

    # --- compute stream -----------------------------------------------------------------------
    def gemm(self, a, b, out, accumulate):
        self.compute_seq += 1
        name, owner, rows = self._where(out)
        if accumulate:
            self._check_local_read(name, rows, reader="compute")
        for row in rows:
            if name == "partial":
                self._check_overwrite(row, self.compute_clock, "GEMM")
                self.rows[row].published = None
                self.unpublished.append((self.compute_seq, row))
            self.local_writer[(name, row)] = ("compute", self.compute_seq)
        if accumulate:
            out.add_(a @ b)
        else:
            out.copy_(a @ b)

    def compute_copy(self, dst, src):
        self.compute_seq += 1
        name, owner, rows = self._where(src)
        assert owner == self.rank
        self._check_local_read(name, rows, reader="compute")
        name, owner, rows = self._where(dst)
        assert name == "out" and owner == self.rank
        for row in rows:
            self.local_writer[(name, row)] = ("compute", self.compute_seq)
        dst.copy_(src)

    def compute_token(self):
        return self.compute_seq

    def compute_wait(self, token):
        seq, clock = token
        self.compute_saw_comm = max(self.compute_saw_comm, seq)
        _join(self.compute_clock, clock)

    # --- communication stream -----------------------------------------------------------------
    def on_comm(self):
        return contextlib.nullcontext()

    def comm_token(self):
        return self.comm_seq, list(self.clock)

    def comm_wait(self, token):
        self.comm_saw_compute = max(self.comm_saw_compute, token)

    def _publish(self) -> None:
        """One synchronisation of this rank: rows written before it become readable at its stamp."""
        self.syncs += 1
        self.clock[self.rank] += 1
        ready = [row for seq, row in self.unpublished if seq <= self.comm_saw_compute]
        self.unpublished = [(seq, row) for seq, row in self.unpublished if seq > self.comm_saw_compute]
        for row in ready + self.comm_buffer_writes:
            self.rows[row].published = self.clock[self.rank]
        self.comm_buffer_writes = []

    def barrier(self):
        self._publish()
        self.world.board[self.rank] = list(self.clock)
        self.world.barrier.wait()
        for clock in self.world.board:
            _join(self.clock, clock)
        self.world.barrier.wait()      # nobody overwrites the board before everyone has read it

    def handoff(self, dest, source):
        """Signal ``dest`` (what this rank wrote so far is readable), wait for ``source``'s signal."""
        self._publish()
        self.world.send((self.rank, dest, self.syncs), list(self.clock))
        _join(self.clock, self.world.receive((source, self.rank, self.syncs)))

    def peer(self, rank):
        return self.world.ranks[rank].partial

    def copy(self, dst, src):
        self._comm_op(dst, src, lambda: dst.copy_(src))

    def add(self, dst, src):
        self._comm_op(dst, src, lambda: dst.add_(src), reads_dst=True)

    def _comm_op(self, dst, src, action, reads_dst=False):
        self.comm_seq += 1
        name, owner, rows = self._where(src)
        if owner != self.rank:
            for row in rows:
                state = self.world.ranks[owner].rows[row]
                if state.published is None or state.published > self.clock[owner]:
                    raise Race(f"rank {self.rank} reads rank {owner}'s row {row} having seen "
                               f"{self.clock[owner]} of its syncs; it is published at {state.published}")
                state.reads.append((self.rank, self.clock[self.rank]))
        else:
            self._check_local_read(name, rows, reader="comm")
        name, owner, rows = self._where(dst)
        assert owner == self.rank
        if reads_dst:
            self._check_local_read(name, rows, reader="comm")
        for row in rows:
            if name == "partial":
                self._check_overwrite(row, self.clock, "copy")
                self.rows[row].published = None
                self.comm_buffer_writes.append(row)
            self.local_writer[(name, row)] = ("comm", self.comm_seq)
        action()

    # --- checks -------------------------------------------------------------------------------
    def _check_overwrite(self, row, clock, what):
        # A read at the reader's clock t is ordered before the reader's sync t + 1.
        late = [(reader, t) for reader, t in self.rows[row].reads if t >= clock[reader]]
        if late:
            raise Race(f"rank {self.rank}: {what} may overwrite row {row} while rank {late[0][0]} may "
                       f"still read it (its sync {late[0][1] + 1} not yet seen)")

    def _check_local_read(self, name, rows, reader):
        saw = self.compute_saw_comm if reader == "compute" else self.comm_saw_compute
        for row in rows:
            stream, seq = self.local_writer.get((name, row), (reader, 0))
            if stream != reader and seq > saw:
                raise Race(f"rank {self.rank}: the {reader} stream reads {name} row {row} written "
                           f"by the {stream} stream without waiting for it")


class SimulatedWorld:
    def __init__(self, world: int, rows: int, cols: int, io=SimulatedRank):
        self.barrier = threading.Barrier(world)
        self.board: list[list[int]] = [[0] * world for _ in range(world)]
        self._mail: dict[tuple[int, int, int], list[int]] = {}
        self._mail_ready = threading.Condition()
        self.size = world
        self.ranks = [io(rank, self, rows, cols) for rank in range(world)]

    def send(self, key: tuple[int, int, int], clock: list[int]) -> None:
        with self._mail_ready:
            self._mail[key] = clock
            self._mail_ready.notify_all()

    def receive(self, key: tuple[int, int, int]) -> list[int]:
        with self._mail_ready:
            if not self._mail_ready.wait_for(lambda: key in self._mail or self.barrier.broken, timeout=30):
                raise RuntimeError(f"hand-off {key} never signalled: the ranks' schedules differ")
            if key not in self._mail:
                raise threading.BrokenBarrierError
            return self._mail.pop(key)

    def call(self, inputs, b, chunks, scatter, taper=1.0):
        """One collective call on every rank (threads); the outputs, rank by rank."""
        world = len(self.ranks)
        outs, errors = [None] * world, []

        def run(rank):
            io = self.ranks[rank]
            a = inputs[rank]
            io.out = torch.full((a.shape[0] // world if scatter else a.shape[0], b.shape[1]),
                                float("nan"), dtype=torch.float64)
            try:
                copy_engine_pipeline(io, a, b, io.out, rank, world, chunks, scatter, taper)
                io._check_local_read("out", range(io.out.shape[0]), reader="compute")
                outs[rank] = io.out
            except BaseException as err:  # noqa: BLE001  re-raised below, in the main thread
                errors.append(err)
                self.barrier.abort()
                with self._mail_ready:
                    self._mail_ready.notify_all()

        threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        races = [err for err in errors if isinstance(err, Race)]
        if races or errors:
            raise (races or errors)[0]
        return outs


def _inputs(world, rows, k, cols, seed):
    gen = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(rows, k, generator=gen, dtype=torch.float64) for _ in range(world)]
    return inputs, torch.randn(k, cols, generator=gen, dtype=torch.float64)


def _check_calls(world, rows, cols, chunks, scatter, taper, seed, calls=3, io=SimulatedRank):
    sim = SimulatedWorld(world, rows, cols, io=io)
    for call in range(calls):  # the symmetric buffers are reused: write-after-read across calls
        inputs, b = _inputs(world, rows, 3, cols, seed + call)
        outs = sim.call(inputs, b, chunks, scatter, taper)
        full = sum(a @ b for a in inputs)
        if scatter:
            for rank, out in enumerate(outs):
                torch.testing.assert_close(out, full.chunk(world)[rank])
        else:
            torch.testing.assert_close(outs[0], full)
            assert all(torch.equal(outs[0], out) for out in outs), "ranks disagree bitwise"


@settings(max_examples=40, deadline=None)
@given(world=st.integers(1, 4), block=st.integers(1, 12), extra=st.integers(0, 3),
       cols=st.integers(1, 5), chunks=st.integers(1, 5), scatter=st.booleans(),
       taper=st.sampled_from([1.0, 0.7, 0.5, 0.3]), seed=st.integers(0, 10_000))
def test_schedule_reduces_exactly_and_every_read_is_ordered(world, block, extra, cols, chunks, scatter,
                                                            taper, seed):
    rows = block * world + (0 if scatter else min(extra, world - 1))
    _check_calls(world, rows, cols, chunks, scatter, taper, seed)


@pytest.mark.parametrize("world,scatter", [(2, False), (2, True), (3, False), (3, True)])
def test_tapered_schedule_in_whole_row_units_is_ordered(world, scatter):
    """Blocks long enough for ROW_UNIT-rounded sub-chunks of unequal sizes (the GPU's case)."""
    rows = world * 8 * ROW_UNIT + (0 if scatter else world - 1)
    sizes = [end - start for start, end in copy_engine_blocks(rows, world, 3, 0.5)[0]]
    assert sizes[0] > sizes[1] > sizes[2] and sizes[2] % ROW_UNIT == 0
    _check_calls(world, rows, 2, 3, scatter, 0.5, seed=world, calls=2)


def test_blocks_are_the_same_on_every_rank_and_cover_the_rows():
    blocks = copy_engine_blocks(10, 3, 8)
    assert [len(b) for b in blocks] == [3, 3, 3]   # chunks clamped to the smallest block (3 rows)
    flat = [r for block in blocks for s, e in block for r in range(s, e)]
    assert flat == list(range(10))
    with pytest.raises(ValueError, match="cannot be split into 4 rank blocks"):
        copy_engine_blocks(3, 4, 1)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 40_000), world=st.integers(1, 8), chunks=st.integers(1, 6),
       taper=st.floats(0.1, 1.0))
def test_tapered_blocks_cover_the_rows_and_shrink(rows, world, chunks, taper):
    if rows < world:
        return
    blocks = copy_engine_blocks(rows, world, chunks, taper)
    flat = [r for block in blocks for s, e in block for r in range(s, e)]
    assert flat == list(range(rows))
    assert len({len(block) for block in blocks}) == 1          # same sub-chunk count on every rank
    for block in blocks:
        sizes = [end - start for start, end in block]
        assert min(sizes) >= 1 and sizes[0] >= max(sizes)     # the first sub-chunk is the longest
        if taper < 1.0 and sizes[0] != sizes[-1] and len(sizes) > 1:
            assert sizes == sorted(sizes, reverse=True)


def test_taper_shortens_the_last_sub_chunk():
    equal = copy_engine_blocks(8192, 2, 3)[0]
    tapered = copy_engine_blocks(8192, 2, 3, 0.5)[0]
    size = lambda bounds: bounds[1] - bounds[0]  # noqa: E731
    assert [size(b) for b in tapered] == [2304, 1152, 640]      # 4096 rows ~ 4 : 2 : 1, in 128s
    assert size(tapered[-1]) < size(equal[-1]) / 2 and tapered[-1][1] == equal[-1][1]
    with pytest.raises(ValueError, match="taper=1.5 must be in"):
        copy_engine_blocks(8192, 2, 3, 1.5)


class _NoEvents(SimulatedRank):
    """A runtime that forgets to make the communication stream wait for the GEMM's event."""

    def comm_wait(self, token):
        pass


class _NoFinalBarrier(SimulatedRank):
    """A runtime that drops the barrier at the end of each call."""

    def __init__(self, *args):
        super().__init__(*args)
        self.calls = 0

    def barrier(self):
        self.calls += 1
        if self.calls % self.per_call:
            super().barrier()


@pytest.mark.parametrize("scatter", [False, True])
@pytest.mark.parametrize("taper", [1.0, 0.5])
def test_simulator_catches_a_missing_event(scatter, taper):
    inputs, b = _inputs(2, 16, 3, 4, 0)
    with pytest.raises(Race, match="published at None"):
        SimulatedWorld(2, 16, 4, io=_NoEvents).call(inputs, b, 3, scatter, taper)


@pytest.mark.parametrize("taper", [1.0, 0.5])
def test_reduce_scatter_needs_its_final_barrier(taper):
    sim = SimulatedWorld(2, 16, 4, io=_NoFinalBarrier)
    for rank in sim.ranks:
        rank.per_call = 1   # phase 1 hands off; the final barrier is the call's only one
    sim.call(*_inputs(2, 16, 3, 4, 0), 3, True, taper)
    with pytest.raises(Race, match="overwrite"):
        sim.call(*_inputs(2, 16, 3, 4, 1), 3, True, taper)


class _HandoffWithoutWait(SimulatedRank):
    """A runtime whose hand-off signals the destination but does not wait for the source."""

    def handoff(self, dest, source):
        self._publish()
        self.world.send((self.rank, dest, self.syncs), list(self.clock))


class _HandoffsOnly(SimulatedRank):
    """A runtime that hands off where the all-reduce's first phase-1 sync must be a barrier."""

    def barrier(self):
        if self.syncs % self.per_call == 0:
            return self.handoff((self.rank + 1) % self.world.size, (self.rank - 1) % self.world.size)
        return super().barrier()


@pytest.mark.parametrize("world,scatter", [(3, False), (3, True), (4, True)])
def test_simulator_catches_a_handoff_that_does_not_wait(world, scatter):
    # A race (a read the clocks do not order) or, where the peer's GEMM has not even run in thread
    # time and the row still holds the previous call's value, a wrong result.
    with pytest.raises(AssertionError):
        _check_calls(world, 24, 4, 2, scatter, 1.0, seed=0, io=_HandoffWithoutWait)


def test_all_reduce_beyond_two_ranks_needs_a_barrier_before_it_rewrites_its_rows():
    """At P = 3 the rank that pulls a block back in phase 2 is not the next call's phase-1 source:
    with one sub-chunk, only a barrier orders its last read before the owner's next write."""
    sim = SimulatedWorld(3, 24, 4, io=_HandoffsOnly)
    for rank in sim.ranks:
        rank.per_call = 2 + 1   # (P - 1) phase-1 syncs + one phase-2 barrier (one sub-chunk)
    sim.call(*_inputs(3, 24, 3, 4, 0), 1, False)
    with pytest.raises(Race, match="overwrite"):
        sim.call(*_inputs(3, 24, 3, 4, 1), 1, False)
    # the runtime's own schedule, for contrast, is ordered
    _check_calls(3, 24, 4, 1, False, 1.0, seed=0)


def test_copy_engine_mode_is_refused_on_cpu_tensors():
    import graphopt.ops.matmul_collectives  # noqa: F401
    assert "copy_engine" in MODES
    a, b = torch.randn(4, 3), torch.randn(3, 2)
    with pytest.raises(ValueError, match="needs CUDA tensors; use mode='chunked'"):
        torch.ops.graphopt.matmul_all_reduce(a, b, None, "unused", "copy_engine", 2, 0)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        torch.ops.graphopt.matmul_reduce_scatter(a, b, "unused", 2, 0, "copy_engine", 2, 0)


class _FakeMemOps:
    """Stands for ``cuda_driver.DriverMemOps``: records what would be enqueued; ``refuse(kind,
    entries)`` says which calls the driver refuses (CUresult 1)."""

    def __init__(self, refuse=lambda kind, entries: False):
        self.calls, self.refuse = [], refuse

    def batch(self, stream, entries):
        if self.refuse("batch", entries):
            return 1
        self.calls.append(list(entries))
        return 0

    def write(self, stream, address, value, flags):
        if self.refuse("write", [(2, address, value, flags)]):
            return 1
        self.calls.append((stream, address, value, flags))
        return 0

    def wait(self, stream, address, value, flags):
        self.calls.append((stream, address, value, flags))
        return 0


def test_a_barrier_is_one_batch_of_memory_operations_with_one_fence(monkeypatch):
    """Barrier slot s on rank r of P: signal flags[s][r] on every peer (the first signal fenced, so
    the GEMM rows written before it are visible to the peers' pulls), then wait for and reset
    flags[s][q] of every peer q on itself; enqueued in one driver call."""
    from graphopt.distributed import cuda_driver
    from graphopt.distributed.symm_mem import CopyEngineWorkspace

    bases = [1 << 20, 2 << 20, 3 << 20]
    workspace = CopyEngineWorkspace(partial=None, peers=[], handle=None, comm_stream=None, rank=1,
                                    world_size=3, flag_ptrs=bases)
    ops = workspace._barrier_ops(2)
    flag = lambda owner, peer: bases[owner] + 4 * (2 * 3 + peer)   # noqa: E731
    W, A = cuda_driver.MEMOP_WRITE_32, cuda_driver.MEMOP_WAIT_32
    assert ops == [(W, flag(0, 1), 1, True), (W, flag(2, 1), 1, False),
                   (A, flag(1, 0), 1, False), (W, flag(1, 0), 0, False),
                   (A, flag(1, 2), 1, False), (W, flag(1, 2), 0, False)]

    memops = _FakeMemOps()
    monkeypatch.setattr(cuda_driver, "_cuda_stream_memops", lambda: memops)
    monkeypatch.setattr(cuda_driver, "_MEMOP_SUPPORT", {"batch": True, "unfenced": True})
    stream = type("Stream", (), {"cuda_stream": 7})()
    cuda_driver.stream_memops(stream, ops)
    assert len(memops.calls) == 1
    # Waits take CU_STREAM_WAIT_VALUE_EQ; unfenced writes CU_STREAM_WRITE_VALUE_NO_MEMORY_BARRIER.
    assert memops.calls[0] == [(W, flag(0, 1), 1, 0), (W, flag(2, 1), 1, 1), (A, flag(1, 0), 1, 1),
                               (W, flag(1, 0), 0, 1), (A, flag(1, 2), 1, 1), (W, flag(1, 2), 0, 1)]
    memops.calls.clear()
    cuda_driver.stream_memops(stream, ops, batch=False)
    assert memops.calls == [(7, flag(0, 1), 1, 0), (7, flag(2, 1), 1, 1), (7, flag(1, 0), 1, 1),
                            (7, flag(1, 0), 0, 1), (7, flag(1, 2), 1, 1), (7, flag(1, 2), 0, 1)]


def test_batched_parameters_fill_the_drivers_union_through_cuda_bindings():
    """``DriverMemOps.batch`` hands cuStreamBatchMemOp one CUstreamBatchMemOpParams per operation,
    its union member (waitValue / writeValue) holding address, value and flags -- the attribute
    names cuda-bindings 12.x and 13.x share -- and builds each distinct list once."""
    from types import SimpleNamespace
    from graphopt.distributed import cuda_driver

    class Member(SimpleNamespace):
        pass

    class Params:
        def __init__(self):
            self.operation, self.waitValue, self.writeValue = None, Member(), Member()

    enqueued = []
    driver = SimpleNamespace(
        CUstreamBatchMemOpParams=Params, CUstreamBatchMemOpType=int,
        cuStreamBatchMemOp=lambda stream, count, params, flags: (enqueued.append(
            (stream, count, params, flags)), 0)[1:])
    memops = cuda_driver.DriverMemOps(driver)
    W, A = cuda_driver.MEMOP_WRITE_32, cuda_driver.MEMOP_WAIT_32
    entries = ((W, 4096, 1, 0), (A, 8192, 1, 1))
    assert memops.batch(7, entries) == 0
    stream, count, params, flags = enqueued[0]
    assert (stream, count, flags) == (7, 2, 0)
    assert params[0].operation == W and vars(params[0].writeValue) == {
        "operation": W, "address": 4096, "value": 1, "flags": 0}
    assert params[1].operation == A and vars(params[1].waitValue) == {
        "operation": A, "address": 8192, "value": 1, "flags": 1}
    memops.batch(7, entries)
    assert enqueued[1][2] is params          # built once, reused


def test_a_handoff_is_one_fenced_signal_a_wait_and_a_reset():
    """Hand-off slot s on rank r: set flags[s][r] on dest (fenced), wait for and reset flags[s][source]
    on itself -- 3 operations at any P, where a barrier takes 3 (P - 1)."""
    from graphopt.distributed import cuda_driver
    from graphopt.distributed.symm_mem import CopyEngineWorkspace

    bases = [1 << 20, 2 << 20, 3 << 20, 4 << 20]
    workspace = CopyEngineWorkspace(partial=None, peers=[], handle=None, comm_stream=None, rank=1,
                                    world_size=4, flag_ptrs=bases)
    flag = lambda owner, peer: bases[owner] + 4 * (5 * 4 + peer)   # noqa: E731  slot 5
    W, A = cuda_driver.MEMOP_WRITE_32, cuda_driver.MEMOP_WAIT_32
    assert workspace._handoff_ops(5, dest=2, source=0) == [
        (W, flag(2, 1), 1, True), (A, flag(1, 0), 1, False), (W, flag(1, 0), 0, False)]
    assert len(workspace._barrier_ops(5)) == 3 * 3


@pytest.mark.parametrize("fenced_batch_ok", [True, False])
def test_refused_memory_operations_fall_back_without_enqueuing_twice(monkeypatch, fenced_batch_ok):
    """A driver that refuses unfenced writes (in a batch and alone), and maybe every batch: each
    refusal is logged once; every operation is enqueued exactly once, writes fenced, in one batch
    where the driver takes a fenced one."""
    from graphopt.distributed import cuda_driver

    W, A = cuda_driver.MEMOP_WRITE_32, cuda_driver.MEMOP_WAIT_32

    def refuse(kind, entries):
        unfenced = any(op == W and flags == 1 for op, _, _, flags in entries)
        return unfenced or (kind == "batch" and not fenced_batch_ok)

    memops = _FakeMemOps(refuse)
    monkeypatch.setattr(cuda_driver, "_cuda_stream_memops", lambda: memops)
    monkeypatch.setattr(cuda_driver, "_MEMOP_SUPPORT", {"batch": True, "unfenced": True})
    stream = type("Stream", (), {"cuda_stream": 7})()
    ops = [(W, 100, 1, True), (W, 200, 1, False), (A, 300, 1, False), (W, 300, 0, False)]
    cuda_driver.stream_memops(stream, ops)
    if fenced_batch_ok:
        assert memops.calls == [[(W, 100, 1, 0), (W, 200, 1, 0), (A, 300, 1, 1), (W, 300, 0, 0)]]
    else:
        assert memops.calls == [(7, 100, 1, 0), (7, 200, 1, 0), (7, 300, 1, 1), (7, 300, 0, 0)]
    assert cuda_driver.stream_memops_mode() == ("batch" if fenced_batch_ok else "single") + ", fenced"
    memops.calls.clear()
    cuda_driver.stream_memops(stream, ops)                     # no more refused calls
    assert sum(len(c) if isinstance(c, list) else 1 for c in memops.calls) == 4
