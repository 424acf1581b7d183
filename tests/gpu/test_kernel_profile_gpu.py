"""graphopt.debug.kernel_profile on a CUDA GPU: kernels by kind, and the compute stream's idle time
while it waits on another stream's copy."""

import pytest
import torch

from graphopt.debug import kernel_profile

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_a_wait_on_a_side_stream_copy_shows_as_compute_stream_idle_time():
    """A 256 MiB device-to-host copy on a side stream (~5 ms at ~55 GB/s) between GEMMs (~1.4 ms
    each at 8192^3, so the compute stream stays the busiest): waited for, it leaves the compute
    stream idle for most of the copy, a gap before the next GEMM."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) / 90
    host = torch.empty(256 * 2**20, dtype=torch.uint8, pin_memory=True)
    payload = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    side = torch.cuda.Stream()

    def step(wait: bool):
        b = a @ a
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            host.copy_(payload, non_blocking=True)
        if wait:
            torch.cuda.current_stream().wait_stream(side)
        for _ in range(8):
            b = b @ a
        return b

    step(True)
    waited = kernel_profile.profile_call(lambda: step(True))
    free = kernel_profile.profile_call(lambda: step(False))
    assert waited["by_kind"]["gemm"]["calls"] == 9 and waited["by_kind"]["copy_d2h"]["calls"] == 1
    assert len(waited["streams"]["busy_ms"]) == 2
    difference = kernel_profile.compare(waited, free)
    assert difference["compute_idle_ms"] > 2.0, kernel_profile.format_comparison(difference)
    longest = waited["streams"]["compute"]["gaps"][0]
    assert longest["ms"] > 2.0 and kernel_profile.kind_of(longest["before"]) == "gemm"
