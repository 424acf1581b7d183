"""The tracked runtime on CPU: the op's numerics (torch.mm), the cuBLASLt descriptor it builds (on a
stand-in for nvmath's bindings: operand layouts, the chunk axis, the counters, the heuristic and its
refusals), and the cost model's tracked candidates and choices."""

import types

import numpy as np
import pytest
import torch

from graphopt.analysis import overlap_cost
from graphopt.analysis.device_profile import H100
from graphopt.distributed import tracked_gemm


def test_tracked_mm_is_torch_mm_on_cpu_and_has_a_fake():
    import graphopt.ops.tracked_matmul  # noqa: F401  registers graphopt::tracked_mm

    a, b = torch.randn(64, 48), torch.randn(32, 48).t()
    assert torch.equal(torch.ops.graphopt.tracked_mm(a, b, 4), torch.mm(a, b))
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        fake = torch.ops.graphopt.tracked_mm(torch.empty(64, 48), torch.empty(48, 32), 4)
    assert fake.shape == (64, 32)
    with pytest.raises(ValueError, match=r"multiplies \[M, K\] x \[K, N\]"):
        torch.ops.graphopt.tracked_mm(a, a, 4)


def test_tracked_collective_modes_need_cuda():
    import graphopt.ops.matmul_collectives  # noqa: F401

    a, b = torch.randn(8, 4), torch.randn(4, 6)
    with pytest.raises(ValueError, match="mode='tracked' runs cuBLASLt's tracked GEMM"):
        torch.ops.graphopt.matmul_all_reduce(a, b, None, "unused", "tracked", 4, 0)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        torch.ops.graphopt.all_gather_matmul(a, b, "unused", 2, 0, 2, "tracked")


@pytest.mark.parametrize("make, expected", [
    (lambda: torch.empty(32, 64).t(), (1, 64, 32, 64)),   # x @ W.t(): weight [N, K], transposed view
    (lambda: torch.empty(64, 32), (0, 32, 64, 32)),       # dY @ W: weight [K, N] as stored
    (lambda: torch.empty(128, 64), (0, 64, 128, 64)),     # a row-major activation [M, K]
    (lambda: torch.empty(64, 256).t()[:128], (1, 128, 64, 256)),   # [128, 64], strides (1, 256)
])
def test_operands_map_onto_cublas_column_major_without_copies(make, expected):
    """(cuBLAS op, rows, cols, ld): row-major [r, c] with unit column stride is the column-major
    transpose (op N); unit row stride is the matrix itself, transposed by cuBLAS (op T)."""
    assert tracked_gemm.Matrix.of(make()).column_major() == expected
    assert tracked_gemm.Matrix((4, 4), (8, 2), 256).column_major() is None


