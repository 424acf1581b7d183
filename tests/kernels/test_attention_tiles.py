"""count_tiles repeats the forward kernel's key-block walk on the host: the tiles it counts are
exactly the tiles holding a visible (query, key) pair, and its visible pairs are the mask's."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graphopt.kernels.attention_tiles import count_tiles
from graphopt.ops.attention import _allowed, document_bounds


def documents_of(cuts, length):
    bounds = [0] + sorted(set(cuts)) + [length]
    return torch.cat([torch.arange(hi - lo) for lo, hi in zip(bounds, bounds[1:]) if hi > lo])[None]


@settings(max_examples=80, deadline=None)
@given(seqlen_q=st.integers(1, 70), seqlen_k=st.integers(1, 70), block_m=st.sampled_from([8, 16]),
       block_n=st.sampled_from([8, 16]), causal=st.booleans(), window=st.sampled_from([0, 3, 17]),
       cuts=st.one_of(st.none(), st.lists(st.integers(1, 119), max_size=5)),
       q_offset=st.integers(0, 30), k_offset=st.integers(0, 30))
def test_counted_tiles_are_the_tiles_with_a_visible_pair(seqlen_q, seqlen_k, block_m, block_n,
                                                         causal, window, cuts, q_offset, k_offset):
    if not causal:
        window, cuts = 0, None
    row_start = None
    if cuts is not None:
        row_start = document_bounds(documents_of(cuts, 120))[0][:, q_offset:q_offset + seqlen_q]
    tiles = count_tiles(seqlen_q, seqlen_k, block_m=block_m, block_n=block_n, causal=causal,
                        window=window, row_start=row_start, q_offset=q_offset, k_offset=k_offset)
    seen = _allowed(seqlen_q, seqlen_k, causal, q_offset, k_offset, torch.device("cpu"), window,
                    row_start)
    seen = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool) if seen is None else \
        seen.reshape(seqlen_q, seqlen_k)
    blocks = [seen[i:i + block_m, j:j + block_n] for i in range(0, seqlen_q, block_m)
              for j in range(0, seqlen_k, block_n)]
    assert tiles.dense == len(blocks)
    assert tiles.computed == sum(bool(b.any()) for b in blocks)
    # Partly visible tiles need the element mask; a ragged last tile may run masked too.
    assert sum(bool(b.any()) and not bool(b.all()) for b in blocks) <= tiles.masked
    assert tiles.masked <= tiles.computed
    assert tiles.visible_pairs == int(seen.sum())


def test_a_window_computes_a_band_of_tiles():
    """At 8K with a 1K window, 128 x 64 tiles: each query block walks (1024 + 128) / 64 - 1 or so
    key blocks instead of up to 128, and every pair in the band is counted once."""
    dense = count_tiles(8192, 8192, block_m=128, block_n=64, causal=True)
    band = count_tiles(8192, 8192, block_m=128, block_n=64, causal=True, window=1024)
    assert band.computed <= 64 * (1024 + 128) // 64 + 64
    assert band.computed < dense.computed / 3
    assert band.visible_pairs == sum(min(p + 1, 1024) for p in range(8192))
    assert 0.8 < band.efficiency <= 1.0
    assert dense.computed_fraction == (64 * 65 // 2 * 2) / (64 * 128)
