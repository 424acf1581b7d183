"""Cost model: FLOPs and bytes per aten op, symbolic shapes, roofline time; calibrate."""

import json

import sympy
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from graphopt.analysis import cost_model, op_facts
from graphopt.analysis.device_profile import H200, load_profile


def _nodes(fn, *args, mode="fake"):
    gm = make_fx(fn, tracing_mode=mode)(*args)
    return gm, {str(n.target): n for n in gm.graph.nodes if n.op == "call_function"}


def test_matmul_flops_and_bytes():
    _, nodes = _nodes(lambda a, b: torch.mm(a, b), torch.randn(64, 32), torch.randn(32, 16))
    flops, moved = cost_model.op_cost(nodes["aten.mm.default"]).evaluate()
    assert flops == 2 * 64 * 32 * 16
    assert moved == 4 * (64 * 32 + 32 * 16 + 64 * 16)


def test_bmm_and_addmm_flops():
    _, nodes = _nodes(lambda a, b: torch.bmm(a, b), torch.randn(3, 8, 4), torch.randn(3, 4, 5))
    assert cost_model.op_cost(nodes["aten.bmm.default"]).evaluate()[0] == 2 * 3 * 8 * 4 * 5
    _, nodes = _nodes(lambda c, a, b: torch.addmm(c, a, b), torch.randn(5), torch.randn(8, 4),
                      torch.randn(4, 5))
    assert cost_model.op_cost(nodes["aten.addmm.default"]).evaluate()[0] == 2 * 8 * 4 * 5 + 8 * 5


def test_symbolic_shapes_give_sympy_expressions_evaluated_with_hints():
    gm, nodes = _nodes(lambda a, b: torch.mm(a, b).relu(), torch.randn(48, 32), torch.randn(32, 24),
                       mode="symbolic")
    node = nodes["aten.mm.default"]
    cost = cost_model.op_cost(node)
    assert cost.flops.free_symbols, "symbolic sizes must stay symbols"
    hints = cost_model.hints_for(cost.flops, node.meta["val"])
    assert cost_model.evaluate(cost.flops, hints) == 2 * 48 * 32 * 24
    assert cost_model.tensor_nbytes(node.meta["val"]) == 48 * 24 * 4


def test_roofline_compute_bound_gemm_and_memory_bound_pointwise():
    _, nodes = _nodes(lambda a, b: (a @ b).relu(), torch.randn(4096, 4096, dtype=torch.bfloat16),
                      torch.randn(4096, 4096, dtype=torch.bfloat16))
    mm_time = cost_model.node_time(nodes["aten.mm.default"], H200)
    relu_time = cost_model.node_time(nodes["aten.relu.default"], H200)
    assert abs(mm_time - H200.kernel_launch_s - 2 * 4096**3 / (H200.matmul_tflops * 1e12)) < 1e-9
    assert abs(relu_time - H200.kernel_launch_s - 2 * 4096**2 * 2 / (H200.hbm_gbps * 1e9)) < 1e-9


def test_views_cost_nothing_and_are_recognised():
    _, nodes = _nodes(lambda a: a.view(-1) * 2 + a.t().sum(), torch.randn(4, 4))
    view = nodes["aten.view.default"]
    assert op_facts.is_view(view) and op_facts.is_view(nodes["aten.t.default"])
    assert cost_model.op_cost(view).evaluate() == (0.0, 0.0)
    assert not op_facts.is_view(nodes["aten.mul.Tensor"])


def test_attention_is_recognised_with_causal_flops():
    q = torch.randn(1, 2, 128, 16)
    _, nodes = _nodes(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True), q, q, q)
    attention = [n for n in nodes.values() if op_facts.is_attention(n)]
    assert attention, f"no attention op among {list(nodes)}"
    flops, _ = cost_model.op_cost(attention[0]).evaluate()
    assert flops == 4 * 2 * 128 * 128 * 16 / 2


