"""op_facts: the one table of what graphopt knows about an op, checked op by op."""

import operator

import torch
import torch.fx as fx

from graphopt.analysis import cost_model, op_facts
from graphopt.ops import matmul_collectives  # noqa: F401  registers graphopt::matmul_all_reduce

aten = torch.ops.aten


def _nodes():
    """One node per kind of op, in a graph of fake values."""
    import torch.distributed._functional_collectives  # noqa: F401  registers _c10d_functional
    graph = fx.Graph()
    x = graph.placeholder("x")
    w = graph.placeholder("w")
    nodes = {
        "mm": graph.call_function(aten.mm.default, (x, w)),
        "relu": graph.call_function(aten.relu.default, (x,)),
        "sum": graph.call_function(aten.sum.dim_IntList, (x, [1])),
        "softmax": graph.call_function(aten._softmax.default, (x, 1, False)),
        "view": graph.call_function(aten.view.default, (x, [-1])),
        "dropout": graph.call_function(aten.native_dropout.default, (x, 0.5, True)),
        "add_": graph.call_function(aten.add_.Tensor, (x, x)),
        "all_reduce": graph.call_function(torch.ops._c10d_functional.all_reduce.default, (x, "sum", "0")),
        "fused": graph.call_function(torch.ops.graphopt.matmul_all_reduce.default,
                                     (x, w, None, "0", "chunked", 2, 0)),
        "attention": graph.call_function(aten._scaled_dot_product_flash_attention_for_cpu.default,
                                         (x, x, x)),
        "index_put": graph.call_function(aten.index_put.default, (x, [w], x)),
    }
    nodes["mask"] = graph.call_function(operator.getitem, (nodes["dropout"], 1))
    nodes["out"] = graph.call_function(operator.getitem, (nodes["attention"], 0))
    for node in graph.nodes:
        node.meta["val"] = torch.empty(4, 4)
    return nodes


def test_what_may_be_recomputed_and_why_not():
    nodes = _nodes()
    assert {n for n, node in nodes.items() if op_facts.recomputable(node)} == {
        "mm", "relu", "sum", "softmax", "view", "index_put"}
    reasons = {n: op_facts.why_never_recompute(node) for n, node in nodes.items()}
    assert reasons["all_reduce"] == "_c10d_functional:: op: it communicates or keeps state"
    assert reasons["fused"] == "graphopt:: op: it communicates or keeps state"
    assert reasons["attention"] == reasons["out"] == "attention (its output and LSE are kept)"
    assert reasons["dropout"] == reasons["mask"] == "random"
    assert reasons["add_"] == "mutates its inputs"


def test_each_fact_of_each_op():
    nodes = _nodes()
    facts = {name: (op_facts.communicates(n), op_facts.is_random(n), op_facts.is_view(n),
                    op_facts.is_in_place(n), op_facts.is_attention(n)) for name, n in nodes.items()}
    assert facts["all_reduce"] == (True, False, False, False, False)
    assert facts["fused"] == (True, False, False, False, False)
    assert facts["dropout"] == (False, True, False, False, False)
    assert facts["view"] == (False, False, True, False, False)
    assert facts["add_"] == (False, False, False, True, False)
    assert facts["attention"] == (False, True, False, False, True)  # dropout: tagged random
    categories = {name: op_facts.cost_category(n) for name, n in nodes.items()}
    assert categories == {"mm": "gemm", "relu": "cheap", "sum": "cheap", "softmax": "memory",
                          "view": "view", "dropout": "memory", "add_": "cheap",
                          "all_reduce": "memory", "fused": "memory", "attention": "attention",
                          "index_put": "memory", "mask": "cheap", "out": "cheap"}
    assert not op_facts.launches_kernel(nodes["view"]) and not op_facts.launches_kernel(nodes["out"])
    assert op_facts.launches_kernel(nodes["relu"])
    kinds = {name: op_facts.fusion_kind(n) for name, n in nodes.items()}
    assert (kinds["relu"], kinds["sum"], kinds["index_put"], kinds["mm"], kinds["view"]) == (
        "pointwise", "reduction", "scatter", "", "")


def test_every_gemm_has_a_flop_formula():
    assert set(cost_model.FLOP_FORMULAS) == op_facts.GEMMS


def test_val_reads_the_fake_value_dynamo_or_aten():
    graph = fx.Graph()
    aten_node, dynamo_node = graph.placeholder("a"), graph.placeholder("b")
    aten_node.meta["val"] = value = torch.empty(2)
    dynamo_node.meta["example_value"] = example = torch.empty(3)
    assert op_facts.val(aten_node) is value and op_facts.val(dynamo_node) is example
    assert op_facts.val(3) == 3 and op_facts.val(graph.placeholder("c")) is None
