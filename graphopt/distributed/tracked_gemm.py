"""Tracked GEMM: cuBLASLt's matmul with atomic-sync chunk counters, on the caller's stream.

``matmul(a, b, out, counters, chunks)`` computes ``out = a @ b`` (or ``out += a @ b``) with the same
cuBLASLt kernels torch's GEMMs use, and has the kernel itself say which output chunks are final:
the GEMM is not cut into sub-GEMMs, so it runs at cuBLAS speed, and a consumer (a copy engine
behind a stream wait, a few communication CTAs) can move chunk i while chunk i + 1 is computed --
the producer-side tracking of T3, in software.

What is relied on (the cuBLAS documentation of ``cublasLtMatmulDescAttributes_t`` and its
"Atomics Synchronization" section, cuBLAS 12.2-12.9; TransformerEngine's atomic-GEMM overlap,
``transformer_engine/common/comm_gemm_overlap/userbuffers/userbuffers.cu``: ``producer_kernel``,
``consumer_kernel``, ``reset_counters_kernel``, and ``cublaslt_gemm.cu``):

- Counters are ``int32``, one per chunk; ``ATOMIC_SYNC_NUM_CHUNKS_D_ROWS`` x ``_COLS`` chunks tile
  the output D (cuBLAS's column-major view; one of the two is 1 here). Counter i belongs to chunk
  i along the chunked dimension.
- Out counters (``ATOMIC_SYNC_OUT_COUNTERS_POINTER``, the GEMM produces): every counter must hold
  1 (``COUNTER_PENDING``) before the matmul starts; the kernel sets counter i to 0
  (``COUNTER_READY``) once every element of chunk i is written. A consumer waits until the counter
  reads 0 (TransformerEngine: a CAS loop, then ``fence.sc.gpu``; here an acquire load or
  ``cuStreamWaitValue32(EQ 0)``) and may then read the chunk. Nothing resets a counter: the runtime
  refills them with 1 on the GEMM's stream before every call (stream-ordered, so a CUDA graph of
  the call does the same).
- In counters (``ATOMIC_SYNC_IN_COUNTERS_POINTER``, the GEMM consumes): the kernel starts computing
  output chunk i only once counter i reads 0, so the producer of the input rows behind chunk i (an
  all-gather's copy) sets it to 0 after its writes are visible (a fenced ``cuStreamWriteValue32``).
- Only one of the two pointers is set per matmul; only algorithms whose ``ATOMIC_SYNC`` capability
  is set take counters, so the heuristic is queried with the counters already in the descriptor.
- Deprecated in cuBLAS 12.8 and **removed in cuBLAS 13.0** (CUDA 13.0 release notes, cuBLAS
  "Deprecations"; TransformerEngine refuses atomic GEMMs on cuBLAS >= 13). torch 2.11's CUDA 13
  wheels bring cuBLAS 13, where the descriptor or the heuristic refuses the counters: ``support``
  then says so, and the overlap pass falls back to the copy-engine / chunked runtimes.

Operands follow torch's row-major convention: ``out[M, N] = a[M, K] @ b[K, N]`` is cuBLAS's
column-major ``D[N, M] = op(b) @ op(a)``; an operand with unit stride in its last dimension is
passed untransposed, one with unit stride in its first transposed (a linear's ``weight.t()``), so
the row-parallel forward (``x @ W.t()``) and the column-parallel backward (``dY @ W``) both run
without copies. Chunks along torch's rows (``axis="rows"``: the tokens, cuBLAS's D columns) are the
contiguous row blocks the collectives move; ``axis="cols"`` chunks N (cuBLAS's D rows, strided
blocks), the dimension TransformerEngine's reduce-scatter producer chunks.

Workspace: torch's cuBLASLt workspace size (``torch.backends.cuda.cublaslt_workspace_size`` where
it exists; torch's Hopper default, 32 MiB, else), taken per call from torch's caching allocator on
the caller's stream, so it is stream-ordered and CUDA-graph safe. torch exposes no pointer to its
own workspace, so it is not the same allocation, only the same size and pool.

Bindings: cuBLASLt through ``nvmath-python`` (``nvmath.bindings.cublasLt``, the ``gpu`` extra),
imported on first use. Descriptors, layouts and the chosen algorithm are cached per shape, strides,
alignment, dtype, chunking and SM target; a call enqueues one ``cublasLtMatmul``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.machinery
import importlib.util
import logging
import os
import sys
import types
from typing import Optional

import torch

log = logging.getLogger("graphopt.distributed.tracked_gemm")

COUNTER_PENDING, COUNTER_READY = 1, 0
AXES = ("rows", "cols")
KINDS = ("out", "in")
HEURISTIC_ALGOS = 8          # algorithms asked of the heuristic (the first one runs)
HOPPER_WORKSPACE_BYTES = 32 * 2 ** 20

# cuBLAS / CUDA enum values (stable C ABI): cublasComputeType_t, cudaDataType_t, cublasOperation_t.
_COMPUTE_32F = 68
_CUDA_R_32F = 0
_CUDA_TYPES = {torch.float16: 2, torch.bfloat16: 14, torch.float32: 0}
_OP_N, _OP_T = 0, 1


@functools.lru_cache(maxsize=1)
def _bindings():
    """``nvmath.bindings.cublasLt``, or the ImportError that says why it cannot be had.

    ``import nvmath`` also imports nvmath's high-level APIs, which need ``cuda-core``; the bindings
    themselves need only ``cuda-bindings`` and ``cuda-pathfinder``. Where the package import fails
    for a dependency of those APIs, the bindings module is taken as far as it got, or imported
    under a bare ``nvmath`` package that runs no ``__init__``."""
    try:
        from nvmath.bindings import cublasLt
        return cublasLt
    except ImportError as err:
        first = err
    module = sys.modules.get("nvmath.bindings.cublasLt")
    if module is not None:
        return module
    try:
        return _import_without_package_init("nvmath.bindings.cublasLt")
    except ImportError:
        return first


def _import_without_package_init(name: str):
    """Import ``name`` with its parent packages as bare namespaces (their ``__init__`` not run);
    the bare parents leave ``sys.modules`` afterwards, the imported modules stay."""
    spec = importlib.util.find_spec(name.split(".")[0])
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"no {name.split('.')[0]} package")
    parents = name.split(".")[:-1]
    added = []
    try:
        for depth in range(1, len(parents) + 1):
            package = ".".join(parents[:depth])
            if package in sys.modules:
                continue
            module = types.ModuleType(package)
            module.__path__ = [os.path.join(location, *parents[1:depth])
                               for location in spec.submodule_search_locations]
            module.__spec__ = importlib.machinery.ModuleSpec(package, None, is_package=True)
            module.__spec__.submodule_search_locations = module.__path__
            sys.modules[package] = module
            added.append(package)
        return importlib.import_module(name)
    finally:
        for package in added:
            sys.modules.pop(package, None)


def bindings_error() -> Optional[str]:
    """None where cuBLASLt's bindings import, else why not (with the fix)."""
    module = _bindings()
    if isinstance(module, ImportError):
        return (f"nvmath-python's cuBLASLt bindings do not import ({module}); install graphopt's "
                "'gpu' extra (nvmath-python, cuda-core, cuda-pathfinder, cuda-bindings)")
    return None


