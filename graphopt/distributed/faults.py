"""A rank that fails tells its peers, so that graphopt's waits on them end at once with its message.

A rank that raises (a compile error, an exception in a graphopt op or in the user's code) would
leave its peers waiting for it: in graphopt's own waits (the rank agreement's store keys, the
runtimes' exchanges) until their timeouts, minutes. Instead the failing rank writes its error under
its own key of the default process group's store and counts it; every wait graphopt holds reads the
count while it waits (one store round trip) and, once it is not zero, fails with the message of a
rank it waits for::

    failing rank:  store["graphopt/failed/1"] = "rank 1 failed: ValueError: ..."; count += 1
    waiting rank:  RuntimeError("rank 1 failed: ValueError: ... (this rank waited for ...)")

Only the ranks waited for count: rank 2 failing a graph of the whole world does not end ranks 0
and 1's wait on a graph of their own group. Reported by: the backend (a graph that fails to
compile), ``graphopt.distributed.launch`` (its workers), and an uncaught exception in a process
that compiled a graph with peers (``install_excepthook``, chained before the previous hook). The
reports stay until ``clear()``: ranks that catch a failure and go on (a retry, a test) call it
together.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterable

import torch.distributed as dist

from graphopt import _compat

FAILED_PREFIX = "graphopt/failed"
FAILED_COUNT_KEY = "graphopt/failed_count"


def several_ranks() -> bool:
    """A run of several real processes (a fake process group has no peers to tell)."""
    return (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
            and dist.get_backend() != "fake")


def report(error: BaseException) -> None:
    """Tell the peers this rank fails with ``error``; nothing where there are none, or where this
    rank reported already (the first failure is the cause)."""
    if not several_ranks():
        return
    with contextlib.suppress(Exception):  # the store may be gone with the process group
        store, key = _compat.default_store(), f"{FAILED_PREFIX}/{dist.get_rank()}"
        if not store.check([key]):
            store.set(key, f"rank {dist.get_rank()} failed: {type(error).__name__}: {error}"[:4000])
            store.add(FAILED_COUNT_KEY, 1)


def failure(ranks: Iterable[int] | None = None) -> str | None:
    """The report of one of ``ranks`` (default: every rank), if one came: one store round trip
    while none did."""
    store = _compat.default_store()
    if store.add(FAILED_COUNT_KEY, 0) == 0:
        return None
    for rank in (range(dist.get_world_size()) if ranks is None else ranks):
        key = f"{FAILED_PREFIX}/{rank}"
        if store.check([key]):
            return store.get(key).decode()
    return None


def clear() -> None:
    """Forget every report, on every rank together (it holds barriers of the default group): for
    ranks that caught a failure and go on."""
    if not several_ranks():
        return
    store = _compat.default_store()
    dist.barrier()
    store.delete_key(f"{FAILED_PREFIX}/{dist.get_rank()}")
    dist.barrier()
    if dist.get_rank() == 0:
        store.delete_key(FAILED_COUNT_KEY)
    dist.barrier()


def install_excepthook() -> None:
    """An exception nobody catches reports the failure before this process ends (once)."""
    if getattr(sys.excepthook, "_graphopt_reports", False):
        return
    previous = sys.excepthook

    def hook(kind, error, traceback):
        report(error)
        previous(kind, error, traceback)

    hook._graphopt_reports = True
    sys.excepthook = hook
