"""The tracked runtime's counter consumers (graphopt.kernels.counter_chunks) under the Triton
interpreter, on CPU tensors: counters already final, one process playing rank r of P with the
peers' flags already published and their partials as separate buffers, so every chunk's copy /
reduction is checked against the sum it must be (in rank order) and the flags it must publish."""

import os
import subprocess
import sys
import textwrap

import pytest

_CHECK = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import types
    import torch
    from graphopt.kernels import counter_chunks as kernel

    torch.manual_seed(0)
    # copy_ready_chunks: every chunk copied once its counter reads 0 (rows and columns chunks).
    for axis, chunks in (("rows", 4), ("cols", 2)):
        src = torch.randn(64, 96)
        dst = torch.full_like(src, float("nan"))
        counters = torch.zeros(chunks, dtype=torch.int32)
        kernel.copy_ready_chunks(counters, src, dst, chunks, axis, ctas=3)
        assert torch.equal(dst, src), axis

    def workspace(partials, rank, chunks, epoch):
        world = len(partials)
        flags = torch.zeros(kernel.flag_count(world, chunks), dtype=torch.int32)
        view = flags[:2 * world * chunks].view(2, world, chunks)
        for peer in range(world):
            if peer != rank:            # the absent ranks have published both stages
                view[:, peer] = epoch
        return types.SimpleNamespace(
            partial=partials[rank], world_size=world, rank=rank, flags=flags,
            epoch=torch.tensor([epoch], dtype=torch.int32),
            partial_ptrs=torch.tensor([t.data_ptr() for t in partials]),
            flag_ptrs=torch.tensor([flags.data_ptr()] * world)), view

    world, rank, chunks, m, n = 3, 1, 6, 96, 80
    for mode in ("one_shot", "reduce_scatter", "two_shot"):
        partials = [torch.randn(m, n) for _ in range(world)]
        originals = [p.clone() for p in partials]
        ws, view = workspace(partials, rank, chunks, epoch=5)
        counters = torch.zeros(chunks, dtype=torch.int32)
        out = torch.zeros(m // world if mode == "reduce_scatter" else m, n)
        kernel.reduce_ready_chunks(ws, counters, out, chunks, "rows", mode, ctas=2)
        total = originals[0] + originals[1] + originals[2]
        block = slice(rank * m // world, (rank + 1) * m // world)
        if mode == "one_shot":
            assert torch.allclose(out, total, atol=1e-5), mode
            assert bool((view[0, rank] == 5).all()), view[0, rank]
        elif mode == "reduce_scatter":
            assert torch.allclose(out, total[block], atol=1e-5), mode
            own = view[0, rank, rank * 2:(rank + 1) * 2]
            assert bool((own == 5).all()) and int(view[0, rank].sum()) == 10, view[0, rank]
        else:   # own block reduced (in place too, for the peers); the others' blocks copied as is
            expected = torch.cat([originals[0][:m // world], total[block], originals[2][2 * m // world:]])
            assert torch.allclose(out, expected, atol=1e-5), mode
            assert torch.allclose(partials[rank][block], total[block], atol=1e-5)
            assert bool((view[1, rank, rank * 2:(rank + 1) * 2] == 5).all()), view[1, rank]
            assert int(ws.flags[2 * world * chunks:].abs().sum()) == 0   # arrival counts reset
    # Column chunks, one-shot: the same sums, chunked the other way.
    partials = [torch.randn(m, n) for _ in range(world)]
    ws, _ = workspace(partials, 0, 4, epoch=1)
    out = torch.zeros(m, n)
    kernel.reduce_ready_chunks(ws, torch.zeros(4, dtype=torch.int32), out, 4, "cols", "one_shot", ctas=3)
    assert torch.allclose(out, partials[0] + partials[1] + partials[2], atol=1e-5)
    print("ok")
""")


def test_counter_consumers_under_triton_interpreter():
    pytest.importorskip("triton")
    done = subprocess.run([sys.executable, "-c", _CHECK], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0 and "ok" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]


def test_owner_reduced_modes_need_row_chunks_in_whole_rank_blocks():
    pytest.importorskip("triton")
    import types
    import torch
    from graphopt.kernels import counter_chunks

    ws = types.SimpleNamespace(partial=torch.empty(8, 4), world_size=2, rank=0)
    with pytest.raises(ValueError, match="multiple of the world size 2"):
        counter_chunks.reduce_ready_chunks(ws, None, torch.empty(4, 4), 3, "rows", "reduce_scatter", 1)
    with pytest.raises(ValueError, match="axis='rows'"):
        counter_chunks.reduce_ready_chunks(ws, None, torch.empty(8, 4), 2, "cols", "two_shot", 1)
    with pytest.raises(ValueError, match="do not split into 3 equal chunks"):
        counter_chunks.reduce_ready_chunks(ws, None, torch.empty(8, 4), 3, "rows", "one_shot", 1)