class FakeLt:
    """Stands for ``nvmath.bindings.cublasLt``: records descriptor / preference attributes and
    layouts; its heuristic returns ``algos`` results (0: none) or raises ``refuse``."""

    class Error(Exception):
        def __init__(self, status):
            super().__init__(f"status {status}")
            self.status = status

    MatmulDescAttribute = types.SimpleNamespace(
        TRANSA=3, TRANSB=4, SM_COUNT_TARGET=15, ATOMIC_SYNC_NUM_CHUNKS_D_ROWS=27,
        ATOMIC_SYNC_NUM_CHUNKS_D_COLS=28, ATOMIC_SYNC_IN_COUNTERS_POINTER=29,
        ATOMIC_SYNC_OUT_COUNTERS_POINTER=30)
    MatmulPreferenceAttribute = types.SimpleNamespace(
        MAX_WORKSPACE_BYTES=1, MIN_ALIGNMENT_A_BYTES=5, MIN_ALIGNMENT_B_BYTES=6,
        MIN_ALIGNMENT_C_BYTES=7, MIN_ALIGNMENT_D_BYTES=8)
    MatmulAlgoConfigAttribute = types.SimpleNamespace(ID=0, TILE_ID=1)
    MatmulAlgoCapAttribute = types.SimpleNamespace(ATOMIC_SYNC=20)
    matmul_heuristic_result_dtype = np.dtype([("algo", np.uint64, 8), ("workspace_size", np.uint64),
                                              ("state", np.int32), ("waves_count", np.float32)])

    def __init__(self, algos=1, refuse=None, version=120904):
        self.algos, self.refuse, self.version = algos, refuse, version
        self.desc, self.pref, self.layouts, self.destroyed = {}, {}, [], []

    def get_version(self):
        return self.version

    def get_status_name(self, status):
        return {15: "CUBLAS_STATUS_NOT_SUPPORTED", 7: "CUBLAS_STATUS_INVALID_VALUE"}[status]

    def matmul_desc_create(self, compute, scale):
        assert (compute, scale) == (68, 0)     # CUBLAS_COMPUTE_32F, CUDA_R_32F scale
        return 1

    def _read(self, buf, size):
        return int(np.frombuffer((np.ctypeslib.as_array(
            (np.ctypeslib.ctypes.c_uint8 * size).from_address(buf))).tobytes(), dtype=np.int64
            if size == 8 else np.int32)[0])

    def matmul_desc_set_attribute(self, desc, attr, buf, size):
        if self.refuse and attr == self.refuse[0]:
            raise self.Error(self.refuse[1])
        self.desc[attr] = self._read(buf, size)

    def matmul_preference_set_attribute(self, pref, attr, buf, size):
        self.pref[attr] = self._read(buf, size)

    get_matmul_desc_attribute_dtype = staticmethod(
        lambda attr: np.int64 if attr in (29, 30) else np.int32)
    get_matmul_preference_attribute_dtype = staticmethod(
        lambda attr: np.uint64 if attr == 1 else np.uint32)
    get_matmul_algo_config_attribute_dtype = staticmethod(lambda attr: np.uint32)
    get_matmul_algo_cap_attribute_dtype = staticmethod(lambda attr: np.int32)

    def matrix_layout_create(self, dtype, rows, cols, ld):
        self.layouts.append((dtype, rows, cols, ld))
        return 10 + len(self.layouts)

    def matrix_layout_destroy(self, layout):
        self.destroyed.append(layout)

    def matmul_desc_destroy(self, desc):
        self.destroyed.append(desc)

    def matmul_preference_create(self):
        return 2

    def matmul_preference_destroy(self, pref):
        pass

    def matmul_algo_get_heuristic(self, handle, desc, a, b, c, d, pref, requested, results, count):
        np.ctypeslib.as_array((np.ctypeslib.ctypes.c_int32 * 1).from_address(count))[0] = self.algos
        array = np.ctypeslib.as_array(
            (np.ctypeslib.ctypes.c_uint8 * (requested * self.matmul_heuristic_result_dtype.itemsize))
            .from_address(results)).view(self.matmul_heuristic_result_dtype)
        array["workspace_size"][:self.algos] = 4096
        array["waves_count"][:self.algos] = 1.5

    def matmul_algo_config_get_attribute(self, algo, attr, buf, size, written):
        np.ctypeslib.as_array((np.ctypeslib.ctypes.c_uint32 * 1).from_address(buf))[0] = 7 + attr

    def matmul_algo_cap_get_attribute(self, algo, attr, buf, size, written):
        np.ctypeslib.as_array((np.ctypeslib.ctypes.c_int32 * 1).from_address(buf))[0] = 1


@pytest.fixture
def fake_lt(monkeypatch):
    def install(**kwargs):
        lt = FakeLt(**kwargs)
        monkeypatch.setattr(tracked_gemm, "_bindings", lambda: lt)
        monkeypatch.setattr(tracked_gemm, "_handle", lambda device: 99)
        monkeypatch.setattr(tracked_gemm, "_PLANS", {})
        return lt
    return install


def _row_parallel(m=1024, n=512, k=256):
    """x [m, k] @ weight.t() (weight [n, k]) -> out [m, n], fresh allocations."""
    return (tracked_gemm.contiguous(m, k), tracked_gemm.Matrix((k, n), (1, k), 256),
            tracked_gemm.contiguous(m, n))