def test_to_sympy_and_nbytes_of_tuples():
    assert cost_model.to_sympy(3) == sympy.Integer(3)
    assert cost_model.tensor_nbytes((torch.empty(2, 3), torch.empty(4, dtype=torch.float16))) == 24 + 8


def test_calibrate_writes_a_loadable_profile(tmp_path, capsys):
    from graphopt.measure.calibrate import main
    out = tmp_path / "profile.json"
    assert main(["--quick", "--out", str(out)]) == 0
    profile = load_profile(str(out))
    assert profile.matmul_tflops > 0 and profile.hbm_gbps > 0
    assert json.loads(out.read_text())["name"].startswith("cpu")
    assert "matmul_tflops" in capsys.readouterr().out


def _fake_cuda_graph(fn, *shapes_and_dtypes):
    """``fn`` traced on fake CUDA tensors (no GPU needed): the graph's call_function nodes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        args = [torch.empty(shape, dtype=dtype, device="cuda") if dtype.is_floating_point
                else torch.zeros(shape, dtype=dtype, device="cuda") for shape, dtype in shapes_and_dtypes]
        gm = make_fx(fn)(*args)
    return [n for n in gm.graph.nodes if n.op == "call_function"]


def _flash_backward(q, k):
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, k, 0.0, True)
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        out[0], q, k, k, out[0], out[1], out[2], out[3], q.shape[2], k.shape[2], 0.0, True, out[6], out[7])


def test_flash_backward_workspace_is_its_fp32_dq_accumulator():
    batch, heads, seq, head_dim = 2, 8, 1000, 128
    nodes = _fake_cuda_graph(_flash_backward, ((batch, heads, seq, head_dim), torch.bfloat16),
                             ((batch, heads, seq, head_dim), torch.bfloat16))
    forward, backward = [n for n in nodes if "flash_attention" in str(n.target)]
    assert cost_model.workspace_bytes(forward) == 0
    rounded = 1024  # the sequence to a multiple of 128
    assert cost_model.workspace_bytes(backward) == 4 * batch * rounded * heads * head_dim + 4 * batch * heads * rounded


def test_flash_backward_workspace_with_grouped_keys_adds_expanded_dk_dv():
    nodes = _fake_cuda_graph(_flash_backward, ((1, 8, 256, 64), torch.bfloat16), ((1, 2, 256, 64), torch.bfloat16))
    backward = [n for n in nodes if "backward" in str(n.target)][0]
    dq = 4 * 256 * 8 * 64 + 4 * 8 * 256
    assert cost_model.workspace_bytes(backward) == dq + 2 * 256 * 8 * 64 * 2


def test_embedding_backward_workspace_only_for_many_indices_on_cuda():
    def embedding_backward(grad, indices):
        return torch.ops.aten.embedding_dense_backward(grad, indices, 1000, -1, False)

    many, = _fake_cuda_graph(embedding_backward, ((8192, 64), torch.bfloat16), ((8192,), torch.int64))
    few, = _fake_cuda_graph(embedding_backward, ((100, 64), torch.bfloat16), ((100,), torch.int64))
    assert cost_model.workspace_bytes(many) == 8192 * 64 * 4 + 6 * 8192 * 8
    assert cost_model.workspace_bytes(few) == 0
    cpu = make_fx(embedding_backward)(torch.randn(8192, 64), torch.zeros(8192, dtype=torch.int64))
    assert not [n for n in cpu.graph.nodes if cost_model.workspace_bytes(n)]


def test_cudnn_backward_workspace_is_estimated_like_an_fp32_dq_accumulator():
    def cudnn_backward(q):
        out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, q, q, None, False, 0.0, True)
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            out[0], q, q, q, out[0], out[1], out[6], out[7], None, out[2], out[3], q.shape[2], q.shape[2],
            0.0, True)

    backward = [n for n in _fake_cuda_graph(cudnn_backward, ((1, 4, 512, 64), torch.bfloat16))
                if "backward" in str(n.target)][0]
    assert cost_model.workspace_bytes(backward) == 4 * 4 * 512 * 64 + 4 * 4 * 512
