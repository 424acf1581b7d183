"""CUDA driver entry points torch does not expose: stream memory operations.

``cuStreamWriteValue32`` / ``cuStreamWaitValue32`` / ``cuStreamBatchMemOp`` write and wait on a
32-bit word from a stream; they run on the GPU's front end, not on an SM, so a signal or a wait
queued behind a GEMM that holds every SM is not delayed until the GEMM ends. The copy-engine
runtime's barriers and hand-offs (``graphopt.distributed.symm_mem``) are built from them.

Bound through ctypes from ``libcuda.so.1``; where the library or an entry point is missing,
``stream_memops_available()`` is False and the callers use the signal-pad barrier kernel instead.
"""

from __future__ import annotations

import ctypes
import functools
import logging

_log = logging.getLogger("graphopt.distributed.cuda_driver")

# Stream memory operations (CUDA driver): CUstreamBatchMemOpType and the flags they take.
MEMOP_WAIT_32, MEMOP_WRITE_32 = 1, 2
_WAIT_VALUE_EQ = 1
_WRITE_VALUE_NO_MEMORY_BARRIER = 1
_MAX_BATCH = 255                # cuStreamBatchMemOp takes fewer than 256 operations


@functools.lru_cache(maxsize=1)
def _cuda_stream_memops():
    """The CUDA driver's stream memory operations, or None: (write32, wait32, batch or None).
    The batch entry point enqueues several in one driver call (their order kept)."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    functions = []
    for name in ("cuStreamWriteValue32", "cuStreamWaitValue32"):
        function = getattr(driver, name + "_v2", None) or getattr(driver, name, None)
        if function is None:
            return None
        function.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
        function.restype = ctypes.c_int
        functions.append(function)
    batch = getattr(driver, "cuStreamBatchMemOp_v2", None)
    if batch is not None:
        batch.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_void_p, ctypes.c_uint]
        batch.restype = ctypes.c_int
    return (*functions, batch)


class _MemOpParams(ctypes.Structure):
    """The driver's CUstreamBatchMemOpParams union (48 bytes) as its wait / write member."""
    _fields_ = [("operation", ctypes.c_uint32), ("address", ctypes.c_uint64),
                ("value", ctypes.c_uint64),        # union of a 32- and a 64-bit value
                ("flags", ctypes.c_uint32), ("alias", ctypes.c_uint64), ("pad", ctypes.c_uint64)]


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
    write, wait, batched = _cuda_stream_memops()
    handle = stream.cuda_stream
    while batch and batched is not None and _MEMOP_SUPPORT["batch"] and len(ops) <= _MAX_BATCH:
        unfenced = _MEMOP_SUPPORT["unfenced"] and any(
            kind == MEMOP_WRITE_32 and not fence for kind, _, _, fence in ops)
        params = (_MemOpParams * len(ops))()
        for entry, (kind, address, value, fence) in zip(params, ops):
            entry.operation, entry.address, entry.value = kind, address, value
            entry.flags = (_WAIT_VALUE_EQ if kind == MEMOP_WAIT_32
                           else _WRITE_VALUE_NO_MEMORY_BARRIER if unfenced and not fence else 0)
        code = batched(handle, len(ops), params, 0)
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
            code = wait(handle, address, value, _WAIT_VALUE_EQ)
        else:
            unfenced = not fence and _MEMOP_SUPPORT["unfenced"]
            code = write(handle, address, value, _WRITE_VALUE_NO_MEMORY_BARRIER if unfenced else 0)
            if code and unfenced:
                _MEMOP_SUPPORT["unfenced"] = False
                _log.warning("cuStreamWriteValue32 refused a write without a memory fence (CUresult "
                             "%d); fencing every write from now on", code)
                code = write(handle, address, value, 0)
        if code:
            raise RuntimeError(f"stream memory operation {kind} failed with CUresult {code}")
