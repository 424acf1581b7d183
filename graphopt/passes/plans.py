"""What one stage of a compiled graph decides for a later stage, as typed objects.

One :class:`CompilePlans` per compiled graph rides on every ``PassContext`` of it (the backend makes
it; ``passes/README.md``, invariant 8)::

    partition stage   plan_rematerialization       -> plans.partition (PartitionPlan: the cut graphs,
                                                      saved / recomputed / offloaded, the peak)
    the backend       after the partition           -> plans.backward_graph
    forward stage     offload_activations           -> plans.offload (OffloadRewrite: slots, pool)
    backward stage    offload_activations reads plans.offload
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from typing import Any, Mapping, Union

import torch
import torch.fx as fx

from graphopt import _compat

Size = Union[int, torch.SymInt]


class BudgetNotMetWarning(UserWarning):
    """The step will not fit ``memory_budget``: no plan reaches it (plan_rematerialization), or
    offloads the plan counted on were refused (offload_activations) and the plan's peak rose above
    it. The message names the bytes and what holds them."""


def warn_budget_not_met(plans: "CompilePlans | None", graph_id: str, reason: str) -> None:
    """The one way a compiled graph says its memory plan misses the budget. The warning names the
    user's line that ran the compile (the first frame outside torch, graphopt and the model
    libraries), not a line of graphopt's. ``plans`` keeps the reason, for the backend to give again
    when a later compile of the same graph is served from Inductor's cache (no pass runs then);
    that replay passes None."""
    if plans is not None:
        plans.budget_warnings.append(reason)
    warnings.warn(f"[{graph_id}] {reason}", BudgetNotMetWarning, stacklevel=user_stacklevel())


def _library_roots() -> tuple[str, ...]:
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # graphopt/
    roots = [os.path.dirname(torch.__file__), package]
    for name in ("transformers", "peft", "accelerate", "triton", "functorch"):
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__file__", None):
            roots.append(os.path.dirname(module.__file__))
    return tuple(os.path.join(os.path.realpath(root), "") for root in roots)


def user_stacklevel() -> int:
    """warnings.warn's stacklevel, from its caller, of the first frame outside the libraries."""
    roots = _library_roots()
    frame, level = sys._getframe(2), 2   # 1 is the function that warns
    while frame is not None:
        filename = os.path.realpath(frame.f_code.co_filename)
        if not filename.startswith(roots) and not filename.startswith("<"):
            return level
        frame, level = frame.f_back, level + 1
    return 2


@dataclasses.dataclass(frozen=True)
class JointSignature:
    """How AOTAutograd divides the joint graph it hands the partitioner (its partition kwargs)."""

    num_fwd_outputs: int                         # the forward's outputs come first
    static_input_indices: tuple[int, ...] = ()   # primals whose memory lives beyond the step

    @classmethod
    def of(cls, partition_kwargs: Mapping[str, Any]) -> "JointSignature":
        return cls(partition_kwargs["num_fwd_outputs"],
                   tuple(partition_kwargs.get("static_lifetime_input_indices") or ()))


@dataclasses.dataclass(frozen=True, eq=False)
class PartitionPlan:
    """What plan_rematerialization decided for one joint graph. Names are the joint graph's: the
    forward returns each saved value under its name and the backward's placeholders carry it."""

    forward: fx.GraphModule
    backward: fx.GraphModule
    saved: tuple[str, ...]
    recomputed: tuple[str, ...]
    offloaded: Mapping[str, float]   # saved value -> alpha, the fraction of its token rows moved to host
    planned_peak_bytes: int | None   # simulated activation peak of forward + backward, offloads
                                     # counted: the bound offload_activations must not lift
    report: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # the dump's "remat_plan"
    # Per offloaded value, where the plan simulated its copies: (forward node before which the
    # forward waits for the offload, None: at its output; backward node before which the reload
    # is issued, None: at the backward's start). Names of the cut graphs' nodes.
    copy_points: Mapping[str, tuple[str | None, str | None]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one offloaded activation lives: its pool bytes and how it is split. Under dynamic
    shapes the sizes are SymInts (expressions of the graph's symbols, evaluated at every step)."""

    name: str
    index: int             # the slot's number in the plan (the ops' ``slot``)
    offset: Size           # byte offset in the pool
    numel: Size            # elements of the activation's dense memory
    kept_numel: Size       # leading elements (whole token rows) that stay on the device
    shape: tuple[Size, ...]
    stride: tuple[Size, ...]
    dtype: torch.dtype

    @property
    def host_bytes(self) -> Size:
        return (self.numel - self.kept_numel) * self.dtype.itemsize

    @property
    def alpha(self) -> float:
        """The fraction moved to the host (at the sizes' hints where symbolic)."""
        numel = _compat.hint_int(self.numel)
        return (numel - _compat.hint_int(self.kept_numel)) / numel


@dataclasses.dataclass(frozen=True)
class OffloadRewrite:
    """What offload_activations' forward stage did, for its backward stage."""

    pool: str
    pool_nbytes: Size
    saved_order: list[str]                 # names of the forward's saved outputs, in order
    saved_tensors: list[str]               # those that are tensors (the others are SymInts)
    slots: dict[str, Slot]
    original_vals: dict[str, Any]          # name -> the activation's meta["val"] before the rewrite
    kept_vals: dict[str, Any]              # name -> the kept part's meta["val"]


@dataclasses.dataclass
class CompilePlans:
    """Every decision a stage of one compiled graph hands on; None until its stage has run."""

    partition: PartitionPlan | None = None
    # The partition's backward graph (planned or torch's min-cut). Under Inductor the forward stage
    # runs before AOTAutograd lowers the backward, so a forward pass that changes what the
    # backward receives retypes its placeholders here.
    backward_graph: fx.GraphModule | None = None
    offload: OffloadRewrite | None = None
    # The reasons of the BudgetNotMetWarnings this compile gave (warn_budget_not_met).
    budget_warnings: list[str] = dataclasses.field(default_factory=list)