def _lt():
    module = _bindings()
    if isinstance(module, ImportError):
        raise RuntimeError(bindings_error())
    return module


def cublaslt_version() -> Optional[int]:
    """cuBLASLt's version number (e.g. 130100 for 13.1.0), None where the bindings are missing."""
    return None if bindings_error() else int(_lt().get_version())


def _status(err: Exception) -> str:
    status = getattr(err, "status", None)
    if status is None:
        return str(err)
    try:
        return f"{_lt().get_status_name(int(status))} ({int(status)})"
    except Exception:   # an unknown status code: the exception's own text is all there is
        return str(err)


@functools.lru_cache(maxsize=None)
def _handle(device_index: int) -> int:
    with torch.cuda.device(device_index):
        return int(_lt().create())


def workspace_bytes() -> int:
    """torch's cuBLASLt workspace size (what its own GEMMs may use), where torch says it."""
    size = getattr(torch.backends.cuda, "cublaslt_workspace_size", None)
    try:
        return int(size()) if size is not None else HOPPER_WORKSPACE_BYTES
    except (AttributeError, RuntimeError):   # a build without CUDA has the Python side only
        return HOPPER_WORKSPACE_BYTES


@dataclasses.dataclass(frozen=True)
class Matrix:
    """What a plan depends on of a 2-D operand: shape, strides, alignment of its address."""

    shape: tuple[int, int]
    stride: tuple[int, int]
    align: int

    @staticmethod
    def of(t: torch.Tensor) -> "Matrix":
        address = t.data_ptr()
        align = next((value for value in (256, 128, 64, 32, 16, 8, 4, 2) if address % value == 0), 1)
        return Matrix(tuple(t.shape), tuple(t.stride()), align)

    def column_major(self) -> Optional[tuple[int, int, int, int]]:
        """(cuBLAS op, rows, cols, ld) of the column-major matrix this row-major one is, or None
        where neither dimension has unit stride."""
        (rows, cols), (row_stride, col_stride) = self.shape, self.stride
        if col_stride == 1 or cols == 1:
            return _OP_N, cols, rows, max(row_stride, cols, 1)      # the transpose, column-major
        if row_stride == 1 or rows == 1:
            return _OP_T, rows, cols, max(col_stride, rows, 1)
        return None


