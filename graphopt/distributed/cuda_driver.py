"""CUDA driver entry points torch does not expose: stream memory operations.

``cuStreamWriteValue32`` / ``cuStreamWaitValue32`` / ``cuStreamBatchMemOp`` write and wait on a
32-bit word from a stream; they run on the GPU's front end, not on an SM, so a signal or a wait
queued behind a GEMM that holds every SM is not delayed until the GEMM ends. The copy-engine
runtime's barriers and hand-offs (``graphopt.distributed.symm_mem``) and the tracked runtime's
waits on a GEMM's chunk counters (``graphopt.distributed.tracked_gemm``) are built from them.

Bound through NVIDIA's maintained Python bindings, ``cuda-bindings`` (``cuda.bindings.driver``;
graphopt's optional ``gpu`` extra), imported the first time a stream memory operation is asked
for, never at ``import graphopt``. The calls used here have one signature in cuda-bindings 12.x and
13.x (13.x dropped the ``cuda.cuda`` module that cuda-python before 12.6 shipped, which is tried
second). Where the bindings or the driver's entry points are missing, ``stream_memops_available()``
is False and the callers use the signal-pad barrier kernel instead.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

_log = logging.getLogger("graphopt.distributed.cuda_driver")

# Stream memory operations (CUDA driver): CUstreamBatchMemOpType and the flags they take.
MEMOP_WAIT_32, MEMOP_WRITE_32 = 1, 2
_WAIT_VALUE_EQ = 1
_WRITE_VALUE_NO_MEMORY_BARRIER = 1
_MAX_BATCH = 255                # cuStreamBatchMemOp takes fewer than 256 operations


def _import_driver():
    """``cuda.bindings.driver`` (cuda-bindings >= 12.6), ``cuda.cuda`` (older cuda-python), or None."""
    try:
        from cuda.bindings import driver
        return driver
    except ImportError:
        pass
    try:
        from cuda import cuda as driver   # cuda-python < 12.6
        return driver
    except ImportError:
        return None


def bindings_version() -> Optional[str]:
    """The cuda-bindings (or cuda-python) version in use, None where neither is installed."""
    if _import_driver() is None:
        return None
    try:
        from cuda.bindings import __version__
        return __version__
    except ImportError:
        import importlib.metadata
        return importlib.metadata.version("cuda-python")


class DriverMemOps:
    """The driver's stream memory operations as plain calls returning a CUresult code (0: success):
    ``write`` / ``wait`` (one operation) and ``batch`` (several, in order, in one call).

    Built parameter arrays are kept per operation list: the callers enqueue the same few lists (a
    barrier slot's, a counter's) on every call, and building them costs more host time than the
    driver call itself."""

    def __init__(self, driver):
        self._driver = driver
        self._batches: dict[tuple, list] = {}

    def write(self, stream: int, address: int, value: int, flags: int) -> int:
        return int(self._driver.cuStreamWriteValue32(stream, address, value, flags)[0])

    def wait(self, stream: int, address: int, value: int, flags: int) -> int:
        return int(self._driver.cuStreamWaitValue32(stream, address, value, flags)[0])

    def batch(self, stream: int, entries: tuple[tuple[int, int, int, int], ...]) -> int:
        """``entries``: (operation, address, value, flags) each, enqueued in order."""
        params = self._batches.get(entries)
        if params is None:
            params = self._batches[entries] = [self._params(*entry) for entry in entries]
        return int(self._driver.cuStreamBatchMemOp(stream, len(params), params, 0)[0])

    def _params(self, operation: int, address: int, value: int, flags: int):
        driver = self._driver
        entry = driver.CUstreamBatchMemOpParams()
        entry.operation = driver.CUstreamBatchMemOpType(operation)
        member = entry.waitValue if operation == MEMOP_WAIT_32 else entry.writeValue
        member.operation = driver.CUstreamBatchMemOpType(operation)
        member.address = address
        member.value = value
        member.flags = flags
        return entry


@functools.lru_cache(maxsize=1)
def _cuda_stream_memops() -> Optional[DriverMemOps]:
    """The CUDA driver's stream memory operations, or None where cuda-bindings or the driver
    entry points are missing."""
    driver = _import_driver()
    if driver is None:
        return None
    names = ("cuStreamWriteValue32", "cuStreamWaitValue32", "cuStreamBatchMemOp",
             "CUstreamBatchMemOpParams")
    if not all(hasattr(driver, name) for name in names):
        return None
    return DriverMemOps(driver)


def stream_memops_available() -> bool:
    return _cuda_stream_memops() is not None


# What the driver accepted so far: a batch call that fails is not tried again, nor an unfenced write.
_MEMOP_SUPPORT = {"batch": True, "unfenced": True}


def stream_memops_mode() -> str:
    """How barriers are enqueued on this driver, as far as the calls so far have shown: 'batch' or
    'single' (one call per operation), ', fenced' where every write carries its own memory fence."""
    mode = "batch" if _MEMOP_SUPPORT["batch"] else "single"
    return mode if _MEMOP_SUPPORT["unfenced"] else mode + ", fenced"


def stream_memops(stream, ops, batch: bool = True) -> None:
    """Enqueue on ``stream``, in order, ``ops``: tuples (MEMOP_WRITE_32, address, value, fence) --
    ``*(uint32*)address = value``, after a system-wide memory fence where ``fence`` -- or
    (MEMOP_WAIT_32, address, value, _) -- wait until ``*(uint32*)address == value``.

    One driver call (cuStreamBatchMemOp) where the driver has it and ``batch``, else one call per
    operation. Where the driver refuses a write without its own fence, every write is fenced from
    then on (stronger ordering, the same result); where it refuses the batch itself, the operations
    are enqueued one by one. Each refusal is logged once, and a refused call enqueues nothing, so no
    operation runs twice. (The 4 x H200 driver of 2026-11-26 refused the unfenced batch; the fenced
    batch was first tried after that run.)"""
    memops = _cuda_stream_memops()
    handle = stream.cuda_stream
    while batch and _MEMOP_SUPPORT["batch"] and len(ops) <= _MAX_BATCH:
        unfenced = _MEMOP_SUPPORT["unfenced"] and any(
            kind == MEMOP_WRITE_32 and not fence for kind, _, _, fence in ops)
        entries = tuple(
            (kind, address, value, _WAIT_VALUE_EQ if kind == MEMOP_WAIT_32
             else _WRITE_VALUE_NO_MEMORY_BARRIER if unfenced and not fence else 0)
            for kind, address, value, fence in ops)
        code = memops.batch(handle, entries)
        if not code:
            return
        if unfenced:       # try the batch again with every write fenced
            _MEMOP_SUPPORT["unfenced"] = False
            _log.warning("cuStreamBatchMemOp refused writes without a memory fence (CUresult %d); "
                         "fencing every write from now on", code)
            continue
        _MEMOP_SUPPORT["batch"] = False
        _log.warning("cuStreamBatchMemOp refused %d stream memory operations (CUresult %d); "
                     "enqueuing them one call each from now on", len(ops), code)
    for kind, address, value, fence in ops:
        if kind == MEMOP_WAIT_32:
            code = memops.wait(handle, address, value, _WAIT_VALUE_EQ)
        else:
            unfenced = not fence and _MEMOP_SUPPORT["unfenced"]
            code = memops.write(handle, address, value,
                                _WRITE_VALUE_NO_MEMORY_BARRIER if unfenced else 0)
            if code and unfenced:
                _MEMOP_SUPPORT["unfenced"] = False
                _log.warning("cuStreamWriteValue32 refused a write without a memory fence (CUresult "
                             "%d); fencing every write from now on", code)
                code = memops.write(handle, address, value, 0)
        if code:
            raise RuntimeError(f"stream memory operation {kind} failed with CUresult {code}")
