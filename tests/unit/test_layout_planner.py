"""The layout planner (graphopt/planning): tracing and symbolic scaling, enumeration and its
topology rules, the memory filter, predictions' parts, the explanation, determinism and the CLI."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from graphopt.analysis.device_profile import H100
from graphopt.models.llama import Llama, LlamaConfig
from graphopt.planning import Layout, MemoryPlan, World, plan, trace_model
from graphopt.planning.layouts import SearchSpace, enumerate_layouts
from graphopt.planning.model_facts import TRACE_SEQ, TraceError
from graphopt.planning.planner import NoLayoutFitsError
from graphopt.planning.predict import Predictor

GIB = 2**30


def _llama(**overrides) -> Llama:
    cfg = LlamaConfig.tiny(n_layers=2, dim=128, n_heads=16, n_kv_heads=8, ffn_dim=256,
                           vocab_size=256, max_seq_len=8192, **overrides)
    with torch.device("meta"):
        return Llama(cfg)


@pytest.fixture(scope="module")
def facts():
    return trace_model(_llama())


def _world(**overrides) -> World:
    values = dict(gpus_per_node=4, nodes=2, memory_per_gpu=80 * 10**9, profile=H100)
    values.update(overrides)
    return World(**values)


# --- tracing --------------------------------------------------------------------------------------

def test_block_trace_scales_with_batch_and_sequence(facts):
    traced = facts.block(1).traces.at(1, 1024)
    mm = next(n for n, c in traced.costs.items() if c.kind == "gemm")
    attention = next(n for n, c in traced.costs.items() if c.kind == "attention")
    gemm = traced.costs[mm].flops
    # GEMM FLOPs are linear in the tokens, attention's quadratic in the sequence
    assert traced.value(gemm, 2, 1024) == pytest.approx(2 * traced.value(gemm, 1, 1024))
    assert traced.value(gemm, 1, 2048) == pytest.approx(2 * traced.value(gemm, 1, 1024))
    flops = traced.costs[attention].flops
    assert traced.value(flops, 1, 2048) == pytest.approx(4 * traced.value(flops, 1, 1024))
    small, large = traced.at(1, 1024), traced.at(1, 4096)
    hidden = small.fw_outputs[0]
    assert large.logical_bytes[hidden] == 4 * small.logical_bytes[hidden] == 1024 * 128 * 4 * 4


def test_tensor_parallel_trace_holds_local_shards(facts):
    one, two = facts.block(1), facts.block(2)
    assert two.params < one.params
    # q, k, v, w1, w3 lose half their rows, wo and w2 half their columns; the norms stay
    norms = 2 * 128
    assert one.params - norms == 2 * (two.params - norms)
    assert two.sites.forward == ((128, 64), (128, 128))     # wo: 128 <- 64, w2: 128 <- 256 / 2
    assert two.sites.backward == (128, 128)                 # q/k/v input, w1/w3 input
    assert facts.tp_refusal(8) is None
    assert "heads do not split over 3 ranks" in facts.tp_refusal(3)


def test_head_trace_is_retraced_where_dynamo_guards_fail():
    """A loss that loops over token chunks specialises the trace to the toy length: the planner
    sees Dynamo's guard fail at the real size and traces there."""
    def chunked(model, tokens):
        return model.loss(tokens, tokens, chunks=max(tokens.shape[1] // 512, 1))

    facts = trace_model(_llama(), loss_fn=chunked)
    toy = facts.head(2, TRACE_SEQ)
    assert toy.invalid_at(1, 2048) is not None
    real = facts.head(1, 2048)
    assert real is not toy and real.invalid_at(1, 2048) is None
    gemms = [n for n, c in real.costs.items() if c.kind == "gemm"]
    covered = sum(real.value(real.costs[n].flops, 1, 2048) for n in gemms)
    # the output projection of every token, forward and both gradients: 3 x 2 x tokens x dim x vocab
    assert covered == pytest.approx(3 * 2 * 2048 * 128 * 256, rel=0.01)


def test_unknown_model_gets_tp_one_and_the_reason():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(32, 32)

        def forward(self, x):
            return torch.relu(self.lin(x)) + x

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(64, 32)
            self.blocks = torch.nn.ModuleList(Block() for _ in range(3))

        def forward(self, tokens):
            h = self.embed(tokens)
            for block in self.blocks:
                h = block(h)
            return h

    facts = trace_model(Net(), loss_fn=lambda model, tokens: model(tokens).float().pow(2).mean())
    assert facts.family.name == "generic" and facts.family.blocks_path == "blocks"
    assert "no known tensor-parallel plan" in facts.tp_refusal(2)
    layouts, refused = enumerate_layouts(facts, World(gpus_per_node=2), 256, 512,
                                         SearchSpace(min_tokens_per_sp_rank=64))
    assert {layout.tp for layout in layouts} == {1}
    assert any("no known tensor-parallel plan" in r.reason for r in refused)


def test_untraceable_model_raises_with_the_fix():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(8, 8)])

        def forward(self, tokens):
            return self.blocks[0](tokens.float().unsqueeze(-1).expand(-1, -1, 8)).sum()

    with pytest.raises(TraceError, match="graph break|loss_fn"):
        trace_model(Net(), loss_fn=lambda m, t: m(t) if t.sum().item() >= 0 else m(t)).head(2, 96)


