"""GPU checks of the tracked GEMM (cuBLASLt with chunk counters) on one device, and of the tracked
collectives on 2 / 4 (marked multigpu).

Where cuBLASLt refuses the counters (cuBLAS >= 13 removed them) the counter tests skip with the
refusal as the reason; the plain cuBLASLt path through the same bindings, and the op's fallback to
torch.mm, are checked regardless."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _tracked_or_skip(m=2048, n=1024, k=512, chunks=8):
    from graphopt.distributed import tracked_gemm
    reason = tracked_gemm.support(m, n, k, torch.bfloat16, chunks)
    if reason is not None:
        pytest.skip(f"tracked GEMM unavailable here: {reason}")


def _operands(m, n, k, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    a = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen) / k ** 0.5
    weight = torch.randn(n, k, device="cuda", dtype=dtype, generator=gen)
    return a, weight


def _close_to_mm(out, a, b):
    reference = torch.mm(a, b)
    if torch.equal(out, reference):
        return
    scale = reference.float().abs().max()
    assert ((out.float() - reference.float()).abs().max() / scale).item() < 1e-2


@pytest.mark.parametrize("batch", [True, False])
def test_stream_memory_operations_through_cuda_bindings(batch):
    """Writes and a wait enqueued through cuda-bindings land in order on the stream."""
    from graphopt.distributed import cuda_driver
    if not cuda_driver.stream_memops_available():
        pytest.skip("cuda-bindings (cuda.bindings.driver) is not installed")
    flags = torch.zeros(4, dtype=torch.int32, device="cuda")
    base, W, A = flags.data_ptr(), cuda_driver.MEMOP_WRITE_32, cuda_driver.MEMOP_WAIT_32
    stream = torch.cuda.current_stream()
    cuda_driver.stream_memops(stream, [(W, base, 5, True), (W, base + 4, 7, False),
                                       (A, base, 5, False), (W, base + 8, 9, False)], batch=batch)
    torch.cuda.synchronize()
    assert flags.tolist() == [5, 7, 9, 0]


def test_plain_cublaslt_through_the_bindings_matches_torch_mm():
    from graphopt.distributed import tracked_gemm
    if tracked_gemm.bindings_error():
        pytest.skip(tracked_gemm.bindings_error())
    for dtype in (torch.bfloat16, torch.float16):
        a, weight = _operands(1024, 768, 512, dtype)
        for b in (weight.t(), weight.t().contiguous()):     # x @ W.t() and dY @ W layouts
            out = torch.empty(a.shape[0], b.shape[1], device="cuda", dtype=dtype)
            tracked_gemm.matmul(a, b, out, None, 1, kind=None)
            _close_to_mm(out, a, b)


def test_tracked_mm_op_equals_torch_mm_with_or_without_counters():
    import graphopt.ops.tracked_matmul  # noqa: F401
    a, weight = _operands(2048, 1024, 512)
    _close_to_mm(torch.ops.graphopt.tracked_mm(a, weight.t(), 8), a, weight.t())


@pytest.mark.parametrize("layout", ["row_parallel_forward", "column_parallel_backward"])
def test_every_counter_reaches_its_final_value_and_the_product_matches(layout):
    from graphopt.distributed import tracked_gemm
    _tracked_or_skip()
    a, weight = _operands(2048, 1024, 512)
    b = weight.t() if layout == "row_parallel_forward" else weight.t().contiguous()
    out = torch.full((2048, 1024), float("nan"), device="cuda", dtype=torch.bfloat16)
    counters = torch.full((8,), tracked_gemm.COUNTER_PENDING, device="cuda", dtype=torch.int32)
    tracked_gemm.matmul(a, b, out, counters, 8)
    torch.cuda.synchronize()
    assert counters.tolist() == [tracked_gemm.COUNTER_READY] * 8
    _close_to_mm(out, a, b)


def test_a_consumer_never_reads_a_chunk_before_it_is_final():
    """A consumer on a second stream, launched first, copies chunk i as soon as counter i reads 0;
    the output starts as NaN, so a read before the GEMM wrote the chunk leaves NaN or a stale value
    in the copy. Random shapes and chunk counts, many iterations."""
    from graphopt.distributed import tracked_gemm
    from graphopt.kernels import counter_chunks
    _tracked_or_skip()
    gen = torch.Generator().manual_seed(7)
    side = torch.cuda.Stream()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    checked = 0
    for iteration in range(40):
        chunks = [4, 8, 16][int(torch.randint(3, (1,), generator=gen))]
        m = chunks * 128 * int(torch.randint(1, 5, (1,), generator=gen))
        n = 256 * int(torch.randint(1, 9, (1,), generator=gen))
        k = 256 * int(torch.randint(1, 9, (1,), generator=gen))
        a, weight = _operands(m, n, k, seed=iteration)
        if tracked_gemm.refusal(0, torch.bfloat16, tracked_gemm.Matrix.of(a),
                                tracked_gemm.Matrix.of(weight.t()), tracked_gemm.contiguous(m, n),
                                chunks) is not None:
            continue
        out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
        snapshot = torch.zeros_like(out)
        counters = torch.full((chunks,), tracked_gemm.COUNTER_PENDING, device="cuda", dtype=torch.int32)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            counter_chunks.copy_ready_chunks(counters, out, snapshot, chunks, ctas=4)
        tracked_gemm.matmul(a, weight.t(), out, counters, chunks, sm_count=sms - 4)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        assert torch.equal(snapshot, out), (iteration, m, n, k, chunks)
        checked += 1
    assert checked >= 20, f"only {checked} of 40 random shapes took the counters"


# --- tracked collectives on several GPUs -------------------------------------------------------------

def _tracked_collectives(rank: int, world: int) -> dict:
    import torch.distributed as dist
    from graphopt import _compat
    import graphopt.ops.matmul_collectives  # noqa: F401
    from graphopt.distributed import tracked_gemm
    ops = torch.ops.graphopt
    group = _compat.group_name(None)
    torch.manual_seed(rank)
    report = {"tracked": tracked_gemm.support(1024 * world, 768, 512, torch.bfloat16, 4 * world)}
    for step in range(3):   # workspaces, flags and counters are reused
        a = torch.randn(1024 * world, 512, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(768, 512, device="cuda", dtype=torch.bfloat16).t()
        full = a.float() @ b.float()
        dist.all_reduce(full)
        block = full.chunk(world)[rank]
        for name, out, ref in (
                ("ar_ctas", ops.matmul_all_reduce(a, b, None, group, "tracked", 4 * world, 8), full),
                ("ar_ce", ops.matmul_all_reduce(a, b, None, group, "tracked", 4 * world, 0), full),
                ("ar_two_shot", ops.matmul_all_reduce(a, b, None, group, "tracked_two_shot", 4 * world, 8),
                 full),
                ("rs_ctas", ops.matmul_reduce_scatter(a, b, group, world, 0, "tracked", 4 * world, 8),
                 block),
                ("rs_ce", ops.matmul_reduce_scatter(a, b, group, world, 0, "tracked", 4 * world, 0),
                 block)):
            report[f"{name}_{step}"] = ((out.float() - ref).abs().max() / ref.abs().max()).item()
            if ref is full:
                copies = [torch.empty_like(out) for _ in range(world)]
                dist.all_gather(copies, out)
                report[f"bitwise_{name}_{step}"] = all(torch.equal(copies[0], c) for c in copies)
        shard = torch.randn(512, 512, device="cuda", dtype=torch.bfloat16)
        gathered, product = ops.all_gather_matmul(shard, b, group, world, 0, 4, "tracked")
        every = [torch.empty_like(shard) for _ in range(world)]
        dist.all_gather(every, shard)
        report[f"ag_gathered_{step}"] = bool(torch.equal(gathered, torch.cat(every)))
        ref = torch.cat(every).float() @ b.float()
        report[f"ag_product_{step}"] = ((product.float() - ref).abs().max() / ref.abs().max()).item()
    return report


@pytest.mark.multigpu
@pytest.mark.parametrize("world", [2, 4])
def test_tracked_collectives_match_reference_and_agree_bitwise(world):
    from graphopt.distributed.launch import spawn
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA devices")
    for report in spawn(_tracked_collectives, world, backend="nccl"):
        report.pop("tracked")      # None: the tracked runtime ran; else the fallback did
        for key, value in report.items():
            if key.startswith(("bitwise", "ag_gathered")):
                assert value, key
            else:
                assert value < 2e-2, (key, value)
