"""The memory-budget warnings of a compile, kept beside Inductor's caches, so that a compile served
from those caches warns as the first one did.

On an AOTAutograd cache hit, Inductor hands back the compiled forward and backward without calling
graphopt's partitioner or its forward and backward stages: the planner that found the budget out of
reach does not run, and its ``BudgetNotMetWarning`` was lost. Seen on the tiny HF Llama under
``codegen="inductor"`` with ``memory_budget=1000``: the first process warned, a second one with the
same cache folder ran the same step silently (CI caught it; ``tests/unit/test_plans_inductor.py``).

So every Inductor compile whose planner ran writes the reasons it warned (an empty list too, which
clears an older record) under a key of what decides them: the graph after pre_grad and graphopt's
config (the backend's ``content_key``), the partitioner's uuid (graphopt's source and the device
profile, as Inductor's own key has it) and torch's version. A compile that ran no stage after
pre_grad reads them back and warns again, saying where the reasons come from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import torch

from graphopt import _compat
from graphopt.passes.plans import warn_budget_not_met

log = logging.getLogger("graphopt.backend")

_FOLDER = ("graphopt", "budget_warnings")


def notice_key(content_key: str, partitioner_uuid: str) -> str:
    return hashlib.sha256("\n".join((content_key, partitioner_uuid, torch.__version__)).encode()).hexdigest()


def _path(key: str) -> str:
    return os.path.join(_compat.inductor_cache_dir(), *_FOLDER, f"{key}.json")


def record(key: str, reasons: list[str]) -> None:
    """Keep what the compile under ``key`` warned; a folder that cannot be written only loses the
    replay (logged), never the compile."""
    path = _path(key)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temporary = f"{path}.{os.getpid()}.tmp"
        with open(temporary, "w") as handle:
            json.dump({"budget_warnings": reasons}, handle)
        os.replace(temporary, path)  # readers see the old record or the new one, never half
    except OSError as error:
        log.info("could not keep the compile's budget warnings for a cached compile (%s): %s", path, error)


def replay(key: str, graph_id: str) -> int:
    """Warn again what the compile under ``key`` warned; the number of warnings given."""
    path = _path(key)
    try:
        with open(path) as handle:
            reasons = json.load(handle)["budget_warnings"]
    except FileNotFoundError:
        log.debug("[%s] served from Inductor's cache, and no record of the budget warnings of the "
                 "compile that made the entry (%s): none given", graph_id, path)
        return 0
    except (OSError, ValueError, KeyError) as error:
        log.info("[%s] unreadable record of cached budget warnings %s: %s", graph_id, path, error)
        return 0
    for reason in reasons:
        warn_budget_not_met(None, graph_id, f"{reason} (planned when Inductor's cache entry for this "
                                            "graph was made; this compile was served from it)")
    return len(reasons)
