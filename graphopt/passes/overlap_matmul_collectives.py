"""Overlap a GEMM with the collective that consumes or feeds it (T3-style, in software).

Runs on the AOTAutograd joint graph (stage "joint": forward and backward sites at once) and on
inference graphs. Three patterns, declared as data in ``PATTERNS``:

    matmul_all_reduce (row-parallel linear forward; column-parallel linear input-grad backward)
        y  = mm(a, b) | addmm(bias, a, b) | bmm(a, b)
        v  = view*(y)                                    # zero or more reshapes, one user each
        r  = _c10d_functional.all_reduce(v, "sum", group)
        w  = _c10d_functional.wait_tensor(r)
      ->
        y' = graphopt::matmul_all_reduce(a, b, bias, group, mode, chunks, comm_sms, taper, replay)
        w' = view*(y')                                   # the same reshapes, replayed

    matmul_reduce_scatter (sequence-parallel row-parallel linear)
        y  = mm(a, b);  o = view*(y)                     # o: [..., N]
        x  = cat(split_with_sizes(o, [S/P]*P, d), 0)     # optional: scatter along dim d, not 0
        w  = wait_tensor(reduce_scatter_tensor(x, "sum", P, group))
      ->
        w' = graphopt::matmul_reduce_scatter(view(a, o[:-1] + [K]), b, group, P, d, mode, chunks, comm_sms,
                                             taper, replay)

    all_gather_matmul (sequence-parallel column-parallel linear)
        g  = wait_tensor(all_gather_into_tensor(s, P, group))
        g  = cat(split_with_sizes(g, [B]*P, 0), d)       # optional: gather along dim d, not 0
        y  = mm(view(g, [-1, K]), b)
      ->
        g', o = graphopt::all_gather_matmul(s, b, group, P, d, chunks, mode)
        y' = view(o, [-1, N])                            # other users of g read g'

Safe when (checked per site, else the site is left unchanged and the reason is appended to
``PassResult.refusals``):
- the reduction is "sum"; the group name resolves to a process group (its size is known);
- the GEMM output and every reshape between it and the collective have exactly one user (nothing
  else reads the un-reduced partial sums; ``copy(partial, reduced)``, which Dynamo emits for an
  in-place ``dist.all_reduce(y)``, reads the reduced value and is rewired to the fused result), and
  the collective's only user is its wait_tensor;
- the reshapes keep the last (N) dimension, so the GEMM rows map onto the collective's rows;
- addmm has alpha = beta = 1; operands are floating point of one dtype;
- for reduce-scatter / all-gather along dim d: the split/cat is exactly the "move dim d to the
  front" permutation DTensor emits (P equal parts, taken in rank order); the shapes are static;
- the cost model (``graphopt.analysis.overlap_cost``) estimates the overlapped runtime faster than
  sequential by its margin, unless ``config.overlap_mode`` forces a runtime;
- runtime "copy_engine", "tile" or "tracked" only for a plain 2-D mm (no bias, no batch;
  reduce-scatter along dim 0 of a 2-D output; "tracked" also for an all-gather of a 2-D shard along
  rows, and only where cuBLASLt takes the GEMM's chunk counters at some chunk count, asked of
  ``graphopt.distributed.tracked_gemm.support``) on CUDA with torch symmetric memory, over a group
  inside one node (``graphopt.distributed.topology``; NCCL runtimes elsewhere): the ops' ``mode``
  argument says which
  runtime the fused op runs, ``chunks`` its chunk / sub-chunk count, ``taper`` how fast the
  copy-engine sub-chunks shrink (1: equal), and ``replay`` whether a copy-engine call replays CUDA
  graphs of repeated calls (``config.overlap_graph_replay``; the same device work, less host time).

The new ops compute the same function as the pair they replace (chunking only changes GEMM
blocking, so results agree to floating-point rounding). They are tagged like torch tags
collectives, so the partitioner saves their outputs and never recomputes them in backward.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from graphopt import _compat
from graphopt.analysis import overlap_cost
from graphopt.analysis.device_profile import current_profile
from graphopt.analysis.op_facts import val
from graphopt.passes.manager import PassContext, PassResult

log = logging.getLogger("graphopt.passes.overlap_matmul_collectives")

aten = torch.ops.aten
c10d = _compat.functional_collectives_ops()

STAGES = ("joint", "inference")
RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.alias.default)
SPLITS = (aten.split_with_sizes.default, aten.split.Tensor)
# Nodes computing a weight operand from parameters that may move up to the insertion point.
HOISTABLE = RESHAPES + (aten.permute.default, aten.t.default, aten.transpose.int)


@dataclasses.dataclass(frozen=True)
class CollectivePattern:
    """One rewrite: a collective, the GEMMs it pairs with, the matcher and the rewriter."""

    name: str
    kind: str                       # overlap_cost kind
    collective: Any                 # the _c10d_functional overload that anchors the match
    gemms: tuple[Any, ...]          # GEMM overloads allowed on the other side
    match: Callable[["CollectivePattern", fx.Node], "Match | str"]
    rewrite: Callable[[fx.GraphModule, "Match", overlap_cost.OverlapChoice], None]


@dataclasses.dataclass
class Match:
    pattern: CollectivePattern
    gemm: fx.Node
    collective: fx.Node
    wait: fx.Node
    group_name: str
    world_size: int
    m: Any
    n: Any
    k: Any
    val: torch.Tensor                          # GEMM output value (dtype, device)
    reshapes: list[fx.Node] = dataclasses.field(default_factory=list)  # gemm side, in order
    layout: list[fx.Node] = dataclasses.field(default_factory=list)    # split / getitems / cat
    dim: int = 0                               # scatter / gather dim
    view_shape: Optional[list[int]] = None     # reduce-scatter: the GEMM output seen as [..., N]
    gathered: Optional[fx.Node] = None         # all-gather: the node other users read
    anchor: Optional[fx.Node] = None           # all-gather: the fused op goes right before it
    plain_mm_layout: bool = False
    copies: list[fx.Node] = dataclasses.field(default_factory=list)  # copy(partial, reduced) aliases


# --- helpers ---------------------------------------------------------------------------------------

def _world_size(group_name: Any) -> int | str:
    try:
        return _compat.resolve_process_group(group_name).size()
    except Exception as err:  # the group is unknown in this process
        return f"process group {group_name!r} cannot be resolved ({err}); initialise it first"


def _single_user(node: fx.Node) -> bool:
    return len(node.users) == 1


def _wait_of(collective: fx.Node) -> fx.Node | str:
    users = list(collective.users)
    if len(users) != 1 or users[0].target is not c10d.wait_tensor.default:
        return f"{collective.name} is not consumed by exactly one wait_tensor"
    return users[0]


def _reshape_chain_up(node: fx.Node, copies: list[fx.Node] = ()) -> tuple[fx.Node, list[fx.Node]]:
    """Walk from ``node`` up through single-user reshapes; the producer and the chain (top first).
    ``node`` itself may also be read by ``copies`` (the in-place all-reduce's write-back, which
    reads the reduced value, not the partial sums)."""
    chain: list[fx.Node] = []
    while (node.op == "call_function" and node.target in RESHAPES
           and len(set(node.users) - set(copies)) == 1):
        chain.append(node)
        node = node.args[0]
    return node, chain[::-1]


def _split_cat(node: fx.Node, world: int) -> Optional[tuple[fx.Node, int, int, list[fx.Node]]]:
    """``cat([split(x, S/P, split_dim)[i] for i in range(P)], cat_dim)`` -> (x, split_dim, cat_dim,
    [split, getitems..., cat]); split_with_sizes with P equal sizes counts as the same split."""
    if node.target is not aten.cat.default:
        return None
    parts = node.args[0]
    cat_dim = node.args[1] if len(node.args) > 1 else 0
    if len(parts) != world or not all(p.target is operator.getitem and _single_user(p) for p in parts):
        return None
    split = parts[0].args[0]
    if split.target not in SPLITS or len(split.users) != world:
        return None
    split_dim = split.args[2] if len(split.args) > 2 else 0
    sizes = split.args[1]
    if split.target is aten.split.Tensor:
        sizes = [sizes] * world
        if val(split.args[0]).shape[split_dim] != sizes[0] * world:
            return None
    if len(sizes) != world or len(set(sizes)) != 1 or not all(isinstance(s, int) for s in sizes):
        return None
    if [p.args for p in parts] != [(split, i) for i in range(world)]:
        return None
    return split.args[0], split_dim, cat_dim, [split, *parts, node]


def _gemm_operands(gemm: fx.Node) -> tuple[fx.Node, fx.Node, Optional[fx.Node]] | str:
    if gemm.target is aten.addmm.default:
        if gemm.kwargs.get("beta", 1) != 1 or gemm.kwargs.get("alpha", 1) != 1:
            return f"{gemm.name}: addmm with alpha/beta != 1"
        return gemm.args[1], gemm.args[2], gemm.args[0]
    return gemm.args[0], gemm.args[1], None


def _dtype_problem(gemm: fx.Node) -> Optional[str]:
    a, b, _ = _gemm_operands(gemm)
    va, vb, vy = val(a), val(b), val(gemm)
    if not all(isinstance(v, torch.Tensor) for v in (va, vb, vy)):
        return f"{gemm.name}: operands carry no meta['val']"
    if not vy.dtype.is_floating_point or va.dtype != vb.dtype or va.dtype != vy.dtype:
        return f"{gemm.name}: dtypes {va.dtype} x {vb.dtype} -> {vy.dtype} are not one float dtype"
    return None


def _gemm_mnk(gemm: fx.Node) -> tuple[Any, Any, Any]:
    a, b, _ = _gemm_operands(gemm)
    shape_a, shape_b = val(a).shape, val(b).shape
    m = shape_a[0] * shape_a[1] if len(shape_a) == 3 else shape_a[0]
    return m, shape_b[-1], shape_a[-1]


def _fake_run(gm: fx.GraphModule, target, args, kwargs=None):
    """The value ``target`` produces on the args' meta['val'] (under the graph's fake mode)."""
    fake_mode = _compat.fake_tensor_mode_of(gm)
    vals = torch.utils._pytree.tree_map_only(fx.Node, val, (args, kwargs or {}))
    if fake_mode is None:
        from torch._subclasses.fake_tensor import FakeTensorMode
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        return target(*vals[0], **vals[1])


def _call(gm: fx.GraphModule, target, args, kwargs=None) -> fx.Node:
    node = gm.graph.call_function(target, tuple(args), kwargs or {})
    node.meta["val"] = _fake_run(gm, target, args, kwargs)
    return node


def _erase(gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
    for node in reversed(nodes):
        gm.graph.erase_node(node)


# --- matchers --------------------------------------------------------------------------------------

def _match_reduction(pattern: CollectivePattern, node: fx.Node) -> Match | str:
    """mm -> reshapes -> [split/cat] -> all_reduce | reduce_scatter_tensor -> wait."""
    source, reduce_op = node.args[0], node.args[1]
    group_name = node.args[-1]
    if reduce_op != "sum":
        return f"{node.name}: reduction {reduce_op!r} is not 'sum'"
    world = _world_size(group_name)
    if isinstance(world, str):
        return f"{node.name}: {world}"
    wait = _wait_of(node)
    if isinstance(wait, str):
        return wait
    # dist.all_reduce(y) traced by Dynamo: y = copy(y, wait(all_reduce(y))) -- the copy is the
    # reduced value in y's place, so it is a user of the result, not of the partial sums.
    copies = [user for user in source.users
              if user.target is aten.copy.default and user.args[:2] == (source, wait)
              and isinstance(val(user), torch.Tensor) and isinstance(val(wait), torch.Tensor)
              and val(user).shape == val(wait).shape and val(user).dtype == val(wait).dtype]
    if set(source.users) - set(copies) != {node}:
        return f"{node.name}: its input {source.name} has other users"
    layout: list[fx.Node] = []
    dim = 0
    if pattern.kind == "reduce_scatter":
        found = _split_cat(source, world)
        if found is not None:
            base, split_dim, cat_dim, layout = found
            if cat_dim != 0:
                return f"{node.name}: split/cat along dim {cat_dim} is not DTensor's scatter layout"
            source, dim = base, split_dim
            if not _single_user(source):
                return f"{node.name}: {source.name} has other users"
    gemm, reshapes = _reshape_chain_up(source, copies) if source.target in RESHAPES else (source, [])
    if gemm.target not in pattern.gemms or (reshapes or layout) and not _single_user(gemm):
        return (f"{node.name}: its input is not produced by a single-user "
                f"{'/'.join(str(g) for g in pattern.gemms)}")
    problem = _dtype_problem(gemm)
    if problem:
        return problem
    m, n, k = _gemm_mnk(gemm)
    shape = list(val(source).shape)
    if shape[-1] != val(gemm).shape[-1]:
        return f"{node.name}: the reshapes between {gemm.name} and the collective change the last dim"
    match = Match(pattern, gemm, node, wait, group_name, world, m, n, k, val(gemm), reshapes, layout,
                  dim, copies=copies)
    if pattern.kind == "reduce_scatter":
        if not all(isinstance(s, int) for s in shape):
            return f"{node.name}: symbolic output shape {shape}; the scatter layout needs static sizes"
        if shape[dim] % world:
            return f"{node.name}: dim {dim} of size {shape[dim]} is not divisible by {world} ranks"
        match.view_shape = shape
        match.plain_mm_layout = len(shape) == 2 and dim == 0
    else:
        match.plain_mm_layout = gemm.target is aten.mm.default
    return match


def _match_all_gather(pattern: CollectivePattern, node: fx.Node) -> Match | str:
    """all_gather_into_tensor -> wait -> [split/cat] -> reshapes -> mm (first GEMM user)."""
    shard, world_arg, group_name = node.args[0], node.args[1], node.args[2]
    world = _world_size(group_name)
    if isinstance(world, str):
        return f"{node.name}: {world}"
    if world != world_arg:
        return f"{node.name}: group size {world} != all_gather's {world_arg}"
    wait = _wait_of(node)
    if isinstance(wait, str):
        return wait
    gathered, dim, layout = wait, 0, []
    split = next(iter(wait.users)) if len(wait.users) == 1 else None
    if split is not None and split.target in SPLITS:
        first_part = next(iter(split.users))
        found = _split_cat(next(iter(first_part.users)), world) if first_part.users else None
        if found is not None and found[1] == 0 and found[0] is wait:
            gathered, dim, layout = found[3][-1], found[2], found[3]
    width = val(gathered).shape[-1]
    gemm = _first_gemm_user(gathered, width, pattern.gemms)
    if gemm is None:
        return f"{node.name}: no mm reads the gathered tensor through reshapes that keep the last dim"
    problem = _dtype_problem(gemm)
    if problem:
        return problem
    if not isinstance(val(gemm).shape[-1], int):
        return f"{gemm.name}: symbolic N; the output reshape needs a static last dim"
    m, n, k = _gemm_mnk(gemm)
    return Match(pattern, gemm, node, wait, group_name, world, m, n, k, val(gemm), [], layout, dim,
                 gathered=gathered, anchor=_first_user(gathered),
                 plain_mm_layout=dim == 0 and len(val(shard).shape) == 2)


def _first_user(node: fx.Node) -> fx.Node:
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return min(node.users, key=order.__getitem__)


def _first_gemm_user(gathered: fx.Node, width: Any, gemms) -> Optional[fx.Node]:
    frontier, seen = [gathered], []
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user.target in RESHAPES and val(user).shape[-1] == width:
                frontier.append(user)
            elif user.target in gemms and user.args[0] is node and len(val(node).shape) == 2:
                seen.append(user)
    order = {n: i for i, n in enumerate(gathered.graph.nodes)} if seen else {}
    return min(seen, key=order.__getitem__) if seen else None


# --- rewriters -------------------------------------------------------------------------------------

def _rewrite_all_reduce(gm: fx.GraphModule, match: Match, choice: overlap_cost.OverlapChoice) -> None:
    a, b, bias = _gemm_operands(match.gemm)
    with gm.graph.inserting_before(match.gemm):
        fused = _call(gm, torch.ops.graphopt.matmul_all_reduce.default,
                      (a, b, bias, match.group_name, choice.mode, choice.chunks, choice.comm_sms,
                       choice.taper, choice.replay))
        _compat.mark_must_save(fused)
        result = fused
        for reshape in match.reshapes:
            result = _call(gm, reshape.target, (result, *reshape.args[1:]), reshape.kwargs)
    for alias in match.copies:
        alias.replace_all_uses_with(result)
    match.wait.replace_all_uses_with(result)
    _erase(gm, [match.gemm, *match.reshapes, match.collective, match.wait, *match.copies])


def _rewrite_reduce_scatter(gm: fx.GraphModule, match: Match,
                            choice: overlap_cost.OverlapChoice) -> None:
    a, b, _ = _gemm_operands(match.gemm)
    with gm.graph.inserting_before(match.gemm):
        if len(match.view_shape) != 2:
            a = _call(gm, aten.view.default, (a, [*match.view_shape[:-1], val(a).shape[-1]]))
        fused = _call(gm, torch.ops.graphopt.matmul_reduce_scatter.default,
                      (a, b, match.group_name, match.world_size, match.dim, choice.mode, choice.chunks,
                       choice.comm_sms, choice.taper, choice.replay))
        _compat.mark_must_save(fused)
    match.wait.replace_all_uses_with(fused)
    _erase(gm, [match.gemm, *match.reshapes, *match.layout, match.collective, match.wait, *match.copies])


def _rewrite_all_gather(gm: fx.GraphModule, match: Match, choice: overlap_cost.OverlapChoice) -> None:
    shard = match.collective.args[0]
    b = match.gemm.args[1]
    with gm.graph.inserting_before(match.anchor):  # every reader of the gathered tensor is after it
        fused = _call(gm, torch.ops.graphopt.all_gather_matmul.default,
                      (shard, b, match.group_name, match.world_size, match.dim, choice.chunks,
                       "tracked" if choice.mode == "tracked" else "chunked"))
        gathered = _call(gm, operator.getitem, (fused, 0))
        product = _call(gm, operator.getitem, (fused, 1))
        for node in (gathered, product):
            _compat.mark_must_save(node)
    with gm.graph.inserting_before(match.gemm):
        flat = _call(gm, aten.view.default, (product, [-1, val(match.gemm).shape[-1]]))
    match.gemm.replace_all_uses_with(flat)
    match.gathered.replace_all_uses_with(gathered)
    _erase(gm, [match.collective, match.wait, *match.layout, match.gemm])


def _hoist_operand(gm: fx.GraphModule, operand: Any, anchor: fx.Node) -> Optional[str]:
    """Make ``operand`` defined before ``anchor``, moving pure weight reshapes up if needed."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    to_move: list[fx.Node] = []

    def visit(node: Any) -> bool:
        if not isinstance(node, fx.Node) or order[node] < order[anchor] or node in to_move:
            return True
        if node.target not in HOISTABLE:
            return False
        if not all(visit(arg) for arg in node.all_input_nodes):
            return False
        to_move.append(node)
        return True

    if not visit(operand):
        return (f"weight operand {operand.name} is computed after the gathered tensor is first used "
                "and is not a pure reshape of parameters")
    for node in to_move:
        anchor.prepend(node)
    return None


