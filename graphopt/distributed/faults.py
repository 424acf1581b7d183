"""A rank that fails tells its peers, so that graphopt's waits on them end at once with its message.

A rank that raises (a compile error, an exception in a graphopt op or in the user's code) would
leave its peers waiting for it: in graphopt's own waits (the rank agreement's store keys, the
runtimes' exchanges) until their timeouts, minutes. Instead the failing rank writes its error under
one key of the default process group's store; every wait graphopt holds checks that key while it
waits and fails with the message::

    failing rank:  store["graphopt/failed"] = "rank 1 failed: ValueError: ..."
    waiting rank:  RuntimeError("rank 1 failed: ValueError: ... (this rank waited for ...)")

Reported by: the backend (a graph that fails to compile), ``graphopt.distributed.launch`` (its
workers), and an uncaught exception in a process that compiled a graph with peers
(``install_excepthook``, chained before the previous hook). The key is never cleared: the run ends.
"""

from __future__ import annotations

import contextlib
import sys

import torch.distributed as dist

from graphopt import _compat

FAILED_KEY = "graphopt/failed"


def several_ranks() -> bool:
    """A run of several real processes (a fake process group has no peers to tell)."""
    return (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
            and dist.get_backend() != "fake")


def report(error: BaseException) -> None:
    """Tell the peers this rank fails with ``error``; nothing where there are none, or where a
    peer's failure came first (that one is the cause; this rank fails of it)."""
    if not several_ranks():
        return
    with contextlib.suppress(Exception):  # the store may be gone with the process group
        store = _compat.default_store()
        if not store.check([FAILED_KEY]):
            store.set(FAILED_KEY, f"rank {dist.get_rank()} failed: "
                                  f"{type(error).__name__}: {error}"[:4000])


def failure() -> str | None:
    """A peer's report, if one came (one store round trip)."""
    store = _compat.default_store()
    return store.get(FAILED_KEY).decode() if store.check([FAILED_KEY]) else None


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
