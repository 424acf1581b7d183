"""The partial collectors of sequence-parallel attention: gradient partials summed once, attention
partials merged once, by row range, with more partials than they hold pending (folded)."""

import torch
from hypothesis import given, settings, strategies as st

from graphopt.ops.attention import merge_attention_blocks
from graphopt.ops.sp_attention import _OutPartials, _Partials

ROWS = 12


def _ranges(draw_ranges):
    return [(min(a, b), max(a, b) + 1) for a, b in draw_ranges]


@settings(max_examples=40, deadline=None)
@given(ranges=st.lists(st.tuples(st.integers(0, ROWS - 1), st.integers(0, ROWS - 1)),
                       min_size=0, max_size=20), seed=st.integers(0, 2**16))
def test_gradient_partials_sum_to_the_float32_total_rounded_once(ranges, seed):
    gen = torch.Generator().manual_seed(seed)
    like = torch.empty(2, 3, ROWS, 4, dtype=torch.bfloat16)
    partials = _Partials(like)
    expected = torch.zeros(like.shape, dtype=torch.float64)
    for i, (start, stop) in enumerate(_ranges(ranges)):
        part = torch.randn(2, 3, stop - start, 4, generator=gen)
        part = part.to(torch.bfloat16) if i % 2 else part  # kernels' dtypes mix
        partials.add(start, stop, part)
        expected[:, :, start:stop] += part.double()
        assert len(partials.parts) <= _Partials.MAX_PENDING
    total = partials.total(torch.float32)
    torch.testing.assert_close(total.double(), expected, atol=1e-5, rtol=1e-5)
    assert partials.total(torch.bfloat16).dtype == torch.bfloat16


@settings(max_examples=40, deadline=None)
@given(ranges=st.lists(st.tuples(st.integers(0, ROWS - 1), st.integers(0, ROWS - 1)),
                       min_size=0, max_size=20), seed=st.integers(0, 2**16))
def test_attention_partials_merge_like_blockwise_accumulation(ranges, seed):
    """Rows no partial covers come out 0 with LSE -inf, as a row that saw no key."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.empty(1, 2, ROWS, 4)
    parts = _OutPartials(q)
    out_acc = torch.zeros(q.shape)
    lse_acc = torch.full(q.shape[:3], float("-inf"))
    for start, stop in _ranges(ranges):
        out = torch.randn(1, 2, stop - start, 4, generator=gen)
        lse = torch.randn(1, 2, stop - start, generator=gen)
        parts.add(start, stop, out, lse)
        merge_attention_blocks(out_acc[:, :, start:stop], lse_acc[:, :, start:stop], out, lse)
        assert len(parts.parts) <= _OutPartials.MAX_PENDING
    out, lse = parts.total(torch.float32)
    torch.testing.assert_close(out, out_acc, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, lse_acc, atol=1e-5, rtol=1e-5)
