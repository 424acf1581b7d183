"""What a compile tells the user beyond its dump: the memory-budget warnings of a compile, kept
beside Inductor's caches, so that a compile served from those caches warns as the first one did;
and the graph breaks that leave part of a model outside a memory plan (``warn_graph_breaks``).

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
import warnings

import torch

from graphopt import _compat
from graphopt.passes.plans import user_stacklevel, warn_budget_not_met

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


# --- graph breaks that leave code outside the memory plan ----------------------------------------------

class GraphBreakWarning(UserWarning):
    """memory_budget / offload_activations plan each compiled graph alone, and Dynamo split the model:
    the code between its graphs runs eager, outside every graphopt pass, and its memory is neither
    planned nor counted. The message names the break, and the fix where the reason names
    ``torch.utils.checkpoint`` (transformers' gradient checkpointing under torch.compile breaks so:
    "HOP: Unsafe side effect", and every decoder layer then runs eager)."""


_BREAKS_SEEN: dict[str, int] = {}   # graph-break reason -> count when graphopt last looked
_BREAKS_WARNED: set[str] = set()


def warn_graph_breaks(memory_planned: bool, graph_id: str) -> list[str]:
    """Warn once per process for each graph-break reason Dynamo recorded since graphopt's previous
    compile, where this compile plans memory; returns the reasons warned. Dynamo compiles the
    graph before a break when it reaches the break, so a model's breaks come with its compiles."""
    counts = _compat.graph_break_counts()
    new = [reason for reason, count in counts.items() if count != _BREAKS_SEEN.get(reason)]
    _BREAKS_SEEN.clear()
    _BREAKS_SEEN.update(counts)
    warned = []
    for reason in new:
        if not memory_planned or reason in _BREAKS_WARNED:
            continue
        _BREAKS_WARNED.add(reason)
        first = next((line.strip() for line in reason.splitlines() if line.strip()), reason)
        message = (f"[{graph_id}] memory_budget / offload_activations plan each compiled graph "
                   f"alone, and Dynamo split the code it compiles here ({first}): the code between "
                   "the graphs runs eager, outside the plan, and its activations are neither planned "
                   "nor counted. ")
        if "torch.utils.checkpoint" in reason:
            message += ("The reason names torch.utils.checkpoint: where a checkpointed region is what "
                        "Dynamo could not trace, its layers run eager; switch the model's own "
                        "checkpointing off (transformers: model.gradient_checkpointing_disable(); "
                        "Trainer: gradient_checkpointing=False) and let memory_budget choose what "
                        "to recompute.")
        else:
            message += ("TORCH_LOGS=graph_breaks shows where the break is; without it the plan "
                        "covers the whole step.")
        warnings.warn(message, GraphBreakWarning, stacklevel=user_stacklevel())
        warned.append(first)
    return warned