@dataclasses.dataclass
class Plan:
    """One cached cuBLASLt matmul: descriptors, the chosen algorithm, what the heuristic said."""

    desc: int
    layouts: tuple[int, int, int]          # A (= b), B (= a), D (= out); C = D
    results: object                        # numpy array of heuristic results (owns the algos)
    algo_ptr: int
    workspace: int
    info: dict

    def release(self) -> None:
        lt = _lt()
        for layout in self.layouts:
            lt.matrix_layout_destroy(layout)
        lt.matmul_desc_destroy(self.desc)


def _set(setter, obj: int, attr, value, dtype_of) -> None:
    import numpy as np
    buffer = np.array([value], dtype=dtype_of(attr))
    setter(obj, attr, buffer.ctypes.data, buffer.nbytes)


def _algo_info(lt, algo_ptr: int) -> dict:
    """The algorithm's configuration (id, tile, stages, split-K, ...) and its atomic-sync capability,
    for the logs and the probe."""
    import numpy as np
    info = {}
    for name in ("ID", "TILE_ID", "STAGES_ID", "SPLITK_NUM", "REDUCTION_SCHEME", "CTA_SWIZZLING",
                 "CLUSTER_SHAPE_ID", "INNER_SHAPE_ID"):
        attr = getattr(lt.MatmulAlgoConfigAttribute, name, None)
        if attr is None:
            continue
        buffer = np.zeros(1, dtype=lt.get_matmul_algo_config_attribute_dtype(attr))
        try:
            lt.matmul_algo_config_get_attribute(algo_ptr, attr, buffer.ctypes.data, buffer.nbytes, 0)
            info[name.lower()] = int(buffer[0])
        except Exception as err:   # an attribute this cuBLASLt does not report
            info[name.lower()] = f"unavailable: {_status(err)}"
    attr = getattr(lt.MatmulAlgoCapAttribute, "ATOMIC_SYNC", None)
    if attr is not None:
        buffer = np.zeros(1, dtype=lt.get_matmul_algo_cap_attribute_dtype(attr))
        try:
            lt.matmul_algo_cap_get_attribute(algo_ptr, attr, buffer.ctypes.data, buffer.nbytes, 0)
            info["cap_atomic_sync"] = int(buffer[0])
        except Exception as err:
            info["cap_atomic_sync"] = f"unavailable: {_status(err)}"
    return info