# --- enumeration and topology -----------------------------------------------------------------------

def test_enumeration_rules(facts):
    world = _world()
    layouts, refused = enumerate_layouts(facts, world, 4096, 16 * 4096, SearchSpace(micro_batches=None))
    assert layouts == sorted(layouts, key=Layout.key)
    for layout in layouts:
        assert layout.world_size == 8
        assert layout.dp * layout.micro_batch * layout.grad_accum == 16
        assert 4096 % layout.sp == 0 and 4096 // layout.sp >= 1024
    assert {layout.tp for layout in layouts} == {1, 2, 4, 8}   # 8 spans both nodes, evenly
    assert {layout.sp for layout in layouts} == {1, 2, 4}      # sp = 8 leaves 512 tokens per rank
    assert any("512 tokens per rank" in r.reason for r in refused)
    # a global batch of 2 sequences does not split over 4 data-parallel ranks
    _, refused = enumerate_layouts(facts, world, 4096, 2 * 4096)
    assert any("do not split over 4 data-parallel ranks" in r.reason for r in refused)
    with pytest.raises(ValueError, match="multiple of 4096"):
        enumerate_layouts(facts, world, 4096, 5000)


def test_groups_are_placed_inside_nodes_first():
    world = _world()  # 2 nodes of 4
    assert not world.spans_nodes(4, 1) and world.spans_nodes(8, 1)        # tp groups: consecutive
    assert not world.spans_nodes(2, 2) and world.spans_nodes(2, 4)        # sp groups stride over tp
    assert world.link(4, 1).level == "nvlink" and world.link(2, 4).level == "network"
    assert world.link(2, 4).collective_gbps == world.inter_node_gbps
    assert World(gpus_per_node=6, nodes=2).placement_refusal(4, 1) is not None


def test_groups_spanning_nodes_never_get_intra_node_runtimes(facts):
    """A TP group across nodes is priced over the network with NCCL runtimes only, and the
    overlap pass refuses symmetric memory for such a group."""
    world = _world(gpus_per_node=2, nodes=2)
    predictor = Predictor(facts, world, 4096, 8 * 4096)
    inside = predictor.predict(Layout(2, 2, 1, 4, 1))
    across = predictor.predict(Layout(1, 4, 1, 8, 1))
    assert inside.exposed_by_link_s["network"] == 0 or inside.layout.fsdp > 1
    assert across.exposed_by_link_s["network"] >= across.parts_s["tp_comm"] > 0
    for modes in across.overlap.values():
        assert not any(m.startswith(("copy_engine", "tile")) for m in modes)


def test_overlap_pass_topology_rule(monkeypatch):
    from graphopt.distributed import topology

    monkeypatch.setenv("GRAPHOPT_GPUS_PER_NODE", "4")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert topology.gpus_per_node() == 4
    assert not topology.spans_nodes([0, 1, 2, 3]) and topology.spans_nodes([2, 4])
    monkeypatch.setenv("GRAPHOPT_GPUS_PER_NODE", "four")
    with pytest.raises(ValueError, match="GPUs per node"):
        topology.gpus_per_node()


# --- predictions and the memory filter ------------------------------------------------------------

def test_prediction_parts_add_up(facts):
    predictor = Predictor(facts, _world(), 4096, 16 * 4096)
    for layout in (Layout(8, 1, 1, 2, 1), Layout(2, 2, 2, 2, 4, MemoryPlan(0.5)),
                   Layout(1, 4, 2, 1, 16, MemoryPlan(None, True), "eager", False)):
        p = predictor.predict(layout)
        assert sum(p.parts_s.values()) == pytest.approx(p.step_s)
        assert sum(p.memory_bytes.values()) == p.peak_bytes
        assert 0 < p.mfu < 1
        assert p.tokens_per_s_per_gpu == pytest.approx(16 * 4096 / p.step_s / 8)


def test_parallelism_divides_the_work(facts):
    predictor = Predictor(facts, _world(nodes=1), 8192, 4 * 8192)
    data = predictor.predict(Layout(4, 1, 1, 1, 1))
    tensor = predictor.predict(Layout(1, 4, 1, 4, 1))
    sequence = predictor.predict(Layout(1, 1, 4, 4, 1))
    block = facts.block(1)
    run1 = predictor.block_run(block, 1, 8192, MemoryPlan(), "inductor", 1)
    run_sp = predictor.block_run(block, 1, 2048, MemoryPlan(), "inductor", 4)
    # each sequence-parallel rank does a quarter of the (balanced causal) attention of a sequence
    assert run_sp.attention_forward_s == pytest.approx(run1.attention_forward_s / 4, rel=0.05)
    assert tensor.parts_s["tp_comm"] > 0 and sequence.parts_s["sp_comm"] > 0
    assert data.parts_s["fsdp_comm"] > 0 and tensor.parts_s["fsdp_comm"] == 0
    assert tensor.memory_bytes["activations"] > sequence.memory_bytes["activations"]


