"""The offload cost model: windows, the shared D2H / H2D queues, options and the hidden plan."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings, strategies as st

from graphopt import config
from graphopt.analysis import offload_model
from graphopt.analysis.device_profile import DeviceProfile
from graphopt.analysis.liveness import SavedTensor

# 1 GB/s and no launch latency: 1e6 bytes take exactly 1 ms.
LINK = DeviceProfile("test", matmul_tflops=1.0, matmul_tflops_fp32=1.0, hbm_gbps=100.0,
                     allreduce_bus_gbps=1.0, p2p_gbps=1.0, host_link_gbps=1.0, kernel_launch_s=0.0)


def saved(name, nbytes, fw_index, after_ms, before_ms):
    return SavedTensor(name=name, nbytes=nbytes, shape=(nbytes // 2,), dtype=torch.bfloat16,
                       fw_index=fw_index, bw_index=0, fw_time_after_s=after_ms * 1e-3,
                       bw_time_before_s=before_ms * 1e-3, recompute_time_s=None)


def test_one_tensor_is_hidden_up_to_its_window():
    wide = [saved("x", 1_000_000, 0, after_ms=5, before_ms=5)]
    assert offload_model.hidden_fractions(wide, LINK) == {"x": 1.0}
    narrow = [saved("x", 1_000_000, 0, after_ms=5, before_ms=0.25)]  # reload window 0.25 ms
    assert offload_model.hidden_fractions(narrow, LINK)["x"] == pytest.approx(0.25)


def test_tensors_share_the_link_instead_of_each_using_the_whole_window():
    # Two 1 MB tensors produced together, 1.5 ms of forward left: the D2H queue holds 1.5 MB, not 2.
    pair = [saved("a", 1_000_000, 0, after_ms=1.5, before_ms=10),
            saved("b", 1_000_000, 1, after_ms=1.5, before_ms=10)]
    hidden = offload_model.hidden_fractions(pair, LINK)
    assert hidden["a"] == pytest.approx(1.0)
    assert hidden["b"] == pytest.approx(0.5)
    assert sum(hidden.values()) * 1e6 <= 1.5e6 + 1


def test_exposed_time_is_the_queue_overrun():
    pair = [saved("a", 1_000_000, 0, after_ms=1.5, before_ms=10),
            saved("b", 1_000_000, 1, after_ms=1.5, before_ms=10)]
    options = offload_model.offload_options(pair, LINK, None)
    by_alpha = {o.alpha: o for o in options["b"]}
    assert by_alpha[0.5].exposed_time_s == pytest.approx(0.0, abs=1e-9)
    assert by_alpha[1.0].exposed_time_s == pytest.approx(0.5e-3)  # 0.5 MB more behind a full link
    assert by_alpha[1.0].device_bytes_freed == by_alpha[1.0].host_bytes == 1_000_000


def test_reload_queue_orders_by_first_use():
    # Both are needed 1 ms into the backward; together they need 2 ms of the H2D link.
    pair = [saved("a", 1_000_000, 0, after_ms=10, before_ms=1.0),
            saved("b", 1_000_000, 1, after_ms=10, before_ms=1.0)]
    forward, backward = offload_model.queue_stall_s(pair, {"a": 1.0, "b": 1.0}, LINK)
    assert forward == 0.0
    assert backward == pytest.approx(1e-3)


def test_host_capacity_limits_options_and_plan():
    tensors = [saved(f"t{i}", 1_000_000, i, after_ms=100, before_ms=100) for i in range(4)]
    with config.patch(offload_host_capacity="2.5MB"):
        capacity = config.snapshot().offload_host_capacity
    assert capacity == 2_500_000
    options = offload_model.offload_options(tensors, LINK, capacity)
    plan = offload_model.hidden_plan(tensors, options, capacity)
    assert plan == {"t0": 1.0, "t1": 1.0}  # earliest produced first, the third would exceed 2.5 MB


tensor_lists = st.lists(
    st.tuples(st.integers(1, 4_000_000), st.floats(0.0, 8.0), st.floats(0.0, 16.0)),
    min_size=1, max_size=8)


@settings(max_examples=20, deadline=None)
@given(tensor_lists)
def test_hidden_plan_adds_no_stall_and_options_grow_with_alpha(specs):
    tensors = [saved(f"t{i}", n, i, after_ms=a, before_ms=b) for i, (n, a, b) in enumerate(specs)]
    options = offload_model.offload_options(tensors, LINK, None)
    plan = offload_model.hidden_plan(tensors, options, None, profile=LINK)
    forward, backward = offload_model.queue_stall_s(tensors, plan, LINK)
    # Each planned copy may expose up to the model's tolerance; their stalls add up in the queue.
    assert forward + backward <= offload_model.HIDDEN_TOLERANCE_S * max(len(plan), 1) * (1 + 1e-9)
    for name, choices in options.items():
        alphas = [o.alpha for o in choices]
        assert alphas == sorted(alphas) and all(0 < a <= 1 for a in alphas)
        exposed = [o.exposed_time_s for o in choices]
        assert all(x <= y + 1e-8 + 1e-6 * abs(y) for x, y in zip(exposed, exposed[1:]))
    # deterministic: the same input gives the same plan (every rank plans alike)
    again = [dataclasses.replace(t) for t in reversed(tensors)]
    assert offload_model.hidden_plan(again, offload_model.offload_options(again, LINK, None), None,
                                     profile=LINK) == plan


def test_window_bytes_say_where_the_link_time_goes():
    # 12 ms forward: a 1 MB tensor 2 ms in (10 ms left), another at 7 ms (5 ms left); 1 GB/s
    pair = [saved("a", 1_000_000, 0, after_ms=10, before_ms=10),
            saved("b", 1_000_000, 1, after_ms=5, before_ms=10)]
    windows = offload_model.window_bytes(pair, LINK, forward_s=12e-3)
    assert windows["saved_bytes"] == windows["d2h_window_bytes"] == 2_000_000
    assert windows["d2h_link_bytes"] == 12_000_000
    assert windows["d2h_before_first_s"] == pytest.approx(2e-3)
    assert windows["d2h_gaps_s"] == pytest.approx(4e-3)  # idle from a's end (3 ms) to b (7 ms)
    # a third tensor that fills the link to the end of the forward leaves no gap after it
    trio = pair + [saved("c", 9_000_000, 2, after_ms=4.5, before_ms=10)]
    windows = offload_model.window_bytes(trio, LINK, forward_s=12e-3)
    assert windows["d2h_window_bytes"] == pytest.approx(2_000_000 + 4_000_000, abs=2)  # c: 4 ms left
    assert windows["d2h_gaps_s"] == pytest.approx(4e-3)


def test_link_slack_gives_each_copy_more_time_and_the_plan_fewer_bytes():
    # 5 ms of forward after a 10 MB tensor at 1 GB/s: 5 MB fit at the profile's bandwidth.
    tensors = [saved("x", 10_000_000, 0, after_ms=5, before_ms=100)]
    exact = offload_model.planning_profile(LINK, config.snapshot(offload_link_slack=0).offload_link_slack)
    assert exact is LINK
    slow = offload_model.planning_profile(LINK, 0.25)
    assert slow.host_link_gbps == pytest.approx(0.8)
    assert offload_model.transfer_time_s(1e6, slow) == pytest.approx(1.25e-3)
    assert offload_model.hidden_fractions(tensors, exact)["x"] == pytest.approx(0.5)
    assert offload_model.hidden_fractions(tensors, slow)["x"] == pytest.approx(0.4)
    assert config.snapshot().offload_link_slack > 0  # the default plans with slack
    with pytest.raises(config.ConfigError, match="offload_link_slack"):
        config.snapshot(offload_link_slack=-0.1)


def test_copy_points_wait_where_the_d2h_queue_is_done_and_reload_as_late_as_the_h2d_queue_allows():
    # 10 forward steps of 1 ms; a (1 MB = 1 ms) is written by step 0, b (2 MB) by step 1, both last
    # read at step 2: a's copy ends at 2 ms, b's (queued behind it) at 4 ms.
    forward = [1e-3] * 10
    backward = [1e-3] * 10
    copies = [offload_model.Copy("a", 1_000_000, produced=0, last_read=2, first_use=6),
              offload_model.Copy("b", 2_000_000, produced=1, last_read=2, first_use=3)]
    points, stall = offload_model.copy_points(forward, backward, copies, LINK)
    assert points["a"][0] == 3   # done at 2 ms, but read until step 2
    assert points["b"][0] == 4   # starts at 2 ms (behind a), done at 4 ms
    # backward: b is needed at 3 ms and takes 2 ms: issued at step 1; a at 6 ms: issued at step 5
    assert points["b"][1] == 1 and points["a"][1] == 5
    assert stall == 0.0


def test_copy_points_put_a_late_copy_at_the_ends_and_count_its_stall():
    copies = [offload_model.Copy("a", 3_000_000, produced=0, last_read=0, first_use=1)]
    points, stall = offload_model.copy_points([1e-3] * 2, [1e-3] * 3, copies, LINK)
    # 3 ms of copy in a 2 ms forward: the wait is at the forward's end (index 2), 2 ms late;
    # the reload is due 1 ms into the backward: issued at its start, 2 ms late
    assert points["a"] == (2, 0)
    assert stall == pytest.approx(2e-3 + 2e-3)