_PLANS: dict[tuple, Plan | str] = {}


def plan(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, chunks: int, axis: str = "rows",
         kind: Optional[str] = "out", accumulate: bool = False, sm_count: int = 0) -> Plan | str:
    """The cached plan of ``out (+)= a @ b`` with ``chunks`` counters along ``axis`` (``kind``
    None: a plain cuBLASLt matmul), or why it cannot run (logged once per shape)."""
    problem = _tensor_problem(a, b, out)
    if problem:
        return problem
    return _plan(a.device.index or 0, a.dtype, Matrix.of(a), Matrix.of(b), Matrix.of(out), chunks,
                 axis, kind, accumulate, sm_count)


def _tensor_problem(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> Optional[str]:
    if not (a.is_cuda and b.is_cuda and out.is_cuda):
        return "the tracked GEMM runs on CUDA tensors"
    if a.dim() != 2 or b.dim() != 2 or out.dim() != 2 or a.shape[1] != b.shape[0] \
            or tuple(out.shape) != (a.shape[0], b.shape[1]):
        return f"shapes {tuple(a.shape)} x {tuple(b.shape)} -> {tuple(out.shape)} are not a 2-D mm"
    if a.dtype not in (torch.float16, torch.bfloat16) or b.dtype != a.dtype or out.dtype != a.dtype:
        return f"dtypes {a.dtype} x {b.dtype} -> {out.dtype}: the tracked GEMM takes bf16 / fp16"
    return None


def _plan(device: int, dtype: torch.dtype, a: Matrix, b: Matrix, out: Matrix, chunks: int,
          axis: str, kind: Optional[str], accumulate: bool, sm_count: int) -> Plan | str:
    key = (device, dtype, a, b, out, chunks, axis, kind, accumulate, sm_count)
    found = _PLANS.get(key)
    if found is None:
        found = _PLANS[key] = _build(device, dtype, a, b, out, chunks, axis, kind, sm_count)
        shapes = f"{a.shape} x {b.shape} ({dtype}, {chunks} chunks along {axis}, {kind} counters)"
        if isinstance(found, str):
            log.warning("tracked GEMM refused for %s: %s", shapes, found)
        else:
            log.info("tracked GEMM plan for %s: %s", shapes, found.info)
    return found


def _problem(a: Matrix, b: Matrix, out: Matrix, chunks: int, axis: str,
             kind: Optional[str]) -> Optional[str]:
    if bindings_error():
        return bindings_error()
    if axis not in AXES or kind not in KINDS + (None,):
        return f"axis={axis!r} / kind={kind!r}: axis is one of {AXES}, kind one of {KINDS} or None"
    if out.stride[1] != 1:
        return f"output strides {out.stride}: the output must have unit stride along its rows"
    if a.column_major() is None or b.column_major() is None:
        return f"operand strides {a.stride} / {b.stride}: neither dimension has unit stride"
    extent = out.shape[0] if axis == "rows" else out.shape[1]
    if kind is not None and (chunks < 1 or extent % chunks):
        return f"{extent} {axis} do not split into {chunks} equal chunks"
    return None


def _build(device: int, dtype: torch.dtype, a: Matrix, b: Matrix, out: Matrix, chunks: int,
           axis: str, kind: Optional[str], sm_count: int) -> Plan | str:
    import numpy as np
    problem = _problem(a, b, out, chunks, axis, kind)
    if problem:
        return problem
    lt = _lt()
    cuda_type = _CUDA_TYPES[dtype]
    op_b, rows_b, cols_b, ld_b = b.column_major()     # cuBLAS A
    op_a, rows_a, cols_a, ld_a = a.column_major()     # cuBLAS B
    m, n = out.shape
    desc_attr = lt.MatmulDescAttribute
    desc = int(lt.matmul_desc_create(_COMPUTE_32F, _CUDA_R_32F))
    layouts = (int(lt.matrix_layout_create(cuda_type, rows_b, cols_b, ld_b)),
               int(lt.matrix_layout_create(cuda_type, rows_a, cols_a, ld_a)),
               int(lt.matrix_layout_create(cuda_type, n, m, out.stride[0])))
    built = Plan(desc, layouts, None, 0, 0, {})
    step = "descriptor"
    try:
        set_desc = functools.partial(_set, lt.matmul_desc_set_attribute, desc,
                                     dtype_of=lt.get_matmul_desc_attribute_dtype)
        set_desc(desc_attr.TRANSA, op_b)
        set_desc(desc_attr.TRANSB, op_a)
        if sm_count:
            set_desc(desc_attr.SM_COUNT_TARGET, sm_count)
        if kind is not None:
            step = "atomic-sync attributes"
            # torch rows are cuBLAS's D columns (column-major D = out^T).
            set_desc(desc_attr.ATOMIC_SYNC_NUM_CHUNKS_D_ROWS, chunks if axis == "cols" else 1)
            set_desc(desc_attr.ATOMIC_SYNC_NUM_CHUNKS_D_COLS, chunks if axis == "rows" else 1)
            # A placeholder address: the descriptor's counters are set per call, before the matmul.
            pointer = (desc_attr.ATOMIC_SYNC_OUT_COUNTERS_POINTER if kind == "out"
                       else desc_attr.ATOMIC_SYNC_IN_COUNTERS_POINTER)
            set_desc(pointer, 256)
        step = "preference"
        preference = int(lt.matmul_preference_create())
        try:
            pref_attr = lt.MatmulPreferenceAttribute
            set_pref = functools.partial(_set, lt.matmul_preference_set_attribute, preference,
                                         dtype_of=lt.get_matmul_preference_attribute_dtype)
            set_pref(pref_attr.MAX_WORKSPACE_BYTES, workspace_bytes())
            # As torch does: the operands' real alignment, so no algorithm is excluded needlessly.
            for attr, matrix in ((pref_attr.MIN_ALIGNMENT_A_BYTES, b), (pref_attr.MIN_ALIGNMENT_B_BYTES, a),
                                 (pref_attr.MIN_ALIGNMENT_C_BYTES, out),
                                 (pref_attr.MIN_ALIGNMENT_D_BYTES, out)):
                set_pref(attr, matrix.align)
            step = "heuristic"
            results = np.zeros(HEURISTIC_ALGOS, dtype=lt.matmul_heuristic_result_dtype)
            count = np.zeros(1, dtype=np.int32)
            lt.matmul_algo_get_heuristic(_handle(device), desc, layouts[0], layouts[1],
                                         layouts[2], layouts[2], preference, HEURISTIC_ALGOS,
                                         results.ctypes.data, count.ctypes.data)
        finally:
            lt.matmul_preference_destroy(preference)
        found = int(count[0])
        usable = [i for i in range(found) if int(results["state"][i]) == 0]
        if not usable:
            built.release()
            return (f"the heuristic returned {found} algorithms, none usable (states "
                    f"{[int(state) for state in results['state'][:found]]})")
        first = usable[0]
        built.results = results
        built.algo_ptr = (results.ctypes.data + first * results.dtype.itemsize
                          + results.dtype.fields["algo"][1])
        built.workspace = int(results["workspace_size"][first])
        built.info = {"heuristic_algos": found, "workspace_bytes": built.workspace,
                      "waves": float(results["waves_count"][first]),
                      **_algo_info(lt, built.algo_ptr)}
        return built
    except Exception as err:   # cuBLASLt said no: the reason is the result
        built.release()
        version = cublaslt_version()
        hint = (" (cuBLAS removed atomic-sync counters in 13.0; this is cuBLASLt "
                f"{version // 10000}.{version // 100 % 100})"
                if kind is not None and version and version >= 130000 else "")
        return f"cuBLASLt refused the {step}: {_status(err)}{hint}"


_ALPHA_BETA: dict[bool, tuple] = {}


def _scalars(accumulate: bool) -> tuple:
    import numpy as np
    found = _ALPHA_BETA.get(accumulate)
    if found is None:
        found = _ALPHA_BETA[accumulate] = (np.ones(1, np.float32), np.full(1, float(accumulate), np.float32))
    return found


def matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, counters: Optional[torch.Tensor],
           chunks: int, axis: str = "rows", kind: Optional[str] = "out", accumulate: bool = False,
           sm_count: int = 0) -> None:
    """Enqueue ``out = a @ b`` (``accumulate``: ``out += a @ b``) on the current stream, setting
    (``kind="out"``) or waiting for (``kind="in"``) ``counters`` [chunks] int32 (see the module
    docstring; out counters must hold COUNTER_PENDING). ``sm_count`` > 0 caps the SMs cuBLAS plans
    for (communication CTAs keep the rest). Raises where cuBLASLt refuses (``plan`` says why)."""
    found = plan(a, b, out, chunks, axis, kind, accumulate, sm_count)
    if isinstance(found, str):
        raise RuntimeError(f"tracked GEMM unavailable: {found}")
    lt = _lt()
    if kind is not None:
        if counters is None or counters.dtype != torch.int32 or counters.numel() < chunks:
            raise ValueError(f"the tracked GEMM needs an int32 counter per chunk ({chunks})")
        attr = (lt.MatmulDescAttribute.ATOMIC_SYNC_OUT_COUNTERS_POINTER if kind == "out"
                else lt.MatmulDescAttribute.ATOMIC_SYNC_IN_COUNTERS_POINTER)
        _set(lt.matmul_desc_set_attribute, found.desc, attr, counters.data_ptr(),
             lt.get_matmul_desc_attribute_dtype)
    workspace = torch.empty(max(found.workspace, 1), dtype=torch.uint8, device=out.device)
    alpha, beta = _scalars(accumulate)
    stream = torch.cuda.current_stream(out.device).cuda_stream
    lt.matmul(_handle(out.device.index), found.desc, alpha.ctypes.data, b.data_ptr(), found.layouts[0],
              a.data_ptr(), found.layouts[1], beta.ctypes.data, out.data_ptr(), found.layouts[2],
              out.data_ptr(), found.layouts[2], found.algo_ptr, workspace.data_ptr(), found.workspace,
              stream)