def test_remat_trades_time_for_memory(facts):
    predictor = Predictor(facts, World(gpus_per_node=1), 8192, 8192)
    plans = [predictor.predict(Layout(1, 1, 1, 1, 1, memory)) for memory in
             (MemoryPlan(1.0), MemoryPlan(0.5), MemoryPlan(None, True))]
    min_cut, remat, offload = plans
    assert remat.memory_bytes["activations"] < min_cut.memory_bytes["activations"]
    assert remat.parts_s["recompute"] > min_cut.parts_s["recompute"]
    assert offload.memory_bytes["activations"] < min_cut.memory_bytes["activations"]
    eager = predictor.predict(Layout(1, 1, 1, 1, 1, codegen="eager"))
    assert eager.step_s > min_cut.step_s   # no fusion: every pointwise op is a kernel


def test_memory_filter_keeps_only_layouts_that_fit(facts):
    free = plan(facts, _world(nodes=1, gpus_per_node=1), seq_len=8192, global_batch_tokens=4 * 8192)
    peaks = sorted(p.peak_bytes for p in free.ranked)
    # a GPU between the lowest and highest peak: some layouts fit, the chosen one among them
    memory = (peaks[0] + peaks[-1]) // 2
    world = _world(nodes=1, gpus_per_node=1, memory_per_gpu=memory, memory_headroom=0.0)
    report = plan(facts, world, seq_len=8192, global_batch_tokens=4 * 8192)
    assert report.unfit and report.ranked
    assert all(p.peak_bytes <= memory for p in report.ranked)
    assert all(p.peak_bytes > memory for p in report.unfit)
    assert report.chosen.step_s == min(p.step_s for p in report.ranked)
    tiny = _world(nodes=1, gpus_per_node=1, memory_per_gpu=peaks[0] // 4)
    with pytest.raises(NoLayoutFitsError, match="lowest predicted peak"):
        plan(facts, tiny, seq_len=8192, global_batch_tokens=4 * 8192)


# --- the report --------------------------------------------------------------------------------------

def test_report_explains_and_is_deterministic(facts, tmp_path):
    world = _world()
    space = SearchSpace(tp_degrees=(1, 2))
    first = plan(facts, world, seq_len=4096, global_batch_tokens=16 * 4096, space=space,
                 dump_dir=str(tmp_path))
    again = plan(trace_model(_llama()), world, seq_len=4096, global_batch_tokens=16 * 4096, space=space)
    assert first.fingerprint() == again.fingerprint()
    assert [p.layout for p in first.ranked[:10]] == [p.layout for p in again.ranked[:10]]
    text = first.explain(5)
    assert "Why the alternatives lost" in text and " beats " in text
    choices = {entry["choice"] for entry in json.loads((tmp_path / "layout_plan.json").read_text())["why_not"]}
    assert {"tensor-parallel degree", "sequence-parallel degree", "memory plan"} <= choices
    flags = first.flags()
    assert flags["codegen"] == "inductor" and "memory_budget" in flags
    assert (tmp_path / "layout_plan.md").read_text().startswith("# Layout plan")


def test_cli_plan(tmp_path, capsys):
    from graphopt.__main__ import main

    config = dict(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=4,
                  num_hidden_layers=2, vocab_size=256)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    code = main(["plan", "--model", str(path), "--nodes", "1", "--gpus-per-node", "1", "--seq", "2048",
                 "--global-batch-tokens", "8192", "--dump-dir", str(tmp_path / "dump"), "--top-k", "3"])
    out = capsys.readouterr().out
    assert code == 0 and "Chosen:" in out and "hf-llama" in out
    report = json.loads((tmp_path / "dump" / "layout_plan.json").read_text())
    chosen = report["chosen"]["layout"]
    assert chosen["micro_batch"] * chosen["grad_accum"] == 4
    assert main(["plan", "--model", str(path), "--gpus-per-node", "1", "--seq", "2048",
                 "--global-batch-tokens", "8192", "--memory-gib", "0.001"]) == 1
    assert "no layout" in capsys.readouterr().err


def test_layout_json_round_trip():
    layout = Layout(2, 4, 2, 1, 8, MemoryPlan(None, True), "eager", False)
    assert Layout.from_json(json.loads(json.dumps(layout.to_json()))) == layout
    assert dataclasses.replace(layout, memory=MemoryPlan(0.5)).describe() == \
        "dp2 tp4 sp2 mb1x8 remat 0.5 eager no-reshard"
    with pytest.raises(ValueError, match="offload=True"):
        MemoryPlan(None)
