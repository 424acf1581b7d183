"""Sequence-parallel tensor-parallel Llama (``parallelize_llama(..., sequence_parallel=True)``)
compiled with the overlap pass, over gloo with P = 2 and 3.

Logits and every parameter gradient must equal the single-process unsharded model run eagerly (the
reference is not compiled: Dynamo recompiling the Llama code for the DTensor model after the plain
one can hit a RecursionError in AOTAutograd), and the pass must have rewritten the sequence-parallel
sites: the row-parallel mm + reduce-scatter and the all-gather + column-parallel mm.

One spawn of 3 processes: P = 3 on every rank, P = 2 on a mesh of ranks {0, 1} (rank 2 sits it out).
"""

from __future__ import annotations

import copy

import torch

from graphopt.distributed.launch import spawn

WORLD = 3
LAYERS = 2
SEQ = 12  # divisible by both degrees
FP32 = dict(rtol=1e-5, atol=1e-6)


def _config():
    from graphopt.models.llama import LlamaConfig
    # 12 query / 6 key-value heads and ffn 96: every projection splits evenly over 2 and 3 ranks
    return LlamaConfig.tiny(n_layers=LAYERS, dim=96, n_heads=12, n_kv_heads=6, ffn_dim=96)


def _rewritten_sites(summaries) -> dict[str, int]:
    """Sites the overlap pass replaced, by fused op: from its stats (a site kept sequential, or
    refused when hoisting the weight, says mode "sequential") and, independently, from the fx
    nodes it added to the graph; and the collectives it left alone, by pattern."""
    by_stats: dict[str, int] = {}
    by_nodes: dict[str, int] = {}
    refused: dict[str, int] = {}
    for summary in summaries:
        for entry in summary["passes"]:
            if entry["pass"] != "overlap_matmul_collectives" or not entry.get("ran"):
                continue
            for site in entry["stats"].get("sites", []):
                if site["mode"] != "sequential":
                    by_stats[site["pattern"]] = by_stats.get(site["pattern"], 0) + 1
            for name in entry["added_nodes"]:
                for op in ("matmul_reduce_scatter", "all_gather_matmul", "matmul_all_reduce"):
                    if name == op or name.startswith(op + "_"):
                        by_nodes[op] = by_nodes.get(op, 0) + 1
            for reason in entry["refusals"]:
                pattern = reason.split(":")[0]
                refused[pattern] = refused.get(pattern, 0) + 1
    return {"stats": by_stats, "nodes": by_nodes, "refused": refused}


def _run_sequence_parallel(model, mesh, tokens, targets, ref_logits, ref_grads) -> dict:
    import graphopt
    from graphopt.debug.dump import clear_compile_summaries, compile_summaries
    from graphopt.models.llama import llama_loss, parallelize_llama

    model = parallelize_llama(model, mesh, sequence_parallel=True)
    torch._dynamo.reset()
    clear_compile_summaries()
    # On CPU the cost model keeps these tiny GEMMs sequential; force the chunked runtime so the
    # rewritten graph runs.
    compiled = torch.compile(model, backend=graphopt.backend(
        codegen="eager", overlap_matmul_collectives=True, overlap_mode="chunked"))
    logits = compiled(tokens)
    llama_loss(logits, targets).backward()
    torch.testing.assert_close(logits, ref_logits, **FP32)
    for name, param in model.named_parameters():
        grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
        torch.testing.assert_close(grad, ref_grads[name], **FP32, msg=lambda m: f"grad of {name}: {m}")
    return _rewritten_sites(compile_summaries())


def _worker(rank: int, world: int) -> dict[int, dict]:
    from torch.distributed.device_mesh import DeviceMesh
    from graphopt.models.llama import Llama, llama_loss

    cfg = _config()
    torch.manual_seed(0)
    reference = Llama(cfg)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, SEQ), generator=gen)
    targets = torch.randint(0, cfg.vocab_size, (2, SEQ), generator=gen)
    ref_logits = reference(tokens)
    llama_loss(ref_logits, targets).backward()
    ref_grads = {name: param.grad for name, param in reference.named_parameters()}
    reference.zero_grad(set_to_none=True)
    # Every rank creates every mesh (its process group is a collective call).
    meshes = {p: DeviceMesh("cpu", list(range(p))) for p in (2, 3)}
    sites = {}
    for p, mesh in meshes.items():
        if rank < p:
            sites[p] = _run_sequence_parallel(copy.deepcopy(reference), mesh, tokens, targets,
                                              ref_logits.detach(), ref_grads)
    return sites


def test_sequence_parallel_llama_with_overlap_matches_unsharded_on_gloo_p2_p3():
    results = spawn(_worker, WORLD)
    # Per layer: forward, all-gather -> wq (wk, wv read the gathered tensor) and -> w1 (w3 too),
    # wo and w2 mm -> reduce-scatter; backward, the all-gathered output gradients of wo and w2 ->
    # their input-gradient mm. Plus the final norm's all-gather -> output projection. Left alone:
    # the column-parallel input gradients (a sum of 3 or 2 mms before their reduce-scatter) and the
    # all-gather of the first block's input gradient (no mm reads it).
    expected = {"matmul_reduce_scatter": 2 * LAYERS, "all_gather_matmul": 4 * LAYERS + 1}
    left_alone = {"matmul_reduce_scatter": 2 * LAYERS, "all_gather_matmul": 1}
    assert sorted(results[2]) == [3]
    for rank, sites in enumerate(results):
        assert sorted(sites) == ([2, 3] if rank < 2 else [3])
        for p, found in sites.items():
            assert found["stats"] == expected, (rank, p, found)
            assert found["nodes"] == expected, (rank, p, found)
            assert found["refused"] == left_alone, (rank, p, found)