def test_the_heuristic_is_asked_with_the_counters_set_and_row_chunks_are_cublas_columns(fake_lt):
    lt = fake_lt()
    a, b, out = _row_parallel()
    assert tracked_gemm.refusal(0, torch.bfloat16, a, b, out, 8) is None
    attr = FakeLt.MatmulDescAttribute
    assert lt.desc[attr.TRANSA] == 1 and lt.desc[attr.TRANSB] == 0   # weight.t() is op T
    # torch's rows (tokens) are the columns of cuBLAS's column-major D = out^T
    assert (lt.desc[attr.ATOMIC_SYNC_NUM_CHUNKS_D_ROWS], lt.desc[attr.ATOMIC_SYNC_NUM_CHUNKS_D_COLS]) == (1, 8)
    assert attr.ATOMIC_SYNC_OUT_COUNTERS_POINTER in lt.desc
    assert attr.ATOMIC_SYNC_IN_COUNTERS_POINTER not in lt.desc
    # cuBLAS A = weight (K x N col-major, op T), B = x^T (K x M), D = out^T (N x M, ld N)
    assert lt.layouts == [(14, 256, 512, 256), (14, 256, 1024, 256), (14, 512, 1024, 512)]
    assert lt.pref[FakeLt.MatmulPreferenceAttribute.MAX_WORKSPACE_BYTES] == tracked_gemm.workspace_bytes()
    assert lt.pref[FakeLt.MatmulPreferenceAttribute.MIN_ALIGNMENT_A_BYTES] == 256
    found = tracked_gemm._plan(0, torch.bfloat16, a, b, out, 8, "rows", "out", False, 0)
    assert found.workspace == 4096 and found.info["heuristic_algos"] == 1
    assert found.info["id"] == 7 and found.info["cap_atomic_sync"] == 1


def test_column_chunks_in_counters_and_an_sm_target(fake_lt):
    lt = fake_lt()
    a, b, out = _row_parallel()
    assert tracked_gemm.refusal(0, torch.float16, a, b, out, 4, "cols", "in") is None
    attr = FakeLt.MatmulDescAttribute
    assert (lt.desc[attr.ATOMIC_SYNC_NUM_CHUNKS_D_ROWS], lt.desc[attr.ATOMIC_SYNC_NUM_CHUNKS_D_COLS]) == (4, 1)
    assert attr.ATOMIC_SYNC_IN_COUNTERS_POINTER in lt.desc and lt.layouts[0][0] == 2   # fp16
    tracked_gemm._plan(0, torch.float16, a, b, out, 4, "rows", "out", False, 116)
    assert lt.desc[attr.SM_COUNT_TARGET] == 116


def test_refusals_say_why_and_name_cublas_13s_removal(fake_lt):
    a, b, out = _row_parallel()
    lt = fake_lt(algos=0)
    assert "returned 0 algorithms" in tracked_gemm.refusal(0, torch.bfloat16, a, b, out, 8)
    assert lt.destroyed                                    # the descriptors of a refused plan go
    fake_lt(refuse=(27, 7), version=130100)
    reason = tracked_gemm.refusal(0, torch.bfloat16, a, b, out, 8)
    assert reason.startswith("cuBLASLt refused the atomic-sync attributes: CUBLAS_STATUS_INVALID_VALUE (7)")
    assert "removed atomic-sync counters in 13.0; this is cuBLASLt 13.1" in reason
    fake_lt()
    assert "do not split into 3 equal chunks" in tracked_gemm.refusal(0, torch.bfloat16, a, b, out, 3)
    assert "unit stride along its rows" in tracked_gemm.refusal(
        0, torch.bfloat16, a, b, tracked_gemm.Matrix((1024, 512), (1, 1024), 256), 8)


def test_without_the_bindings_the_reason_names_the_gpu_extra(monkeypatch):
    monkeypatch.setattr(tracked_gemm, "_bindings", lambda: ImportError("No module named 'nvmath'"))
    reason = tracked_gemm.support(1024, 512, 256, torch.bfloat16, 8)
    assert "install graphopt's 'gpu' extra" in reason and "No module named 'nvmath'" in reason


# --- cost model ------------------------------------------------------------------------------------

def _choose(kind, m, n, k, world=2, **kwargs):
    return overlap_cost.choose_overlap(kind, m, n, k, 2, world, H100, is_cuda=True,
                                       symmetric_memory=True, replay=True, **kwargs)


