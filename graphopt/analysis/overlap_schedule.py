"""How the overlap runtimes cut a GEMM's rows: chunks, rank blocks and their sub-chunks.

The runtimes of ``graphopt.ops.matmul_collectives`` run these bounds and the cost model
(``graphopt.analysis.overlap_cost``) walks the same ones, so an estimate prices the schedule that
runs. Pure arithmetic on row counts: every rank computes the same bounds.
"""

from __future__ import annotations

# Sub-chunks of a tapered copy-engine schedule are whole multiples of this many rows where the block
# allows (cuBLAS tiles are 64-256 rows high; a ragged sub-chunk wastes part of a wave).
ROW_UNIT = 128


def chunk_bounds(length: int, chunks: int) -> list[tuple[int, int]]:
    """``chunks`` contiguous [start, end) ranges covering ``length`` (near-equal, none empty)."""
    chunks = max(1, min(chunks, length)) if length > 0 else 1
    base, extra = divmod(length, chunks)
    bounds, start = [], 0
    for index in range(chunks):
        end = start + base + (1 if index < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def tapered_bounds(length: int, chunks: int, taper: float) -> list[tuple[int, int]]:
    """``chunks`` contiguous [start, end) ranges covering ``length``, each about ``taper`` times the
    one before (taper 1: near-equal, ``chunk_bounds``). The trailing ranges are whole multiples of
    ``ROW_UNIT`` rows where the length holds one per range; the first takes the remainder, and where
    rounding would leave it smaller than the second the ranges are near-equal instead."""
    if taper >= 1.0 or chunks <= 1 or length <= 1:
        return chunk_bounds(length, chunks)
    chunks = min(chunks, length)
    unit = ROW_UNIT if length >= chunks * ROW_UNIT else 1
    weights = [taper ** index for index in range(chunks)]
    trailing = [max(unit, round(length * weight / sum(weights) / unit) * unit) for weight in weights[1:]]
    first = length - sum(trailing)
    if first < trailing[0]:
        return chunk_bounds(length, chunks)
    bounds, start = [], 0
    for size in (first, *trailing):
        bounds.append((start, start + size))
        start += size
    return bounds


def copy_engine_blocks(rows: int, world: int, chunks: int, taper: float = 1.0
                       ) -> list[list[tuple[int, int]]]:
    """Row ranges [start, end) of every rank block's sub-chunks: blocks[p][j] (same on every rank).
    ``taper`` < 1 shrinks the sub-chunks geometrically (``graphopt.ops.matmul_collectives``,
    "Sub-chunk sizes")."""
    if rows < world:
        raise ValueError(f"M={rows} rows cannot be split into {world} rank blocks; use mode='chunked'")
    if not 0.0 < taper <= 1.0:
        raise ValueError(f"taper={taper} must be in (0, 1]: each sub-chunk at most as long as the one "
                         "before it")
    blocks = chunk_bounds(rows, world)
    chunks = max(1, min(chunks, min(end - start for start, end in blocks)))
    return [[(start + s, start + e) for s, e in tapered_bounds(end - start, chunks, taper)]
            for start, end in blocks]
