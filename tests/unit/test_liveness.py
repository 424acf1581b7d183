"""Liveness simulation: bytes live over a schedule, views, pins, and the partitioned graphs."""

import torch

from graphopt.analysis.liveness import SavedTensor, Step, partitioned_timeline, simulate


def test_chain_frees_each_tensor_after_its_last_reader():
    steps = [Step("a", 100, "a", ()), Step("b", 10, "b", ("a",)), Step("c", 1, "c", ("b",))]
    timeline = simulate(steps)
    # a alone; a + b while b reads a; then a is freed: b + c
    assert timeline.live_bytes == [100, 110, 11]
    assert timeline.peak == 110 and timeline.peak_label == "b"


def test_view_adds_no_bytes_and_keeps_its_base_alive():
    steps = [Step("a", 100, "a", ()), Step("v", 0, "a", ("a",)), Step("x", 5, "x", ()),
             Step("y", 1, "y", ("v",))]
    timeline = simulate(steps)
    # x is never read, so it is gone before y; a stays (v reads it later)
    assert timeline.live_bytes == [100, 100, 105, 101]


def test_pinned_storage_survives_to_the_end_and_preloaded_is_counted():
    steps = [Step("a", 100, "a", ()), Step("b", 10, "b", ("a", "pre")), Step("c", 1, "c", ("b",))]
    timeline = simulate(steps, pinned={"a"}, preloaded={"pre": 50})
    assert timeline.live_bytes == [150, 160, 111]


def test_saved_tensor_fields():
    saved = SavedTensor("mm", 1024, (16, 16), torch.float32, 3, 7, 1e-3, 2e-3, None)
    assert saved.recompute_time_s is None and saved.nbytes == 1024


def test_partitioned_timeline_counts_saved_tensors_until_their_backward_use():
    from torch._functorch.aot_autograd import aot_function
    from torch._functorch.partitioners import default_partition

    graphs = {}

    def partition(joint, inputs, **kwargs):
        fw, bw = default_partition(joint, inputs, **kwargs)
        graphs.update(fw=fw, bw=bw, n=kwargs["num_fwd_outputs"])
        return fw, bw

    def nop(gm, _):
        return gm

    f = aot_function(lambda x, w: (x @ w).relu().sum(), fw_compiler=nop, bw_compiler=nop,
                     partition_fn=partition)
    x = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(32, 128, requires_grad=True)
    f(x, w).backward()
    timeline = partitioned_timeline(graphs["fw"], graphs["bw"], graphs["n"])
    held = partitioned_timeline(graphs["fw"], graphs["bw"], graphs["n"], hold_backward_inputs=True)
    act = 64 * 128 * 4
    # held saved tensors never leave before the end, so the held timeline is never below
    assert all(h >= t for h, t in zip(held.live_bytes, timeline.live_bytes))
    assert held.live_bytes[-1] >= timeline.live_bytes[-1] + act
    # forward holds mm and relu at once; the peak is at least the relu output saved plus grads
    assert timeline.boundary < len(timeline.labels)
    assert timeline.peak >= act + 32 * 128 * 4
    assert timeline.live_bytes[timeline.boundary - 1] >= act  # saved activations live at the boundary


def test_multi_output_op_allocates_every_output_when_it_runs():
    steps = [Step("op", 0, "op", (), outputs=(100, 10, 1)),
             Step("g0", 0, "op#0", ("op",)), Step("g2", 0, "op#2", ("op",)),
             Step("use", 5, "use", ("g0",))]
    timeline = simulate(steps, pinned={"g2"})
    # all three outputs exist after the op; op#1 has no reader and goes at once; op#0 lives
    # until "use" reads g0; g2 is pinned
    assert timeline.live_bytes == [111, 101, 101, 106]


def test_workspace_is_live_only_during_its_step():
    steps = [Step("a", 100, "a", ()), Step("b", 10, "b", ("a",), workspace=1000), Step("c", 1, "c", ("b",))]
    assert simulate(steps).live_bytes == [100, 1110, 11]


def test_outputs_of_split_live_in_their_base():
    # split / unbind return views: no allocation of their own, the base lives while they do
    from torch.fx.experimental.proxy_tensor import make_fx

    from graphopt.analysis import liveness
    gm = make_fx(lambda x: [t + 1 for t in torch.ops.aten.split.Tensor(x * 2, 2)])(torch.randn(4, 8))
    steps = liveness._graph_steps(gm, "f:", {})
    mul = next(s for s in steps if s.key.startswith("f:mul"))
    split = next(s for s in steps if s.key.startswith("f:split"))
    items = [s for s in steps if s.key.startswith("f:getitem")]
    assert mul.nbytes == 4 * 8 * 4 and split.outputs == () and split.storage == mul.key
    assert len(items) == 2 and all(s.storage == mul.key and s.nbytes == 0 for s in items)
    timeline = simulate(steps)
    assert timeline.peak == mul.nbytes + 2 * 8 * 4  # the base (read through the views) and one sum


# --- Inductor's view of the schedule: pointwise chains computed inside their readers -------------

def _pw(key, nbytes, *inputs):
    return Step(key, nbytes, key, inputs, kind="pointwise")


def test_a_pointwise_chain_read_by_one_kernel_allocates_nothing():
    from graphopt.analysis.liveness import inline_pointwise

    steps = [Step("a", 100, "a", ()), _pw("b", 100, "a"), _pw("c", 100, "b"), Step("d", 10, "d", ("c",))]
    assert simulate(steps).live_bytes == [100, 200, 200, 110]
    fused = inline_pointwise(steps)
    # b lives inside c's kernel, which reads a; c is stored (a matmul reads it)
    assert [s.nbytes for s in fused] == [100, 0, 100, 10]
    assert "a" in fused[2].inputs
    assert simulate(fused).live_bytes == [100, 100, 200, 110]