def test_tracked_plans_are_offered_only_at_supported_chunk_counts():
    assert not any(key.startswith("tracked") for key in _choose("all_reduce", 8192, 8192, 4096).estimates_s)
    times = _choose("all_reduce", 8192, 8192, 4096, tracked_chunks=(8,)).estimates_s
    assert {key for key in times if key.startswith("tracked")} == {
        "tracked:8:ce", "tracked:8:sm8", "tracked:8:sm16"}
    four = _choose("all_reduce", 8192, 8192, 4096, world=4, tracked_chunks=(8,)).estimates_s
    assert "tracked_two_shot:8:sm16" in four and "tracked_two_shot:8:ce" not in four
    off_cuda = overlap_cost.choose_overlap("all_reduce", 8192, 8192, 4096, 2, 2, H100, is_cuda=False,
                                           symmetric_memory=False, tracked_chunks=(8,))
    assert not any(key.startswith("tracked") for key in off_cuda.estimates_s)


def test_tracked_chunk_layouts():
    assert overlap_cost.tracked_chunk_ok("all_reduce", 8192, 4, 8)
    assert not overlap_cost.tracked_chunk_ok("all_reduce", 8190, 2, 8)
    assert not overlap_cost.tracked_chunk_ok("reduce_scatter", 8192, 4, 6)     # whole rank blocks
    assert not overlap_cost.tracked_chunk_ok("all_reduce", 8192, 4, 6, two_shot=True)
    assert overlap_cost.tracked_chunk_ok("all_gather", 8192, 2, 16)           # per 4096-row shard
    assert overlap_cost.estimate("reduce_scatter", 8192, 8192, 4096, 2, 4, H100, tile_ok=False,
                                 tracked_chunks=(6,))["tracked:6:ce"] == float("inf")


def test_the_model_takes_tracked_where_it_wins_by_its_margin_and_never_loses_to_sequential():
    # The all-gather's tracked GEMM starts on each chunk as it lands: no NCCL contention.
    choice = _choose("all_gather", 8192, 8192, 14336, tracked_chunks=(4, 8, 16))
    assert choice.mode == "tracked" and choice.comm_sms == 0
    assert overlap_cost.plan_key(choice) in choice.estimates_s
    for kind in ("all_reduce", "reduce_scatter", "all_gather"):
        for m, n, k in ((4096, 4096, 8192), (8192, 8192, 4096), (16384, 8192, 4096), (1024, 1024, 1024)):
            for world in (2, 4):
                found = _choose(kind, m, n, k, world=world, tracked_chunks=(4, 8, 16))
                if found.rewrites:
                    margin = max(overlap_cost.MARGINS[found.mode],
                                 overlap_cost.MARGIN_MULTI if world > 2 else 0.0)
                    chosen = found.estimates_s[overlap_cost.plan_key(found)]
                    assert chosen <= found.estimates_s["sequential"] * (1 - margin)


def test_forced_tracked_mode_without_counters_keeps_the_graph_and_says_why():
    refused = _choose("all_reduce", 8192, 8192, 4096, mode="tracked")
    assert refused.mode == "sequential" and "cuBLASLt takes no chunk counters" in refused.reason
    forced = _choose("reduce_scatter", 8192, 8192, 4096, mode="tracked", tracked_chunks=(8,))
    assert forced.mode == "tracked" and forced.chunks == 8 and forced.reason.startswith("forced tracked")


def test_the_bindings_import_without_the_package_init_that_needs_more(tmp_path, monkeypatch):
    """nvmath's package __init__ imports APIs that need cuda-core; its cuBLASLt bindings do not.
    Where the package import fails, the module is imported under bare parent packages, which leave
    sys.modules afterwards."""
    import sys
    root = tmp_path / "heavypkg"
    (root / "bindings").mkdir(parents=True)
    (root / "__init__.py").write_text("import a_dependency_that_is_missing\n")
    (root / "bindings" / "__init__.py").write_text("raise ImportError('not run')\n")
    (root / "bindings" / "lt.py").write_text("from heavypkg.bindings import helper\nVALUE = helper.X\n")
    (root / "bindings" / "helper.py").write_text("X = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError):
        __import__("heavypkg.bindings.lt")
    module = tracked_gemm._import_without_package_init("heavypkg.bindings.lt")
    assert module.VALUE == 42
    assert "heavypkg" not in sys.modules and "heavypkg.bindings" not in sys.modules
    for name in ("heavypkg.bindings.lt", "heavypkg.bindings.helper"):
        monkeypatch.delitem(sys.modules, name)
