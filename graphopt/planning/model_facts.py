"""What the layout planner knows about a model, traced once at toy size and scaled symbolically.

A model is a stack of identical blocks between a head (embedding, final norm, output projection and
loss). The planner needs, for any batch, sequence length and tensor-parallel degree, each part's
forward + backward ops and the memory they hold, so it traces

  * one block as the graph ``torch.compile`` gives it (Dynamo, then AOTAutograd's joint graph), with
    the batch and sequence dimensions symbolic, once per tensor-parallel degree: the block's
    column-parallel linears keep 1/tp of their output features and the row-parallel ones 1/tp of
    their input features, which is what every rank computes under Megatron-style tensor
    parallelism (the attention reads its head count from the projections' width);
  * the head: the whole model with its blocks passed through, run by the training step's loss
    function, traced the same way.

Tracing happens on the CPU with parameters allocated but never written (``torch.empty`` on a
``to_empty`` copy: no page is touched) and at a toy sequence length, so an 8B- or 70B-dimension
model costs a few seconds and a few MB. Nothing runs: the capture stops at AOTAutograd's partition.
Every size in the traced graphs is a sympy expression over two symbols (batch, sequence), so
``JointGraphAtSize.at(batch, seq)`` gives the graph as the remat solver sees it at any real size.

The known families carry a tensor-parallel plan as data: graphopt's reference Llama
(``graphopt.models.llama.TENSOR_PARALLEL_LINEARS``) and Hugging Face models whose config has a
``base_model_tp_plan`` of plain ``colwise`` / ``rowwise`` entries over ``layers.*`` (Llama, Mistral,
Qwen2, ...). Any other model is planned with tensor-parallel degree 1, and the reason is kept.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import logging
import types
from typing import Any, Callable, Optional

import sympy
import torch
import torch.fx as fx
import torch.nn as nn

from graphopt import _compat
from graphopt.analysis import cost_model, op_facts
from graphopt.analysis.device_profile import CPU
from graphopt.analysis.remat_solver import JointGraph

log = logging.getLogger("graphopt.planning.model_facts")

# Toy sizes of the trace: distinct from each other and from 0/1, which Dynamo specialises.
TRACE_BATCH = 2
TRACE_SEQ = 96


class TraceError(RuntimeError):
    """The model could not be traced for planning; the message names the cause and the fix."""


@dataclasses.dataclass(frozen=True)
class TensorParallelPlan:
    """Megatron-style tensor parallelism of one block: linears (names relative to the block) split by
    output features (column-parallel) or input features (row-parallel)."""

    colwise: tuple[str, ...]
    rowwise: tuple[str, ...]
    source: str

    def colwise_groups(self) -> list[tuple[str, ...]]:
        """Column-parallel linears that read one input (those of one parent module, e.g. q/k/v):
        their input gradients are summed before one all-reduce."""
        groups: dict[str, list[str]] = {}
        for name in self.colwise:
            groups.setdefault(name.rpartition(".")[0], []).append(name)
        return [tuple(names) for names in groups.values()]


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    name: str                        # "graphopt-llama", "hf-<model_type>" or "generic"
    blocks_path: str                 # attribute path of the ModuleList of blocks
    tp_plan: Optional[TensorParallelPlan]
    tp_refusal: Optional[str]        # why tensor parallelism is not planned (tp_plan is None)
    heads: Optional[int] = None
    kv_heads: Optional[int] = None
    # Hugging Face models called eagerly pass the blocks no mask for causal SDPA (they build one
    # only while tracing); the blocks are compiled alone, so the planner traces them that way.
    block_mask_is_none: bool = False


def detect_family(model: nn.Module) -> ModelFamily:
    """The family of ``model`` and its tensor-parallel plan (as data), or why it has none."""
    from graphopt.models.llama import TENSOR_PARALLEL_LINEARS, Llama

    if isinstance(model, Llama):
        return ModelFamily("graphopt-llama", "layers", _plan_from(TENSOR_PARALLEL_LINEARS,
                                                                  "graphopt.models.llama"),
                           None, model.cfg.n_heads, model.cfg.n_kv_heads)
    config = getattr(model, "config", None)
    tp_table = getattr(config, "base_model_tp_plan", None)
    blocks = _hf_blocks_path(model)
    if config is not None and blocks is not None:
        name = f"hf-{getattr(config, 'model_type', type(model).__name__)}"
        heads = getattr(config, "num_attention_heads", None)
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        plan, refusal = None, f"{type(config).__name__} has no base_model_tp_plan"
        if tp_table:
            entries = {key.split("layers.*.", 1)[1]: style for key, style in tp_table.items()
                       if key.startswith("layers.*.")}
            unknown = {k: v for k, v in entries.items() if v not in ("colwise", "rowwise")}
            if unknown:
                refusal = (f"{type(config).__name__}.base_model_tp_plan has entries graphopt does not "
                           f"apply: {unknown}; tensor parallelism stays at 1")
            elif entries:
                plan, refusal = _plan_from(entries, f"{type(config).__name__}.base_model_tp_plan"), None
        return ModelFamily(name, blocks, plan, refusal, heads, kv_heads, block_mask_is_none=True)
    path = _largest_block_list(model)
    if path is None:
        raise TraceError(f"{type(model).__name__} has no nn.ModuleList of identical blocks; the "
                         "layout planner plans models built as a stack of blocks (transformers)")
    return ModelFamily("generic", path, None,
                       f"no known tensor-parallel plan for {type(model).__name__}; tensor "
                       "parallelism stays at 1 (graphopt knows graphopt.models.llama.Llama and "
                       "Hugging Face models with a base_model_tp_plan)")


def _plan_from(entries: dict[str, str], source: str) -> TensorParallelPlan:
    return TensorParallelPlan(tuple(sorted(k for k, v in entries.items() if v == "colwise")),
                              tuple(sorted(k for k, v in entries.items() if v == "rowwise")), source)


def _hf_blocks_path(model: nn.Module) -> Optional[str]:
    for path in ("model.layers", "layers", "model.model.layers"):
        module = _get(model, path)
        if isinstance(module, nn.ModuleList) and len(module):
            return path
    return None


def _largest_block_list(model: nn.Module) -> Optional[str]:
    best, best_params = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            params = sum(p.numel() for p in module.parameters())
            if params > best_params:
                best, best_params = name, params
    return best


def _get(module: nn.Module, path: str) -> Any:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def blocks_of(model: nn.Module, family: ModelFamily) -> nn.ModuleList:
    return _get(model, family.blocks_path)


# --- the loss the training step computes ------------------------------------------------------------

LossFn = Callable[[nn.Module, torch.Tensor], Any]


def default_loss_fn(model: nn.Module) -> LossFn:
    """The training step's loss for a known family: next-token cross entropy on the tokens.

    The function returns the loss, optionally followed by tensors the caller keeps alive through the
    backward (a Hugging Face model's logits, which its output object holds)."""
    from graphopt.models.llama import Llama

    if isinstance(model, Llama):
        return graphopt_llama_loss
    if getattr(model, "config", None) is not None and _hf_blocks_path(model) is not None:
        return hf_causal_lm_loss
    raise TraceError(f"no default loss for {type(model).__name__}; pass loss_fn=fn(model, tokens) "
                     "returning the training loss")


def graphopt_llama_loss(model: nn.Module, tokens: torch.Tensor):
    from graphopt.models.llama import llama_loss
    return llama_loss(model(tokens), tokens)


def hf_causal_lm_loss(model: nn.Module, tokens: torch.Tensor):
    out = model(input_ids=tokens, labels=tokens, use_cache=False)
    return out.loss, out.logits.detach()  # the output object keeps the logits through backward


# --- symbolic joint graphs --------------------------------------------------------------------------

@dataclasses.dataclass
class NodeCost:
    flops: sympy.Expr
    bytes: sympy.Expr
    kind: str                       # "gemm", "attention", "memory" or "free" (views, placeholders)
    fp32: bool                      # a GEMM in fp32 (priced at the fp32 rate)


class JointGraphAtSize:
    """A joint graph traced with symbolic batch and sequence sizes, evaluated at any real size.

    ``reference`` is the remat solver's view of it at the trace's toy sizes (its structure: roles,
    views, recomputability, fusion kinds); ``at(batch, seq)`` is the same graph with every byte
    count and time re-evaluated, so the solver plans it as it would the real graph."""

    def __init__(self, gm: fx.GraphModule, num_fwd_outputs: int, batch_hint: int, seq_hint: int):
        from graphopt.passes.plan_rematerialization import build_joint_graph

        self.gm = gm
        self.num_fwd_outputs = num_fwd_outputs
        self.batch_hint, self.seq_hint = batch_hint, seq_hint
        self.reference: JointGraph = build_joint_graph(gm, num_fwd_outputs, CPU)
        self._symbols, self._guards = _size_symbols(gm, batch_hint, seq_hint)
        nodes = [n for n in gm.graph.nodes if n.op != "output"]
        self.costs: dict[str, NodeCost] = {n.name: _node_cost(n) for n in nodes}
        self._nbytes: dict[str, sympy.Expr] = {}
        self._tuple_outputs: dict[str, tuple[sympy.Expr, ...]] = {}
        self._shapes: dict[str, tuple[sympy.Expr, ...]] = {}
        for node in nodes:
            value = node.meta.get("val")
            if isinstance(value, torch.Tensor):
                self._nbytes[node.name] = cost_model.nbytes_expr(value)
                self._shapes[node.name] = tuple(cost_model.to_sympy(s) for s in value.shape)
            if node.name in self.reference.tuple_outputs:
                self._tuple_outputs[node.name] = tuple(cost_model.nbytes_expr(v) for v in value)
        self._functions: dict[sympy.Expr, Callable[[int, int], float]] = {}
        self._graphs: dict[tuple[int, int], JointGraph] = {}

    @property
    def reference_tokens(self) -> int:
        return self.batch_hint * self.seq_hint

    def invalid_at(self, batch: int, seq: int) -> Optional[str]:
        """None when this graph is the one torch.compile would trace at (batch, seq), else the
        guard Dynamo recorded that fails there (e.g. a loop over chunks of the sequence)."""
        if BATCH not in self._symbols.values() and batch != self.batch_hint:
            return f"the batch dimension was traced as the constant {self.batch_hint}"
        for guard in self._guards:
            if guard.subs({BATCH: batch, SEQ: seq}) is sympy.false:
                return f"guard {guard} fails"
        return None

    def value(self, expr: sympy.Expr, batch: int, seq: int) -> float:
        """``expr`` at this batch and sequence length."""
        function = self._functions.get(expr)
        if function is None:
            function = _compiled(expr.subs(self._symbols) if expr.free_symbols else expr)
            self._functions[expr] = function
        return float(function(batch, seq))

    def at(self, batch: int, seq: int) -> JointGraph:
        """The remat solver's graph at this size (times left at zero: callers price it)."""
        key = (batch, seq)
        graph = self._graphs.get(key)
        if graph is not None:
            return graph
        ref = self.reference
        nbytes = dict(ref.nbytes)
        logical = dict(ref.logical_bytes)
        for name, expr in self._nbytes.items():
            value = int(self.value(expr, batch, seq))
            logical[name] = value
            if ref.nbytes[name]:
                nbytes[name] = value
        scale = batch * seq / self.reference_tokens  # kernel workspaces grow with the tokens
        graph = dataclasses.replace(
            ref, nbytes=nbytes, logical_bytes=logical,
            time_s={name: 0.0 for name in ref.order},
            workspace={name: int(size * scale) for name, size in ref.workspace.items()},
            tuple_outputs={name: tuple(int(self.value(e, batch, seq)) for e in exprs)
                           for name, exprs in self._tuple_outputs.items()},
            shapes={name: tuple(int(self.value(e, batch, seq)) for e in dims)
                    for name, dims in self._shapes.items()})
        self._graphs[key] = graph
        return graph


def _compiled(expr: sympy.Expr) -> Callable[[int, int], float]:
    """``expr`` as a fast function of (batch, seq); expressions with torch's own sympy functions
    (FloorDiv, ModularIndexing, ...) are substituted instead, which evaluates them exactly."""
    names = {type(f).__name__ for f in expr.atoms(sympy.Function)}
    if names <= _LAMBDIFIABLE:
        return sympy.lambdify((BATCH, SEQ), expr, "math")
    return lambda batch, seq: expr.subs({BATCH: batch, SEQ: seq})


_LAMBDIFIABLE = {"Max", "Min", "floor", "ceiling"}


def _node_cost(node: fx.Node) -> NodeCost:
    zero = sympy.Integer(0)
    if node.op != "call_function" or op_facts.is_view(node):
        return NodeCost(zero, zero, "free", False)
    cost = cost_model.op_cost(node)
    value = node.meta.get("val")
    first = value[0] if isinstance(value, (tuple, list)) and value else value
    fp32 = isinstance(first, torch.Tensor) and first.dtype in (torch.float32, torch.float64)
    if cost.compute_bound:
        kind = "attention" if op_facts.is_attention(node) else "gemm"
    else:
        kind = "memory"
    return NodeCost(cost.flops, cost.bytes, kind, fp32)


BATCH = sympy.Symbol("batch", positive=True, integer=True)
SEQ = sympy.Symbol("seq", positive=True, integer=True)


def _size_symbols(gm: fx.GraphModule, batch_hint: int,
                  seq_hint: int) -> tuple[dict[sympy.Symbol, Any], list[sympy.Basic]]:
    """Every size symbol of a traced graph mapped to BATCH, SEQ (told apart by their hints) or its
    hint, and Dynamo's guards over them. Raises when no symbol stands for the sequence length."""
    mode = _compat.fake_tensor_mode_of(gm)
    env = getattr(mode, "shape_env", None)
    known, guards = {}, []
    if env is not None:
        known = getattr(env, "backed_var_to_val", None) or env.var_to_val
    mapping: dict[sympy.Symbol, Any] = {}
    for symbol, hint in known.items():
        hint = int(hint)
        mapping[symbol] = SEQ if hint == seq_hint else BATCH if hint == batch_hint else hint
    if SEQ not in mapping.values():
        raise TraceError(
            "the traced graph has no symbolic sequence length: the model's code specialises it "
            f"(treats the length {seq_hint} as a constant); the planner needs a model whose "
            "graph is the same for every sequence length")
    for guard in _compat.shape_guards(env):
        bound = guard.subs(mapping)
        if bound.free_symbols and bound.free_symbols <= {BATCH, SEQ}:
            guards.append(bound)
    return mapping, guards


class _Captured(Exception):
    pass


_trace_ids = itertools.count()


def capture_joint(fn: Callable, args: tuple, kwargs: dict) -> tuple[fx.GraphModule, int]:
    """AOTAutograd's joint graph of ``fn(*args, **kwargs)`` as torch.compile traces it (Dynamo,
    whole graph), with the dimensions ``mark_dynamic`` marked on the inputs symbolic. Nothing
    runs: the capture stops at the partition."""
    captured: list[tuple[fx.GraphModule, int]] = []

    def partition(joint, joint_inputs, **partition_kwargs):
        captured.append((joint, partition_kwargs["num_fwd_outputs"]))
        raise _Captured

    def never(gm, example_inputs):  # the capture stops before any graph is compiled
        raise _Captured

    backend = _compat.aot_autograd(fw_compiler=never, bw_compiler=never, partition_fn=partition)
    runner = with_own_code(fn, f"graphopt_plan_trace_{next(_trace_ids)}")
    try:
        torch.compile(runner, backend=backend, fullgraph=True)(*args, **kwargs)
    except Exception as err:  # _Captured arrives wrapped in Dynamo's BackendCompilerFailed
        if not captured:
            raise TraceError(f"torch.compile could not trace {getattr(fn, '__name__', fn)} for "
                             f"planning: {_first_line(err)}. The planner traces what "
                             "torch.compile(fullgraph=True) traces; fix the graph break or pass "
                             "a loss_fn that avoids it") from err
    if not captured:
        raise TraceError(f"{getattr(fn, '__name__', fn)} produced no joint graph: no parameter or "
                         "input requires a gradient")
    return captured[0]


def with_own_code(fn: Callable, name: str) -> Callable:
    """A function calling ``fn`` whose code object is its own, so that Dynamo's cache entries for
    it (and what it compiles) are kept apart from every other function's -- the model's own code,
    where the user's compiles live, or another block's."""
    def call(*args, **kwargs):
        return fn(*args, **kwargs)
    code = call.__code__.replace(co_name=name)
    return types.FunctionType(code, call.__globals__, name, None, call.__closure__)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


# --- copies of the model to trace -------------------------------------------------------------------

def _empty_copy(module: nn.Module, dtype: Optional[torch.dtype],
                shapes: Optional[dict[str, tuple[int, ...]]] = None) -> nn.Module:
    """A copy of ``module`` on the CPU whose tensors are allocated but never written (no data is
    copied, no page touched), in ``dtype`` where floating point; ``shapes`` replaces the shape of
    the named parameters (a tensor-parallel rank's local slices)."""
    memo: dict[int, Any] = {}
    for name, param in itertools.chain(module.named_parameters(), module.named_buffers()):
        shape = (shapes or {}).get(name, tuple(param.shape))
        target = dtype if dtype is not None and param.is_floating_point() else param.dtype
        value = torch.empty(shape, dtype=target, device="meta")
        memo[id(param)] = (nn.Parameter(value, requires_grad=param.requires_grad)
                           if isinstance(param, nn.Parameter) else value)
    clone = copy.deepcopy(module, memo)
    return clone.to_empty(device="cpu")


def _tp_local_shapes(block: nn.Module, plan: TensorParallelPlan, tp: int) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for name in plan.colwise:
        linear = block.get_submodule(name)
        shapes[f"{name}.weight"] = (linear.weight.shape[0] // tp, *linear.weight.shape[1:])
        if getattr(linear, "bias", None) is not None:
            shapes[f"{name}.bias"] = (linear.bias.shape[0] // tp,)
    for name in plan.rowwise:
        linear = block.get_submodule(name)
        shapes[f"{name}.weight"] = (linear.weight.shape[0], linear.weight.shape[1] // tp)
    return shapes


def tp_refusal(family: ModelFamily, block: nn.Module, tp: int) -> Optional[str]:
    """None if the block splits evenly over ``tp`` ranks, else why not."""
    if tp == 1:
        return None
    if family.tp_plan is None:
        return family.tp_refusal
    for count, what in ((family.heads, "attention heads"), (family.kv_heads, "key/value heads")):
        if count is not None and count % tp:
            return f"{count} {what} do not split over {tp} ranks"
    plan = family.tp_plan
    for name in plan.colwise:
        out = block.get_submodule(name).weight.shape[0]
        if out % tp:
            return f"{name} has {out} output features, not divisible by {tp}"
    for name in plan.rowwise:
        width = block.get_submodule(name).weight.shape[1]
        if width % tp:
            return f"{name} has {width} input features, not divisible by {tp}"
    return None


# --- the facts ---------------------------------------------------------------------------------------

class SizedTraces:
    """The traces of one part of the model, each valid over the sizes its guards allow: the first
    is at toy size; a size no trace is valid for is traced anew at that size."""

    def __init__(self, trace: Callable[[int, int], JointGraphAtSize], what: str):
        self._trace, self.what = trace, what
        self.traces: list[JointGraphAtSize] = []

    def at(self, batch: int, seq: int) -> JointGraphAtSize:
        if not self.traces:
            self.traces.append(self._trace(TRACE_BATCH, TRACE_SEQ))
        for traced in self.traces:
            if traced.invalid_at(batch, seq) is None:
                return traced
        log.info("%s: the trace at toy size is not valid at batch %d, sequence %d (%s); tracing "
                 "at that size", self.what, batch, seq, self.traces[0].invalid_at(batch, seq))
        traced = self._trace(max(batch, TRACE_BATCH), seq)
        if traced.invalid_at(batch, seq) is not None and batch == 1:
            traced = self._trace(1, seq)  # the batch of one as the constant Dynamo makes it
        problem = traced.invalid_at(batch, seq)
        if problem is not None:
            raise TraceError(f"{self.what} traced at batch {batch}, sequence {seq} is still not "
                             f"valid there: {problem}")
        self.traces.append(traced)
        return traced


@dataclasses.dataclass
class BlockFacts:
    """One block as a rank of a tensor-parallel group of ``tp`` computes it."""

    tp: int
    traces: SizedTraces
    params: int                      # parameters of the block on one rank
    sites: "TensorParallelSites"


@dataclasses.dataclass(frozen=True)
class TensorParallelSites:
    """The block's tensor-parallel collectives per token (plain Megatron TP, all-reduce):
    forward, each row-parallel linear's output (its GEMM: k local input features -> n);
    backward, the input gradient of each group of column-parallel linears (a sum of their GEMMs)."""

    forward: tuple[tuple[int, int], ...]   # (n, k_local) per row-parallel linear
    backward: tuple[int, ...]              # feature width of each column-parallel group's input


class ModelFacts:
    """A model as the layout planner sees it: blocks, head, parameters, tensor-parallel plan.

    Blocks are traced lazily per tensor-parallel degree (``block(tp)``); the head once."""

    def __init__(self, model: nn.Module, loss_fn: Optional[LossFn] = None,
                 compute_dtype: Optional[torch.dtype] = None):
        self.family = detect_family(model)
        self.loss_fn = loss_fn or default_loss_fn(model)
        self.model_name = type(model).__name__
        params = list(model.parameters())
        if not params:
            raise TraceError(f"{self.model_name} has no parameters to train")
        self.param_dtype = params[0].dtype
        self.compute_dtype = compute_dtype or self.param_dtype
        blocks = blocks_of(model, self.family)
        self.n_blocks = len(blocks)
        self._block = blocks[0]
        self.block_params = sum(p.numel() for p in self._block.parameters())
        self.total_params = sum(p.numel() for p in params)
        self.head_params = self.total_params - self.n_blocks * self.block_params
        # parameters a token's forward multiplies with (all but embedding tables that no linear
        # shares): the 6 N of the usual model-FLOPs count
        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        embeddings -= {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
        self.matmul_params = self.total_params - sum(p.numel() for p in params if id(p) in embeddings)
        self._model = model
        self._blocks: dict[int, BlockFacts] = {}
        self._head = SizedTraces(self._trace_head, "head")
        self._head_model: Optional[nn.Module] = None
        self._block_calls: dict[tuple[int, int], tuple[tuple, dict]] = {}

    @property
    def tp_plan(self) -> Optional[TensorParallelPlan]:
        return self.family.tp_plan

    def tp_refusal(self, tp: int) -> Optional[str]:
        return tp_refusal(self.family, self._block, tp)

    def block(self, tp: int = 1) -> BlockFacts:
        facts = self._blocks.get(tp)
        if facts is None:
            facts = self._trace_block(tp)
            self._blocks[tp] = facts
        return facts

    def head(self, batch: int, seq: int) -> JointGraphAtSize:
        """The head's joint graph, valid at (batch, seq)."""
        return self._head.at(batch, seq)

    def describe(self) -> dict[str, Any]:
        return {"model": self.model_name, "family": self.family.name, "blocks": self.n_blocks,
                "block_params": self.block_params, "head_params": self.head_params,
                "total_params": self.total_params, "param_dtype": str(self.param_dtype),
                "compute_dtype": str(self.compute_dtype),
                "tensor_parallel_plan": (self.tp_plan.source if self.tp_plan
                                         else f"none: {self.family.tp_refusal}")}

    # -- tracing --

    def _trace_block(self, tp: int) -> BlockFacts:
        why_not = self.tp_refusal(tp)
        if why_not is not None:
            raise TraceError(f"tensor-parallel degree {tp}: {why_not}")
        shapes = _tp_local_shapes(self._block, self.tp_plan, tp) if tp > 1 else None
        block = _empty_copy(self._block, self.compute_dtype, shapes)

        def trace(batch: int, seq: int) -> JointGraphAtSize:
            args, kwargs = self._block_inputs(batch, seq)
            return JointGraphAtSize(*capture_joint(block, args, kwargs), batch, seq)

        params = sum(p.numel() for p in block.parameters())
        return BlockFacts(tp, SizedTraces(trace, f"block (tp={tp})"), params, self._sites(tp))

    def _sites(self, tp: int) -> TensorParallelSites:
        plan = self.tp_plan
        if plan is None or tp == 1:
            return TensorParallelSites((), ())
        forward = tuple((self._block.get_submodule(n).weight.shape[0],
                         self._block.get_submodule(n).weight.shape[1] // tp) for n in plan.rowwise)
        backward = tuple(self._block.get_submodule(group[0]).weight.shape[1]
                         for group in plan.colwise_groups())
        return TensorParallelSites(forward, backward)

    def _block_inputs(self, batch: int, seq: int) -> tuple[tuple, dict]:
        """What the first block receives when the step runs at (batch, seq): captured from a run of
        the loss function on fake tensors, made into inputs with symbolic batch / sequence dims."""
        call = self._block_calls.get((batch, seq))
        if call is None:
            call = self._block_calls[(batch, seq)] = self._capture_block_call(batch, seq)
        fake_args, fake_kwargs = call
        args = tuple(_trace_input(a, batch, seq) for a in fake_args)
        kwargs = {k: _trace_input(v, batch, seq) for k, v in fake_kwargs.items()}
        if self.family.block_mask_is_none and "attention_mask" in kwargs:
            kwargs["attention_mask"] = None
        return args, kwargs

    def _capture_block_call(self, batch: int, seq: int) -> tuple[tuple, dict]:
        model = _meta_copy(self._model, self.compute_dtype)
        seen: dict[str, Any] = {}

        def record(module, args, kwargs):
            seen["call"] = (args, kwargs)
            raise _Captured

        blocks_of(model, self.family)[0].register_forward_pre_hook(record, with_kwargs=True)
        with _compat.fake_tensor_mode():
            tokens = torch.zeros(batch, seq, dtype=torch.long, device="meta")
            try:
                self.loss_fn(model, tokens)
            except _Captured:
                pass
        if "call" not in seen:
            raise TraceError(f"the loss function never called the first block of {self.model_name} "
                             f"({self.family.blocks_path}[0])")
        return seen["call"]

    def _trace_head(self, batch: int, seq: int) -> JointGraphAtSize:
        if self._head_model is None:
            self._head_model = _meta_copy(self._model, self.compute_dtype,
                                          skip_blocks=self.family.blocks_path).to_empty(device="cpu")
        tokens = torch.zeros(batch, seq, dtype=torch.long)
        if batch > 1:
            torch._dynamo.mark_dynamic(tokens, 0)
        torch._dynamo.mark_dynamic(tokens, 1)
        gm, outputs = capture_joint(functools.partial(self.loss_fn, self._head_model), (tokens,), {})
        return JointGraphAtSize(gm, outputs, batch, seq)


class _PassThrough(nn.Module):
    """Stands in for a block when the head is traced: returns the hidden states it receives."""

    def forward(self, *args, **kwargs):
        return args[0] if args else kwargs["hidden_states"]


def _meta_copy(model: nn.Module, dtype: torch.dtype, skip_blocks: Optional[str] = None) -> nn.Module:
    """A meta-device copy of ``model`` (no data copied); with ``skip_blocks``, its blocks replaced
    by pass-throughs."""
    blocks = _get(model, skip_blocks) if skip_blocks else None
    memo: dict[int, Any] = {}
    if blocks is not None:
        memo[id(blocks)] = nn.ModuleList(_PassThrough() for _ in blocks)
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if id(tensor) in memo:
            continue
        target = dtype if tensor.is_floating_point() else tensor.dtype
        value = torch.empty(tensor.shape, dtype=target, device="meta")
        memo[id(tensor)] = (nn.Parameter(value, requires_grad=tensor.requires_grad)
                            if isinstance(tensor, nn.Parameter) else value)
    return copy.deepcopy(model, memo)


def _trace_input(value: Any, batch: int, seq: int) -> Any:
    """A CPU tensor shaped like the captured (fake) ``value``, its batch and sequence dims marked
    dynamic; tuples and lists element by element."""
    if isinstance(value, (tuple, list)):
        return type(value)(_trace_input(v, batch, seq) for v in value)
    if not isinstance(value, torch.Tensor):
        return value
    tensor = torch.zeros(tuple(value.shape), dtype=value.dtype)
    if value.requires_grad:
        tensor.requires_grad_(True)
    for dim, size in enumerate(value.shape):
        if size == seq or (dim == 0 and size == batch and batch > 1):
            torch._dynamo.mark_dynamic(tensor, dim)
    return tensor


def trace_model(model: nn.Module, loss_fn: Optional[LossFn] = None,
                compute_dtype: Optional[torch.dtype] = None) -> ModelFacts:
    """The planner's view of ``model`` (traced lazily, per tensor-parallel degree).

    ``loss_fn(model, tokens)`` is the training step's loss (defaults for the known families);
    ``compute_dtype`` the dtype the step computes in (default: the parameters' dtype)."""
    return ModelFacts(model, loss_fn, compute_dtype)