def test_several_readers_inline_a_cheap_value_and_store_one_that_reads_many_buffers():
    from graphopt.analysis.liveness import REUSE_READS, inline_pointwise

    cheap = [Step("a", 100, "a", ()), _pw("b", 100, "a"), _pw("c", 100, "b"), _pw("d", 100, "b"),
             Step("e", 1, "e", ("c", "d"))]
    assert [s.nbytes for s in inline_pointwise(cheap)][:2] == [100, 0]
    sources = [Step(f"s{i}", 10, f"s{i}", ()) for i in range(REUSE_READS + 1)]
    wide = [*sources, _pw("b", 100, *[s.key for s in sources]), _pw("c", 100, "b"), _pw("d", 100, "b"),
            Step("e", 1, "e", ("c", "d"))]
    assert inline_pointwise(wide)[len(sources)].nbytes == 100  # Inductor stores it for its readers


def test_kept_values_values_read_by_other_kernels_and_saved_values_are_stored():
    from graphopt.analysis.liveness import inline_pointwise

    steps = [Step("a", 100, "a", ()), _pw("b", 100, "a"), _pw("c", 100, "b")]
    assert inline_pointwise(steps, pinned={"b"})[1].nbytes == 100
    to_matmul = [Step("a", 100, "a", ()), _pw("b", 100, "a"), Step("m", 10, "m", ("b",))]
    assert inline_pointwise(to_matmul)[1].nbytes == 100
    # b is made in forward (before the boundary) and read in backward: a saved tensor
    saved = [Step("a", 100, "a", ()), _pw("b", 100, "a"), _pw("c", 100, "b")]
    assert inline_pointwise(saved, boundary=2)[1].nbytes == 100
    # through a view: the reader of the view reads b's inputs
    viewed = [Step("a", 100, "a", ()), _pw("b", 100, "a"), Step("v", 0, "b", ("b",)), _pw("c", 100, "v")]
    fused = inline_pointwise(viewed)
    assert fused[1].nbytes == 0 and "a" in fused[3].inputs


def test_sibling_kernels_that_share_a_read_run_together_where_the_last_can():
    """p1 and p2 read x and are one kernel; p2 also needs y, so the kernel runs after y and the
    matmul reading p1 waits for it: both outputs are live at once (a SiLU backward's shape)."""
    from graphopt.analysis.liveness import inline_pointwise

    steps = [Step("x", 100, "x", ()), _pw("p1", 100, "x"), Step("m1", 10, "m1", ("p1",)),
             Step("y", 100, "y", ()), _pw("p2", 100, "x", "y"), Step("m2", 10, "m2", ("p2",))]
    assert simulate(steps).peak == 300
    fused = inline_pointwise(steps)
    assert [s.key for s in fused] == ["x", "y", "p1", "p2", "m1", "m2"]
    assert simulate(fused).peak == 400
    # a sibling that depends on the other is a later kernel: nothing moves
    chained = [Step("x", 100, "x", ()), _pw("p1", 100, "x"), Step("m1", 100, "m1", ("p1",)),
               _pw("p2", 100, "x", "m1")]
    assert [s.key for s in inline_pointwise(chained)] == ["x", "p1", "m1", "p2"]


def test_a_scatter_writes_into_its_first_input_when_that_dies_there():
    """index_put into a zeros buffer (an embedding's gradient): Inductor writes the copy it
    scatters into in the input's own buffer when nothing reads the input later."""
    from graphopt.analysis.liveness import inline_pointwise

    def steps(zeros_bytes=100, later=()):
        return [Step("z", zeros_bytes, "z", ()), Step("v", 10, "v", ()),
                Step("p", 100, "p", ("z", "v"), kind="scatter"), Step("c", 50, "c", ("p",)),
                *[Step(f"r{i}", 1, f"r{i}", (name,)) for i, name in enumerate(later)]]

    written = inline_pointwise(steps(), pinned={"c"})
    assert written[2].storage == "z"
    assert simulate(written, pinned={"c"}).live_bytes[:4] == [100, 110, 110, 150]
    assert simulate(steps(), pinned={"c"}).peak == 210  # as eager code runs it
    # the input is read later, kept, or of another size: a buffer of its own
    assert inline_pointwise(steps(later=("z",)), pinned={"c"})[2].storage == "p"
    assert inline_pointwise(steps(), pinned={"c", "z"})[2].storage == "p"
    assert inline_pointwise(steps(zeros_bytes=200), pinned={"c"})[2].storage == "p"


def test_fusion_kind_of_aten_ops():
    from torch.fx.experimental.proxy_tensor import make_fx

    from graphopt.analysis.op_facts import fusion_kind

    def f(x, w, i):
        y = (x @ w).sigmoid()
        return y.sum(-1), y.view(-1), y.to(torch.float16), torch.zeros_like(w).index_put((i,), y, True)

    gm = make_fx(f, tracing_mode="fake")(torch.randn(4, 8), torch.randn(8, 8), torch.arange(4))
    kinds = {str(n.target): fusion_kind(n) for n in gm.graph.nodes if n.op == "call_function"}
    assert kinds == {"aten.mm.default": "", "aten.sigmoid.default": "pointwise",
                     "aten.sum.dim_IntList": "reduction", "aten.view.default": "",
                     "aten._to_copy.default": "pointwise", "aten.zeros_like.default": "",
                     "aten.index_put.default": "scatter"}