def refusal(device: int, dtype: torch.dtype, a: Matrix, b: Matrix, out: Matrix, chunks: int,
            axis: str = "rows", kind: Optional[str] = "out") -> Optional[str]:
    """None where the tracked GEMM runs ``out = a @ b`` as described (the heuristic returned an
    algorithm with the counters set), else why not. Cached per description; allocates nothing."""
    problem = bindings_error()
    if problem:
        return problem
    found = _plan(device, dtype, a, b, out, chunks, axis, kind, False, 0)
    return found if isinstance(found, str) else None


def contiguous(rows: int, cols: int) -> Matrix:
    """A fresh row-major [rows, cols] allocation (torch's allocations are 256-byte aligned)."""
    return Matrix((rows, cols), (cols, 1), 256)


def support(m: int, n: int, k: int, dtype: torch.dtype, chunks: int, axis: str = "rows",
            kind: Optional[str] = "out", weight_transposed: bool = True,
            device: Optional[torch.device] = None) -> Optional[str]:
    """``refusal`` for fresh contiguous operands ``[m, k] @ [k, n]`` (``weight_transposed``: ``b``
    is a linear's ``weight.t()``) on this device."""
    if bindings_error():
        return bindings_error()
    if not torch.cuda.is_available():
        return "the tracked GEMM needs CUDA"
    index = (device or torch.device("cuda", torch.cuda.current_device())).index or 0
    b = Matrix((k, n), (1, k), 256) if weight_transposed else contiguous(k, n)
    return refusal(index, dtype, contiguous(m, k), b, contiguous(m, n), chunks, axis, kind)


def clear_cache() -> None:
    """Release every cached plan (descriptors and layouts)."""
    for found in _PLANS.values():
        if isinstance(found, Plan):
            found.release()
    _PLANS.clear()
