"""The planned order: Inductor's fused kernels listed ready-first by their first member's place in
the graph, so nothing is pulled ahead of where the planner's simulation has it."""

import dataclasses

from hypothesis import given, settings, strategies as st

from graphopt.backends.planned_order import PlannedOrder, graph_order


@dataclasses.dataclass(eq=False)
class Dep:
    name: str


@dataclasses.dataclass(eq=False)
class Kernel:
    """What the pass reads of an Inductor scheduler node."""
    name: str
    min_order: int
    max_order: int
    reads: tuple[str, ...] = ()

    @property
    def unmet_dependencies(self):
        return [Dep(name) for name in self.reads]

    def get_buffer_names(self):
        return [self.name]

    def get_name(self):
        return self.name


def _names(nodes):
    return [n.name for n in nodes]


def _depth_first(nodes):
    """Inductor's sort after fusion: nodes by first member, each after what it reads."""
    by_name, seen, out = {n.name: n for n in nodes}, set(), []

    def visit(node):
        if node.name in seen:
            return
        seen.add(node.name)
        for name in sorted(node.reads):
            if name in by_name:
                visit(by_name[name])
        out.append(node)

    for node in sorted(nodes, key=lambda n: n.min_order):
        visit(node)
    return out


def _layer_backward():
    """One layer's backward as the planner lays it out: the MLP's RMSNorm weight gradient (0),
    three MLP weight-gradient matmuls (1-3), the attention backward (4-5), the attention norm's
    weight gradient (6). Inductor fuses the two norm gradients, which read the same residual."""
    return [
        Kernel("norm_wgrads", 0, 6, reads=("residual", "grad_attn")),
        Kernel("residual", -1, -1),
        Kernel("wgrad_gate", 1, 1, reads=("residual",)),
        Kernel("wgrad_up", 2, 2, reads=("residual",)),
        Kernel("wgrad_down", 3, 3, reads=("residual",)),
        Kernel("attn_bwd", 4, 4, reads=("residual",)),
        Kernel("grad_attn", 5, 5, reads=("attn_bwd",)),
    ]


def test_a_fused_kernel_no_longer_pulls_what_it_reads_ahead():
    inductor = _depth_first(_layer_backward())
    assert _names(inductor) == ["residual", "attn_bwd", "grad_attn", "norm_wgrads", "wgrad_gate",
                                "wgrad_up", "wgrad_down"]
    assert _names(graph_order(inductor)) == ["residual", "wgrad_gate", "wgrad_up", "wgrad_down",
                                             "attn_bwd", "grad_attn", "norm_wgrads"]


def test_a_list_in_graph_order_is_unchanged():
    nodes = [Kernel(f"k{i}", i, i, reads=(f"k{i - 1}",) if i else ()) for i in range(6)]
    assert graph_order(nodes) == nodes


def test_unorderable_lists_come_back_as_none():
    cycle = [Kernel("a", 0, 0, reads=("b",)), Kernel("b", 1, 1, reads=("a",))]
    assert graph_order(cycle) is None
    no_order = [Kernel("a", 0, 0), Kernel("b", 1, 1)]
    no_order[1].min_order = None
    assert graph_order(no_order) is None
    recorded = []
    assert PlannedOrder("g", recorded.append)(cycle) is cycle
    assert recorded == []


def test_the_pass_records_what_it_moved():
    recorded = []
    order = PlannedOrder("g", recorded.append)(_depth_first(_layer_backward()))
    assert _names(order)[-1] == "norm_wgrads"
    assert recorded == [{"kernels": 7, "moved": 6, "spanning_kernels": 1}]


@st.composite
def dags(draw):
    """Random kernel DAGs: a kernel reads earlier ones; some are fused spans (max > min)."""
    count = draw(st.integers(1, 14))
    nodes = []
    for i in range(count):
        reads = draw(st.sets(st.integers(0, i - 1), max_size=3)) if i else set()
        span = draw(st.integers(0, 3))
        nodes.append(Kernel(f"k{i}", i, i + span, reads=tuple(f"k{j}" for j in sorted(reads))))
    return nodes


@settings(max_examples=150, deadline=None)
@given(dags())
def test_the_order_is_topological_and_ready_first(nodes):
    order = graph_order(_depth_first(nodes))
    assert sorted(_names(order)) == sorted(_names(nodes))
    place = {n.name: i for i, n in enumerate(order)}
    for node in nodes:
        assert all(place[r] < place[node.name] for r in node.reads)
    # ready-first: no kernel runs while one with a smaller min_order was ready
    done = set()
    for node in order:
        ready = [n for n in nodes if n.name not in done and set(n.reads) <= done]
        assert node.min_order == min(n.min_order for n in ready)
        done.add(node.name)