# --- the pass --------------------------------------------------------------------------------------

def _tracked_chunks(kind: str, match: Match, is_cuda: bool) -> tuple[int, ...]:
    """The chunk counts at which cuBLASLt runs this site's tracked GEMM (runtime "tracked"): none
    off CUDA, outside a plain 2-D mm, or where the bindings or cuBLASLt refuse the counters."""
    from graphopt.distributed import symm_mem, tracked_gemm

    if not (is_cuda and match.plain_mm_layout and symm_mem.copy_engine_available()):
        return ()
    m, n, k = (overlap_cost.concrete(size) for size in (match.m, match.n, match.k))
    a, b, _ = _gemm_operands(match.gemm)
    weight_transposed = val(b).stride(0) == 1 and val(b).stride(1) != 1
    found = []
    for count in overlap_cost.TRACKED_CHUNK_CHOICES:
        if not overlap_cost.tracked_chunk_ok(kind, m, match.world_size, count):
            continue
        total = count * match.world_size if kind == "all_gather" else count
        if tracked_gemm.support(m, n, k, match.val.dtype, total, "rows",
                                "in" if kind == "all_gather" else "out", weight_transposed,
                                match.val.device) is None:
            found.append(count)
    return tuple(found)


PATTERNS: tuple[CollectivePattern, ...] = (
    CollectivePattern("matmul_all_reduce", "all_reduce", c10d.all_reduce.default,
                      (aten.mm.default, aten.addmm.default, aten.bmm.default),
                      _match_reduction, _rewrite_all_reduce),
    CollectivePattern("matmul_reduce_scatter", "reduce_scatter", c10d.reduce_scatter_tensor.default,
                      (aten.mm.default,), _match_reduction, _rewrite_reduce_scatter),
    CollectivePattern("all_gather_matmul", "all_gather", c10d.all_gather_into_tensor.default,
                      (aten.mm.default,), _match_all_gather, _rewrite_all_gather),
)
_BY_COLLECTIVE = {pattern.collective: pattern for pattern in PATTERNS}


