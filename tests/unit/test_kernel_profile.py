"""graphopt.debug.kernel_profile: kernels by name and kind, and the difference of two calls."""

import torch

from graphopt.debug import kernel_profile


def test_kernel_names_fall_into_their_kinds():
    names = {
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64": "gemm",
        "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN": "gemm",
        "triton_tem_fused_mm_0": "gemm",
        "aten::mm": "gemm",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3": "attention",
        "_attn_fwd_inner": "attention",
        "Memcpy DtoH (Device -> Pinned)": "copy_d2h",
        "Memcpy HtoD (Pinned -> Device)": "copy_h2d",
        "Memcpy DtoD (Device -> Device)": "copy_d2d",
        "Memset (Device)": "memset",
        "triton_red_fused_cat_mul_0": "triton",  # a fused kernel with a cat in it is Inductor's
        "void at::native::elementwise_kernel<128, 2, direct_copy_kernel_cuda>": "copy_kernel",
        "void at::native::CatArrayBatchedCopy<>": "copy_kernel",
        "void at::native::vectorized_elementwise_kernel<4, FillFunctor<float>>": "other",
    }
    assert {name: kernel_profile.kind_of(name) for name in names} == names


def test_events_sum_by_name_and_kind_and_two_calls_compare():
    slow = kernel_profile.summarize_events([
        ("triton_poi_fused_add_0", 100.0), ("triton_poi_fused_add_0", 50.0),
        ("Memcpy DtoD (Device -> Device)", 400.0), ("nvjet_gemm", 1000.0)], top=2)
    fast = kernel_profile.summarize_events([("triton_poi_fused_add_0", 150.0), ("nvjet_gemm", 1000.0)])
    assert slow["total_ms"] == 1.55
    assert [k["name"] for k in slow["kernels"]] == ["nvjet_gemm", "Memcpy DtoD (Device -> Device)"]
    assert slow["by_kind"]["triton"] == {"ms": 0.15, "calls": 2}
    difference = kernel_profile.compare(slow, fast)
    assert list(difference["by_kind"])[0] == "copy_d2d"
    assert difference["by_kind"]["copy_d2d"] == {"ms": 0.4, "calls": 1}
    assert difference["by_kind"]["triton"]["calls"] == 1
    assert [k["name"] for k in difference["new_kernels"]] == ["Memcpy DtoD (Device -> Device)"]
    assert kernel_profile.format_comparison(difference).startswith(
        "+0.40 ms of kernel time: copy_d2d +0.40 ms")


def test_a_call_profiles_on_this_machine():
    a = torch.randn(64, 64)
    profile = kernel_profile.profile_call(lambda: (a @ a).clone())
    assert profile["by_kind"]["gemm"]["calls"] >= 1 and profile["by_kind"]["copy_kernel"]["calls"] >= 1
    assert profile["total_ms"] > 0


def test_the_compute_stream_idle_time_and_its_gaps_name_their_neighbours():
    kernels = [("gemm_a", 0.0, 100.0, 7), ("triton_b", 100.0, 150.0, 7),
               ("Memcpy DtoH (Device -> Pinned)", 90.0, 400.0, 13),   # the side stream's copy
               ("triton_c", 410.0, 500.0, 7),                          # waited for the copy
               ("triton_d", 505.0, 600.0, 7), ("triton_e", 550.0, 580.0, 7)]  # overlaps d
    timeline = kernel_profile.stream_timeline(kernels, gaps=2)
    assert timeline["busy_ms"] == {"7": 0.335, "13": 0.31}
    compute = timeline["compute"]
    assert compute["stream"] == "7" and compute["span_ms"] == 0.6
    assert abs(compute["idle_ms"] - 0.265) < 1e-9
    assert compute["gaps"][0] == {"ms": 0.26, "after": "triton_b", "before": "triton_c"}
    assert compute["gaps"][1] == {"ms": 0.005, "after": "triton_c", "before": "triton_d"}
    slow = {"total_ms": 1.0, "by_kind": {}, "kernels": [], "streams": timeline}
    fast = {"total_ms": 1.0, "by_kind": {}, "kernels": [],
            "streams": kernel_profile.stream_timeline([("gemm_a", 0.0, 100.0, 7)])}
    assert "the compute stream idle +0.27 ms" in kernel_profile.format_comparison(
        kernel_profile.compare(slow, fast))
