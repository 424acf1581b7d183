"""Which ranks share a node: the one fact the runtimes need to stay inside their links.

Symmetric memory (the copy-engine and tile runtimes of the GEMM + collective overlap) maps peer
memory over NVLink, so a group whose ranks sit on different nodes must use NCCL. Ranks are taken
to be placed node by node, as torchrun and every cluster launcher number them: rank r runs on node
r // (GPUs per node). GPUs per node: torchrun's LOCAL_WORLD_SIZE, else GRAPHOPT_GPUS_PER_NODE, else
the GPUs this process sees (one node holds the whole world when neither is set and the world fits).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from graphopt import _compat


def gpus_per_node() -> int:
    for name in ("LOCAL_WORLD_SIZE", "GRAPHOPT_GPUS_PER_NODE"):
        value = os.environ.get(name)
        if value:
            try:
                return max(1, int(value))
            except ValueError:
                raise ValueError(f"{name}={value!r} is not a number of GPUs per node") from None
    if torch.cuda.is_available():
        return max(1, torch.cuda.device_count())
    return dist.get_world_size() if dist.is_initialized() else 1


def spans_nodes(ranks) -> bool:
    per_node = gpus_per_node()
    return len({rank // per_node for rank in ranks}) > 1


def group_spans_nodes(group) -> bool:
    """Whether the process group (a group, its name, or None for the world) spans nodes."""
    group = _compat.resolve_process_group(group)
    return spans_nodes(dist.get_process_group_ranks(group))