def overlap_matmul_collectives(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Replace GEMM + collective pairs with overlapped graphopt ops where the cost model gains."""
    if ctx.stage not in STAGES:
        return PassResult(gm, False, refusals=[f"stage {ctx.stage!r} is not one of {STAGES}"])
    import graphopt.ops.matmul_collectives  # noqa: F401  registers graphopt:: ops
    from graphopt.distributed import symm_mem, topology

    profile = current_profile(ctx.config.device_profile)
    result = PassResult(gm, False, stats={"sites": []})
    for node in list(gm.graph.nodes):
        pattern = _BY_COLLECTIVE.get(node.target) if node.op == "call_function" else None
        if pattern is None:
            continue
        match = pattern.match(pattern, node)
        if isinstance(match, str):
            result.refusals.append(f"{pattern.name}: {match}")
            continue
        result.matched += 1
        is_cuda = match.val.device.type == "cuda"
        tracked_chunks = _tracked_chunks(pattern.kind, match, is_cuda)
        choice = overlap_cost.choose_overlap(
            pattern.kind, match.m, match.n, match.k, match.val.dtype.itemsize, match.world_size,
            profile, is_cuda=is_cuda,
            symmetric_memory=(match.plain_mm_layout and is_cuda and symm_mem.copy_engine_available()
                              and not topology.group_spans_nodes(match.group_name)),
            triton=symm_mem.available(), mode=ctx.config.overlap_mode,
            chunks=ctx.config.overlap_chunks, replay=ctx.config.overlap_graph_replay,
            tracked_chunks=tracked_chunks)
        site = {"pattern": pattern.name, "gemm": match.gemm.name, "mode": choice.mode,
                "chunks": choice.chunks, "comm_sms": choice.comm_sms, "taper": choice.taper,
                "replay": choice.replay,
                "reason": choice.reason,
                "estimates_ms": {key: round(v * 1e3, 4) for key, v in choice.estimates_s.items()}}
        result.stats["sites"].append(site)
        if not choice.rewrites:
            result.refusals.append(f"{pattern.name} at {match.gemm.name}: sequential kept: "
                                   f"{choice.reason}")
            continue
        if pattern.kind == "all_gather":
            problem = _hoist_operand(gm, match.gemm.args[1], match.anchor)
            if problem:
                site["mode"] = "sequential"
                result.refusals.append(f"{pattern.name} at {match.gemm.name}: {problem}")
                continue
        pattern.rewrite(gm, match, choice)
        result.modified = True
        log.debug("%s at %s -> %s", pattern.name, site["gemm"], choice)
    if result.modified:
        gm.graph.lint()
    return result
