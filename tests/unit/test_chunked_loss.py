"""chunked_output_loss / Llama.loss(chunks=N): the cross entropy of llama_loss, chunk by chunk."""

import pytest
import torch

import graphopt
from graphopt.models.llama import Llama, LlamaConfig, chunked_output_loss, llama_loss


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return Llama(LlamaConfig.tiny()).to(dtype)


def _inputs(cfg, batch=2, seq=40, ignored=5):
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq))
    targets = torch.randint(0, cfg.vocab_size, (batch, seq))
    targets[0, :ignored] = -100  # cross_entropy's default ignore_index: not counted in the mean
    return tokens, targets


def _step(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def _assert_same(got, want, **tolerance):
    torch.testing.assert_close(got[0], want[0], **tolerance)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, **tolerance)


@pytest.mark.parametrize("chunks", [1, 3, 7, 80])
def test_loss_and_gradients_equal_cross_entropy_in_fp32(chunks):
    model = _model()
    tokens, targets = _inputs(model.cfg)
    want = _step(model, lambda: llama_loss(model(tokens), targets))
    got = _step(model, lambda: model.loss(tokens, targets, chunks=chunks))
    _assert_same(got, want)


def test_bf16_within_bf16_rounding_of_the_reference():
    model = _model(torch.bfloat16)
    tokens, targets = _inputs(model.cfg, seq=64)
    want = _step(model, lambda: llama_loss(model(tokens), targets))
    got = _step(model, lambda: model.loss(tokens, targets, chunks=4))
    _assert_same(got, want, rtol=2e-2, atol=2e-3)


def test_default_loss_is_llama_loss_of_the_logits():
    model = _model()
    tokens, targets = _inputs(model.cfg)
    torch.testing.assert_close(model.loss(tokens, targets), llama_loss(model(tokens), targets),
                               rtol=0, atol=0)


def test_incoming_gradient_scales_both_gradients():
    torch.manual_seed(1)
    hidden = torch.randn(12, 8, requires_grad=True)
    weight = torch.randn(20, 8, requires_grad=True)
    targets = torch.randint(0, 20, (12,))
    (3.0 * chunked_output_loss(hidden, weight, targets, chunks=5)).backward()
    reference_hidden = hidden.detach().clone().requires_grad_()
    reference_weight = weight.detach().clone().requires_grad_()
    (3.0 * torch.nn.functional.cross_entropy(reference_hidden @ reference_weight.t(), targets)).backward()
    torch.testing.assert_close(hidden.grad, reference_hidden.grad)
    torch.testing.assert_close(weight.grad, reference_weight.grad)


@pytest.mark.parametrize("backend", ["aot_eager", "graphopt"])
def test_compiles_in_one_graph_with_the_same_numerics(backend):
    model = _model()
    tokens, targets = _inputs(model.cfg)
    want = _step(model, lambda: llama_loss(model(tokens), targets))
    if backend == "graphopt":
        backend = graphopt.backend(codegen="eager", memory_budget=0.5)
    torch._dynamo.reset()
    compiled = torch.compile(lambda: model.loss(tokens, targets, chunks=4), backend=backend, fullgraph=True)
    _step(model, compiled)
    _assert_same(_step(model, compiled), want)


def _largest_value(fn) -> int:
    """Elements of the largest tensor any node of the compiled forward or backward graph makes."""
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(gm, _inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)().backward()
    return max(n.meta["val"].numel() for gm in graphs for n in gm.graph.nodes
               if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor))


def test_no_graph_value_holds_the_logits_of_all_tokens():
    """The point of chunking: no [tokens, vocab] value in forward or backward, only per-chunk ones
    (the vocabulary is the largest size here, so any such value is the largest in the graphs)."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig.tiny(vocab_size=1000))
    tokens, targets = _inputs(model.cfg, batch=1, seq=96, ignored=0)
    whole = 96 * model.cfg.vocab_size
    assert _largest_value(lambda: model.loss(tokens, targets)) >= whole  # the check can fail
    assert _largest_value(lambda: model.loss(tokens, targets, chunks=4)) < whole


def test_bad_chunks_and_shapes_say_how_to_fix():
    hidden, weight = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="positive number"):
        chunked_output_loss(hidden, weight, torch.zeros(4, dtype=torch.long), chunks=0)
    with pytest.raises(ValueError, match="leading sizes"):
        chunked_output_loss(hidden, weight, torch.zeros(5, dtype=torch.long), chunks=2)


def test_no_chunk_waits_for_the_count_of_all_targets():
    """Each piece's gradient matmuls must not read the count of counted targets (a reduction over
    all of them): Inductor fused that count with the final loss sum, so every piece's gradient
    waited for the last piece and all pieces' [chunk, vocab] buffers were live at once."""
    from torch._dynamo.backends.common import aot_autograd

    torch.manual_seed(0)
    hidden = torch.randn(32, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    targets = torch.randint(0, 50, (32,))
    graphs = []

    def keep(gm, _inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(lambda: chunked_output_loss(hidden, weight, targets, chunks=4),
                  backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)().backward()
    forward = graphs[0].graph
    counts = [n for n in forward.nodes if n.op == "call_function" and n.target == torch.ops.aten.sum.default
              and n.args[0].meta["val"].numel() == targets.numel()]
    assert counts, "the check can fail: the count over all targets is in the forward graph"
    downstream, stack = set(), list(counts)
    while stack:
        node = stack.pop()
        if node not in downstream:
            downstream.add(node)
            stack.extend(node.users)
    matmuls = [n for n in forward.nodes if n.target in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)]
    assert len(matmuls) >= 12  # 4 pieces: logits, gradient of the piece, gradient of the weight
    assert not [n.name for n in matmuls if n in downstream]
