"""How much of the score matrix the flash-attention forward computes under a block-sparse mask.

The forward kernel (``flash_attention_fwd``) walks, for each BLOCK_M query rows, only the key
blocks some row may see (``key_block_range``); blocks every row sees whole run without an element
mask. ``count_tiles`` repeats that walk on the host, in torch, for whole sequences:

    count_tiles(8192, 8192, block_m=128, block_n=64, causal=True, window=4096)
    -> TileCount(computed=..., masked=..., dense=8192, visible_pairs=..., ...)

so a benchmark can report TFLOP/s on the FLOPs a mask really needs (``visible_pairs``: 4 * D FLOPs
each, forward), what fraction of the dense tiles a kernel computed, and how much of the computed
work the mask threw away (``efficiency``). The backward kernels walk about the same tiles from the key side (their
blocks are key-block aligned instead). No Triton here: the walk is the kernel's arithmetic on
integers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class TileCount:
    block_m: int
    block_n: int
    computed: int  # (query block, key block) tiles the forward computes
    masked: int  # of those, the tiles that run with an element mask
    dense: int  # tiles of the whole score matrix
    visible_pairs: int  # (query, key) pairs the mask lets through

    @property
    def computed_fraction(self) -> float:
        return self.computed / self.dense if self.dense else 0.0

    @property
    def efficiency(self) -> float:
        """Visible pairs over the pairs of the computed tiles (1.0: no masked-off work)."""
        pairs = self.computed * self.block_m * self.block_n
        return self.visible_pairs / pairs if pairs else 1.0


def _ceil_div(a: torch.Tensor, b: int) -> torch.Tensor:
    return torch.div(a + b - 1, b, rounding_mode="floor")


def _blocks(lo: torch.Tensor, hi: torch.Tensor, block: int) -> torch.Tensor:
    """Iterations of ``range(lo, hi, block)``, elementwise."""
    return _ceil_div((hi - lo).clamp_min(0), block)


def count_tiles(seqlen_q: int, seqlen_k: int, *, block_m: int, block_n: int, causal: bool,
                window: int = 0, row_start: Optional[torch.Tensor] = None, q_offset: int = 0,
                k_offset: int = 0) -> TileCount:
    """Tiles the forward computes for queries at positions q_offset + [0, Sq) over keys at
    k_offset + [0, Sk), with the same mask arguments as the kernels (``row_start`` [Sq] or
    [B, Sq]: the position where each query row's document starts; counts add over B)."""
    if (window or row_start is not None) and not causal:
        raise ValueError("a sliding window or document mask narrows a causal mask; pass "
                         "causal=True with it")
    starts = (torch.zeros(1, seqlen_q, dtype=torch.int64) if row_start is None
              else row_start.reshape(-1, seqlen_q).to(device="cpu", dtype=torch.int64))
    first_row = torch.arange(0, seqlen_q, block_m)
    last_row = (first_row + block_m).clamp_max(seqlen_q) - 1
    first_pos, last_pos = q_offset + first_row, q_offset + last_row

    start = torch.zeros_like(starts[:, first_row])
    full_start = torch.zeros_like(start)
    stop = torch.full_like(start, seqlen_k)
    full_stop = torch.full_like(start, seqlen_k)
    if causal:
        stop = (last_pos + 1 - k_offset).clamp(0, seqlen_k).expand_as(start)
        full_stop = (first_pos + 1 - k_offset).clamp(0, seqlen_k).expand_as(start)
    if window:
        start = start.maximum(first_pos - window + 1 - k_offset)
        full_start = full_start.maximum(last_pos - window + 1 - k_offset)
    if row_start is not None:
        start = start.maximum(starts[:, first_row] - k_offset)
        full_start = full_start.maximum(starts[:, last_row] - k_offset)
    start = torch.where(start < stop, torch.div(start, block_n, rounding_mode="floor") * block_n,
                        stop)
    full_start = (_ceil_div(full_start, block_n) * block_n).minimum(stop)
    full_stop = torch.div(full_stop, block_n, rounding_mode="floor") * block_n

    computed = _blocks(start, stop, block_n)
    unmasked = torch.where(full_start < full_stop, _blocks(full_start, full_stop, block_n), 0)
    batch = starts.shape[0]
    dense = batch * first_row.numel() * -(-seqlen_k // block_n)
    return TileCount(block_m=block_m, block_n=block_n, computed=int(computed.sum()),
                     masked=int((computed - unmasked).sum()), dense=dense,
                     visible_pairs=visible_pairs(seqlen_q, seqlen_k, causal=causal, window=window,
                                                 row_start=row_start, q_offset=q_offset,
                                                 k_offset=k_offset))


def visible_pairs(seqlen_q: int, seqlen_k: int, *, causal: bool, window: int = 0,
                  row_start: Optional[torch.Tensor] = None, q_offset: int = 0,
                  k_offset: int = 0) -> int:
    """(query, key) pairs the mask lets through, summed over row_start's batch."""
    if not causal:
        return seqlen_q * seqlen_k
    starts = (torch.zeros(1, seqlen_q, dtype=torch.int64) if row_start is None
              else row_start.reshape(-1, seqlen_q).to(device="cpu", dtype=torch.int64))
    q_pos = q_offset + torch.arange(seqlen_q)
    first_key = starts.maximum(torch.tensor(k_offset))
    if window:
        first_key = first_key.maximum(q_pos - window + 1)
    last_key = q_pos.clamp_max(k_offset + seqlen_k - 1)
    return int((last_key - first_key + 1).clamp_min(0).sum())
