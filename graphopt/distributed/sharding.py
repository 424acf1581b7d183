"""Sharding a batch along the sequence for sequence-parallel attention, and gathering it back.

Rank r of P takes the contiguous tokens [r*S/P, (r+1)*S/P) and their GLOBAL position ids, then runs
the unchanged model on them (``graphopt.config.sequence_parallel_attention=True`` makes attention
span the whole sequence)::

    tokens, positions = shard_sequence(tokens)          # [B, S] -> [B, S/P] on every rank
    logits = compiled_model(tokens, positions)          # [B, S/P, V]
    full = gather_sequence(logits)                      # [B, S, V] where a rank needs it all
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from graphopt import _compat


class SequenceNotDivisibleError(ValueError):
    """The sequence cannot be split into equal contiguous chunks over the group."""


def _group_size_rank(group) -> tuple[int, int]:
    group = _compat.resolve_process_group(group)
    return dist.get_world_size(group), dist.get_rank(group)


def chunk_bounds(seq_len: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of ``rank``'s chunk; raises when ``seq_len`` does not split evenly."""
    if seq_len % world_size:
        pad = (-seq_len) % world_size
        raise SequenceNotDivisibleError(
            f"sequence length {seq_len} is not divisible by the sequence-parallel world size "
            f"{world_size}; pad the batch by {pad} tokens to {seq_len + pad} (and mask them out of "
            "the loss) or choose a group size that divides it")
    chunk = seq_len // world_size
    return rank * chunk, (rank + 1) * chunk


def shard_sequence(tokens: torch.Tensor, position_ids: Optional[torch.Tensor] = None, *,
                   group: Optional[dist.ProcessGroup] = None,
                   dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's contiguous chunk of ``tokens`` along ``dim`` and its global position ids.

    ``position_ids`` default to 0..S-1 broadcast like ``tokens`` without the trailing dims
    (shape [B, S] for tokens [B, S] or [B, S, ...]).
    """
    world_size, rank = _group_size_rank(group)
    dim = dim % tokens.dim()
    seq_len = tokens.shape[dim]
    start, stop = chunk_bounds(seq_len, world_size, rank)
    if position_ids is None:
        position_ids = torch.arange(seq_len, device=tokens.device).expand(tokens.shape[:dim + 1])
    elif position_ids.shape[dim] != seq_len:
        raise ValueError(
            f"position_ids {tuple(position_ids.shape)} must have the sequence length {seq_len} of "
            f"tokens {tuple(tokens.shape)} in dim {dim}")
    return tokens.narrow(dim, start, stop - start), position_ids.narrow(dim, start, stop - start)


def gather_sequence(local: torch.Tensor, *, group: Optional[dist.ProcessGroup] = None,
                    dim: int = 1) -> torch.Tensor:
    """Concatenate every rank's chunk along ``dim`` (the inverse of :func:`shard_sequence`).

    Not differentiable: meant for evaluation and for comparing against a single-process run.
    """
    group = _compat.resolve_process_group(group)
    world_size = dist.get_world_size(group)
    parts = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts, dim=dim)
