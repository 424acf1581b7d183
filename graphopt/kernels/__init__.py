"""Triton kernels. This package module itself imports no triton: the layout helper below serves
callers that may never launch a kernel (torch's cuDNN path in ``graphopt.ops.attention``)."""

from collections import Counter

import torch

# How often each attention kernel ran, by name ("triton_forward:tma", "cudnn_forward", ...): the
# benchmark reads which kernel a path really ran (fallbacks included) instead of inferring it.
launch_counts: Counter = Counter()


def unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    """x as the attention kernels read it: any strides with a unit last one (row blocks of a
    [B, H, S, D] tensor go as views), else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()
