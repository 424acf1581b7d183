"""Liveness of tensors over a schedule: bytes live at every step of forward + backward.

``SavedTensor`` describes one activation that the forward saves for the backward; the
rematerialization planner and the offload model (issue 7) exchange lists of them.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class SavedTensor:
    """One tensor the forward saves for the backward, as the planners see it."""

    name: str                       # node name in the joint graph (= forward output / backward placeholder)
    nbytes: int
    shape: tuple
    dtype: torch.dtype
    fw_index: int                   # position in the forward schedule where it is produced
    bw_index: int                   # position in the backward schedule of its first use
    fw_time_after_s: float          # estimated forward compute time after it is produced
    bw_time_before_s: float         # estimated backward compute time before its first use
    recompute_time_s: float | None  # None if it cannot be recomputed
