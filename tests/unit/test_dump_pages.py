"""The dump a person reads: the index names every stage and pass with the first reason a site was
left alone; a graph page opens with its summary, shows the plan and the overlap decisions as tables
(model source line, shape, decision, cost) and the memory picture, and keeps raw JSON behind a link.
Rendering reads every field with a default, so summaries from another graphopt version render."""

import re

import torch

import graphopt
from graphopt.debug import pages
from graphopt.models.llama import Llama, LlamaConfig, llama_loss


def _compile_llama(dump_dir, **flags):
    torch.manual_seed(0)
    model = Llama(LlamaConfig.tiny(n_layers=1))
    compiled = torch.compile(model, backend=graphopt.backend(codegen="eager", dump_dir=str(dump_dir),
                                                             **flags))
    tokens = torch.randint(0, 128, (2, 32))
    llama_loss(compiled(tokens), tokens).backward()
    (folder,) = [p for p in dump_dir.iterdir() if p.is_dir()]
    return folder


def _position(page: str, text: str) -> int:
    assert text in page, text
    return page.index(text)


def test_graph_page_reads_top_down_summary_plan_picture_then_diffs(tmp_path):
    folder = _compile_llama(tmp_path, memory_budget=0.5, offload_activations=True)
    page = (folder / "index.html").read_text()
    summary, plan, picture, diffs = (_position(page, "<h2>Summary</h2>"),
                                     _position(page, "Rematerialization plan"),
                                     _position(page, "src='remat_memory.svg'"),
                                     _position(page, "<h2>Diffs</h2>"))
    assert summary < plan < picture < diffs
    assert (folder / "remat_memory.svg").exists()
    # the plan as a table: decision, bytes, shape, the model's source line and module path
    table = page[picture:diffs]
    assert "offload &alpha;=" in table and re.search(r"\[2, 32, \d+\]", table)
    assert "models/llama.py:" in table and "in forward:" in table and "feed_forward" in table
    # raw JSON only behind a link, never inline
    assert "href='summary.json'" in page and '"table":' not in page and "{&quot;" not in page
    # the summary names forward and backward passes and the plan's effect against torch's plan
    head = page[summary:plan]
    assert "forward / offload_activations" in head and "backward / offload_activations" in head
    assert "torch&#x27;s min-cut plan" in head and "offloaded" in head


def test_index_names_every_stage_and_pass_and_why_a_site_was_left_alone(tmp_path):
    _compile_llama(tmp_path, memory_budget=0.5, offload_activations=True)
    index = (tmp_path / "index.html").read_text()
    for column in ("pre-grad", "joint", "partition", "forward", "backward"):
        assert f"<th>{column}" in index, column
    assert "plan_rematerialization</b>: peak" in index  # the partition stage
    assert "offload_activations</b>: rewrote" in index
    assert "shard_attention: off (flag sequence_parallel_attention)" in index
    assert "left alone: " in index and "graph inputs" in index  # offload's first refusal


def _summary(passes, notes=None, stages=("pre_grad", "joint", "forward", "backward")):
    return {"graph": "g", "config": {"codegen": "eager"}, "passes": passes, "notes": notes or {},
            "stages": [{"stage": s, "file": f"0{i}_{s}.py", "nodes": 10} for i, s in enumerate(stages)]}


_SITE = {"pattern": "matmul_all_reduce", "gemm": "mm_1", "mode": "chunked", "chunks": 4,
         "reason": "predicted 1.3x faster",
         "estimates_ms": {"gemm": 1.0, "comm": 0.5, "sequential": 1.5, "chunked:2": 1.3, "chunked:4": 1.2}}


def test_overlap_decisions_render_as_a_table_with_the_chosen_mode_marked():
    entry = {"stage": "joint", "pass": "overlap_matmul_collectives", "ran": True, "matched": 2,
             "modified": True, "ms": 1.0, "refusals": ["matmul_all_reduce at mm_2: sequential kept"],
             "stats": {"sites": [_SITE, dict(_SITE, gemm="mm_2", mode="sequential", chunks=1)]}}
    facts = {0: {"mm_1": {"shape": [8, 16], "inputs": ["a", "b"], "source": "model.py:3 in f: y = w(x)",
                          "role": "forward"},
                 "a": {"shape": [8, 4]}, "b": {"shape": [4, 16]}}}
    page = pages.graph_page(_summary([entry]), {0: ("x = 1", "x = 2")}, facts, {}, set())
    table = page[page.index("Overlap decisions"):page.index("<h2>Diffs</h2>")]
    assert "[8, 4] @ [4, 16] &rarr; [8, 16]" in table and "model.py:3" in table
    assert "joint (forward)" in table and "chunked (4 chunks)" in table
    assert "<td class='num chosen'>1.2000</td>" in table  # chunked:4 is the one it runs
    assert "1 of 2 GEMM + collective sites overlapped" in table
    assert "predicted 2.700 ms against 3.000 ms sequential" in table
    assert pages.chosen_estimate_key(dict(_SITE, mode="sequential")) == "sequential"


def test_plan_recorded_as_the_planner_pass_renders_like_the_note():
    """Where the pipeline records the planner as a pass of the partition stage, its stats carry
    the plan: the index and the page show it the same way."""
    plan = {"memory_budget": 1100, "budget_bytes": 1000, "planned_peak_bytes": 1200,
            "planned_step_peak_bytes": 1300, "inputs_bytes": 100, "min_cut_peak_bytes": 1500,
            "feasible": False, "refusals": ["no plan fits the budget"],
            "table": [{"tensor": "relu", "action": "recompute", "bytes": 512, "recompute_s": 2e-6},
                      {"tensor": "mm", "action": "save", "bytes": 256}]}
    entry = {"stage": "partition", "pass": "plan_rematerialization", "ran": True, "matched": 2,
             "modified": True, "stats": plan, "refusals": []}
    summary = _summary([entry])
    assert pages.remat_plan(summary) is plan
    page = pages.graph_page(summary, {}, {}, {"joint": {"relu": {"shape": [4, 128]}}}, set())
    assert "step peak 1.27 KiB with the graph&#x27;s inputs, budget 1.07 KiB -- MISSED by 200 B" in page
    assert "<td>relu</td><td>recompute</td><td class='num'>512 B</td><td>[4, 128]</td>" in page
    assert "2.0 us" in page
    index = pages.index_page([("rank0/g", summary)])
    assert "(misses)" in index and "1 kept, 1 recomputed" in index


def test_index_folds_ranks_that_decided_alike_and_flags_ranks_that_did_not():
    fired = {"stage": "pre_grad", "pass": "shard_attention", "ran": True, "matched": 1,
             "modified": True, "refusals": [], "stats": {}}
    refused = dict(fired, matched=0, modified=False,
                   refusals=["sdpa at model.py:7: has an attn_mask, which cannot be proven causal"])
    alike = pages.index_page([(f"sp/rank{r}/graph_000", _summary([fired])) for r in range(2)])
    assert alike.count("<tr><td><a href") == 1 and "rank0, rank1" in alike
    assert "decided differently" not in alike
    differ = pages.index_page([("sp/rank0/graph_000", _summary([fired])),
                               ("sp/rank1/graph_000", _summary([refused]))])
    assert differ.count("<tr><td><a href") == 2 and "decided differently" in differ
    assert "left alone: sdpa at model.py:7: has an attn_mask" in differ


def test_an_old_or_partial_summary_still_renders():
    page = pages.graph_page({"graph": "g"}, {}, {}, {}, set())
    assert "<h2>Summary</h2>" in page
    assert "<table" in pages.index_page([("g", {"passes": [{"pass": "x"}]})])
