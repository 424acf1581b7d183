"""Proves what an attention mask is, from the graph that builds it.

A mask is a function m(b, h, q, k) -> may query q see key k. Models build it in the graph from
positions (``arange``, ``cache_position``, ``position_ids``), and every transformers version builds
it differently: 5.x broadcasts mask functions over index tensors (``kv_idx <= q_idx``, 5.2x through
``position_ids[b, idx]``), 4.53-4.57 vmap the same functions (``_add_batch_dim`` /
``_remove_batch_dim``), 4.4x-4.52 fill ``triu(full(min), 1)`` and multiply it by
``arange > cache_position``; eager attention turns the boolean into ``where(m, 0, finfo.min)``.
Rather than one pattern per version, the mask's subgraph is interpreted abstractly:

    every tensor  ->  a function from its index variables (and vmap levels) to a symbolic element
    element       ->  integer: affine in index variables and reads of data the analysis cannot see
                      into (``position_ids[b, q]``), or a select between two such
                      boolean: and / or / not of ``e <= 0``, ``e == 0``, ``e != 0`` (e affine)
                      float: a piecewise constant (``where(m, 0.0, -3.4e38)``)

The mask's element at symbolic (b, h, q, k) is normalised to a conjunction and matched against the
structures graphopt has kernels for:

    causal                  k <= q
    sliding window W        k <= q  and  q - k <= W - 1
    documents               k <= q  and  seg[b, q] == seg[b, k]
    documents + window
    none                    every key visible (an all-true mask)

where seg = cumsum(diff(P, prepend=P[:, :1] - 1) != 1) (transformers' packed-sequence ids): the
cumsum is recognised from what it sums -- false at index 0, ``P[i] - P[i-1] != 1`` after -- so any
spelling of "a new document where positions do not advance by one" is. One theorem is used beyond
algebra: seg[i] == seg[j] implies P[i] - P[j] == i - j (no reset between them), so a comparison of
positions of two tokens of one document is a comparison of their indices (5.2x compares
``P[b, k] <= P[b, q]``).

An additive mask value counts as masking when it is -inf or at most ``MASKED_ADDITIVE_MAX``
(float16's most negative finite value; transformers adds ``finfo(dtype).min``): softmax gives such a
key weight exp(s + v - max) = 0 exactly in float32 whenever |scores| < |v| / 2 - 52, and a row of
these masks always keeps its diagonal, so no row is all masked.

Where the mask is none of these, or a step of its construction is not understood (an op the
interpreter does not know, nonlinear index arithmetic, an index that may wrap, an in-place write the
values depend on), :class:`Unproven` names the node and the reason.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from typing import Any, Callable, Optional, Union

import torch
import torch.fx as fx

from graphopt import _compat
from graphopt.analysis.torch_ir import FACTORY_KWARGS, OpSpec, spec

MASKED_ADDITIVE_MAX = float(torch.finfo(torch.float16).min)  # -65504.0


class Unproven(Exception):
    """A mask whose structure cannot be proven; ``node`` is where the analysis stopped."""

    def __init__(self, node: Optional[fx.Node], reason: str):
        self.node = node
        self.reason = reason
        super().__init__(f"{node.name}: {reason}" if node is not None else reason)


# --- symbolic integers: affine forms over index variables and opaque reads ---------------------

@dataclasses.dataclass(frozen=True)
class Var:
    """An index variable (an axis of the tensor being evaluated, or a vmap level)."""

    name: str

    def key(self) -> tuple:
        return (0, self.name)

    def __repr__(self) -> str:
        return self.name


@dataclasses.dataclass(frozen=True, eq=False)
class Read:
    """An element of a tensor whose values are data: ``source[index]``."""

    source: fx.Node
    index: tuple  # of Lin
    kind: str     # "int" | "bool" | "float"

    def key(self) -> tuple:
        return (1, self.source.name, repr(self.index))

    def __eq__(self, other) -> bool:
        return (isinstance(other, Read) and other.source is self.source
                and other.index == self.index and other.kind == self.kind)

    def __hash__(self) -> int:
        return hash((id(self.source), self.index, self.kind))

    def __repr__(self) -> str:
        return f"{self.source.name}[{', '.join(map(repr, self.index))}]"


Term = Union[Var, Read]


@dataclasses.dataclass(frozen=True)
class Lin:
    """sum(coeff * term) + const, terms sorted, no zero coefficients."""

    terms: tuple = ()
    const: int = 0

    @staticmethod
    def of(coeffs: dict, const: int = 0) -> "Lin":
        items = sorted(((t, c) for t, c in coeffs.items() if c), key=lambda tc: tc[0].key())
        return Lin(tuple(items), int(const))

    def coeffs(self) -> dict:
        return dict(self.terms)

    def plus(self, other: "Lin") -> "Lin":
        merged = self.coeffs()
        for term, coeff in other.terms:
            merged[term] = merged.get(term, 0) + coeff
        return Lin.of(merged, self.const + other.const)

    def times(self, factor: int) -> "Lin":
        return Lin.of({t: c * factor for t, c in self.terms}, self.const * factor)

    def substitute(self, mapping: dict) -> "Lin":
        """Variables replaced by Lins (reads' indices too)."""
        result = Lin((), self.const)
        for term, coeff in self.terms:
            if isinstance(term, Var):
                part = mapping.get(term, Lin(((term, 1),)))
            else:
                part = Lin(((Read(term.source, tuple(i.substitute(mapping) for i in term.index),
                                  term.kind), 1),))
            result = result.plus(part.times(coeff))
        return result

    @property
    def is_const(self) -> bool:
        return not self.terms

    def __repr__(self) -> str:
        parts = []
        for term, coeff in self.terms:
            sign = "-" if coeff < 0 else "+"
            body = repr(term) if abs(coeff) == 1 else f"{abs(coeff)}*{term!r}"
            parts.append((sign, body))
        if self.const or not parts:
            parts.append(("-" if self.const < 0 else "+", str(abs(self.const))))
        text = "".join(f" {s} {b}" for s, b in parts).strip()
        return text[2:] if text.startswith("+ ") else "-" + text[2:]


def _lin(value: Union[int, Term]) -> Lin:
    return Lin((), int(value)) if isinstance(value, int) else Lin(((value, 1),))


@dataclasses.dataclass(frozen=True)
class Select:
    """``then`` where ``cond`` holds, else ``other`` (integers, or piecewise-constant floats)."""

    cond: Any
    then: Any
    other: Any


# --- symbolic booleans ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BConst:
    value: bool

    def __repr__(self) -> str:
        return str(self.value)


@dataclasses.dataclass(frozen=True)
class Cmp:
    """``lin <op> 0`` with op one of "le", "eq", "ne"."""

    op: str
    lin: Lin

    def __repr__(self) -> str:
        return f"{self.lin!r} {dict(le='<=', eq='==', ne='!=')[self.op]} 0"


@dataclasses.dataclass(frozen=True)
class BRead:
    read: Read
    negated: bool = False

    def __repr__(self) -> str:
        return ("~" if self.negated else "") + repr(self.read)


@dataclasses.dataclass(frozen=True)
class And:
    items: frozenset

    def __repr__(self) -> str:
        return " & ".join(sorted(f"({x!r})" for x in self.items))


@dataclasses.dataclass(frozen=True)
class Or:
    items: frozenset

    def __repr__(self) -> str:
        return " | ".join(sorted(f"({x!r})" for x in self.items))


TRUE, FALSE = BConst(True), BConst(False)


# --- symbolic floats: piecewise constants (Select of FConst leaves) ---------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FConst:
    value: float

    def __eq__(self, other) -> bool:  # nan == nan here: equal leaves merge
        return isinstance(other, FConst) and (
            self.value == other.value or (math.isnan(self.value) and math.isnan(other.value)))

    def __hash__(self) -> int:
        return hash("nan" if math.isnan(self.value) else self.value)

    def __repr__(self) -> str:
        return repr(self.value)


# --- results --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Documents:
    """Packed documents: a new one starts wherever ``positions`` does not advance by one.

    ``positions`` is [Bp, S] (or [S]); ``row`` is the one row every batch element uses, or None
    when batch element b uses row b."""

    positions: fx.Node
    row: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class MaskStructure:
    """What a proven mask lets query q see: keys k <= q when causal, at most ``window - 1``
    positions back, inside the query's document."""

    causal: bool
    window: Optional[int] = None
    documents: Optional[Documents] = None

    @property
    def kind(self) -> str:
        if not self.causal:
            return "none"
        parts = ["causal"] + (["documents"] if self.documents else []) + (
            [f"window {self.window}"] if self.window else [])
        return " + ".join(parts)

    @property
    def plain(self) -> bool:
        """Only what SDPA's is_causal (or no mask) expresses."""
        return self.window is None and self.documents is None


# --- the interpreter -------------------------------------------------------------------------------

def _kind_of(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    return "float" if dtype.is_floating_point else "int"


@dataclasses.dataclass
class Abstract:
    """A tensor as the analysis sees it: its shape and the symbolic element at an index.

    ``element(index, levels)``: index is a tuple of Lin (one per dim), levels maps vmap levels to
    the Lin of their batch index."""

    shape: tuple
    kind: str
    element: Callable[[tuple, tuple], Any]


@dataclasses.dataclass(frozen=True)
class _Segmentation:
    """A cumsum recognised as document ids of ``positions``: seg[idx] has the document of
    positions[template(idx)]; ``template`` is Lin in the cumsum's own index variables ``axes``."""

    positions: fx.Node
    axes: tuple     # of Var, one per dim of the cumsum
    template: tuple  # Lin per dim of positions, in terms of axes
    dim: int         # the cumsum's dim (the sequence)


def _sym_text(size) -> str:
    return str(size.node.expr) if _compat.is_symbolic(size) else str(int(size))


def _same_size(a, b) -> bool:
    return _sym_text(a) == _sym_text(b)


def _int_size(size) -> Optional[int]:
    return None if _compat.is_symbolic(size) else int(size)


# Ops, as data. The interpreter's handler for each is ``_op_<name>``.
OPS: tuple[OpSpec, ...] = (
    spec("arange", [torch.arange], params=("a", "b", "step"), ignored_kwargs=FACTORY_KWARGS,
         b=None, step=1),
    spec("full", [torch.full], params=("size", "fill_value"), ignored_kwargs=FACTORY_KWARGS),
    spec("ones", [torch.ones], params=("size",), ignored_kwargs=FACTORY_KWARGS, varargs=True),
    spec("zeros", [torch.zeros], params=("size",), ignored_kwargs=FACTORY_KWARGS, varargs=True),
    spec("new_full", methods=["new_full"], params=("input", "size", "fill_value"),
         ignored_kwargs=FACTORY_KWARGS),
    spec("new_ones", methods=["new_ones"], params=("input", "size"), ignored_kwargs=FACTORY_KWARGS,
         varargs=True),
    spec("new_zeros", methods=["new_zeros"], params=("input", "size"),
         ignored_kwargs=FACTORY_KWARGS, varargs=True),
    spec("full_like", [torch.full_like], params=("input", "fill_value"),
         ignored_kwargs=FACTORY_KWARGS),
    spec("ones_like", [torch.ones_like], params=("input",), ignored_kwargs=FACTORY_KWARGS),
    spec("zeros_like", [torch.zeros_like], params=("input",), ignored_kwargs=FACTORY_KWARGS),
    spec("scalar_tensor", [torch.tensor, torch.scalar_tensor], params=("fill_value",),
         ignored_kwargs=FACTORY_KWARGS),
    spec("add", [operator.add, torch.add], ["add", "__add__", "__radd__"], ("input", "other")),
    spec("sub", [operator.sub, torch.sub], ["sub", "__sub__"], ("input", "other")),
    spec("rsub", methods=["__rsub__"], params=("input", "other")),
    spec("mul", [operator.mul, torch.mul], ["mul", "__mul__", "__rmul__"], ("input", "other")),
    spec("neg", [operator.neg, torch.neg], ["neg", "__neg__"], ("input",)),
    spec("iadd", [operator.iadd], ["add_", "__iadd__"], ("input", "other")),
    spec("isub", [operator.isub], ["sub_", "__isub__"], ("input", "other")),
    spec("imul", [operator.imul], ["mul_", "__imul__"], ("input", "other")),
    spec("iand", [operator.iand], ["logical_and_", "bitwise_and_", "__iand__"], ("input", "other")),
    spec("ior", [operator.ior], ["logical_or_", "bitwise_or_", "__ior__"], ("input", "other")),
    spec("le", [operator.le, torch.le], ["le", "__le__"], ("input", "other")),
    spec("lt", [operator.lt, torch.lt], ["lt", "__lt__"], ("input", "other")),
    spec("ge", [operator.ge, torch.ge], ["ge", "__ge__"], ("input", "other")),
    spec("gt", [operator.gt, torch.gt], ["gt", "__gt__"], ("input", "other")),
    spec("eq", [operator.eq, torch.eq], ["eq", "__eq__"], ("input", "other")),
    spec("ne", [operator.ne, torch.ne], ["ne", "__ne__"], ("input", "other")),
    spec("and", [operator.and_, torch.logical_and, torch.bitwise_and],
         ["__and__", "__rand__", "logical_and", "bitwise_and"], ("input", "other")),
    spec("or", [operator.or_, torch.logical_or, torch.bitwise_or],
         ["__or__", "__ror__", "logical_or", "bitwise_or"], ("input", "other")),
    spec("not", [operator.invert, torch.logical_not, torch.bitwise_not],
         ["__invert__", "logical_not", "bitwise_not"], ("input",)),
    spec("where", [torch.where], params=("condition", "input", "other")),
    spec("masked_fill", [torch.masked_fill], ["masked_fill"], ("input", "mask", "value")),
    spec("cast", methods=["to", "type", "float", "double", "half", "bfloat16", "bool", "long",
                          "int", "contiguous", "clone", "detach", "type_as", "cpu", "cuda"],
         params=("input", "target"), ignored_kwargs=FACTORY_KWARGS + ("non_blocking", "copy"),
         target=None),
    spec("cast_fn", [torch.clone, torch.detach], params=("input",),
         ignored_kwargs=("memory_format",)),
    spec("unsqueeze", [torch.unsqueeze], ["unsqueeze"], ("input", "dim")),
    spec("squeeze", [torch.squeeze], ["squeeze"], ("input", "dim"), dim=None),
    spec("reshape", [torch.reshape], ["reshape", "view"], ("input", "shape"), varargs=True),
    spec("expand", methods=["expand"], params=("input", "size"), varargs=True),
    spec("expand_as", methods=["expand_as"], params=("input", "other")),
    spec("transpose", [torch.transpose], ["transpose"], ("input", "dim0", "dim1")),
    spec("permute", [torch.permute], ["permute"], ("input", "dims"), varargs=True),
    spec("getitem", [operator.getitem], params=("input", "index")),
    spec("index", [torch.ops.aten.index.Tensor, torch.ops.aten.index], params=("input", "indices")),
    spec("triu", [torch.triu], ["triu"], ("input", "diagonal"), diagonal=0),
    spec("tril", [torch.tril], ["tril"], ("input", "diagonal"), diagonal=0),
    spec("diff", [torch.diff], ["diff"], ("input", "n", "dim", "prepend", "append"), n=1, dim=-1,
         prepend=None, append=None),
    spec("cat", [torch.cat, torch.concat], params=("tensors", "dim"), dim=0),
    spec("cumsum", [torch.cumsum], ["cumsum"], ("input", "dim"), ignored_kwargs=("dtype",)),
    spec("add_batch_dim", _compat.vmap_add_batch_dim_functions(), params=("input", "in_dim", "level")),
    spec("remove_batch_dim", _compat.vmap_remove_batch_dim_functions(),
         params=("input", "level", "batch_size", "out_dim")),
)
_INPLACE = {"iadd": "add", "isub": "sub", "imul": "mul", "iand": "and", "ior": "or"}
_VIEW_OPS = {"getitem", "reshape", "expand", "expand_as", "unsqueeze", "squeeze", "transpose",
             "permute", "cast"}
_COMPARISONS = {"le", "lt", "ge", "gt", "eq", "ne"}


def _is_inplace(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in (operator.setitem, operator.iadd, operator.isub, operator.imul,
                               operator.iand, operator.ior, operator.itruediv)
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.endswith("__")
    return False


class _Interpreter:
    """Abstract values of the nodes of one graph, computed on demand and cached."""

    def __init__(self, graph: fx.Graph):
        self.values: dict[fx.Node, Abstract] = {}
        self.ranges: dict[Var, Any] = {}         # variable -> size of the axis it indexes
        self.origins: dict[Any, fx.Node] = {}    # atom -> the comparison node that made it
        self.segments: dict[fx.Node, _Segmentation] = {}
        self.order = {node: i for i, node in enumerate(graph.nodes)}
        self.writes, self.written_through_views = self._mutations(graph)
        self._fresh = 0

    @staticmethod
    def _mutations(graph: fx.Graph) -> tuple[dict, set]:
        """In-place writes: for each tensor written directly, its writers in graph order; and the
        tensors whose data change through a view of them (their values are not modelled)."""
        writes: dict = {}
        through_views: set = set()
        for node in graph.nodes:
            if not (_is_inplace(node) and node.args and isinstance(node.args[0], fx.Node)):
                continue
            writes.setdefault(node.args[0], []).append(node)
            base = node.args[0]
            while True:
                op = _op_of(base)
                if op is None or op.name not in _VIEW_OPS or not isinstance(base.args[0], fx.Node):
                    break
                base = base.args[0]
                through_views.add(base)
        return writes, through_views

    def read(self, arg: fx.Node, reader: fx.Node) -> Abstract:
        """The value of ``arg`` as ``reader`` sees it: after the in-place writes before it."""
        if arg in self.written_through_views:
            raise Unproven(arg, "is written in place through a view of it; its values where "
                                f"{reader.name} reads them are not modelled")
        earlier = [w for w in self.writes.get(arg, ()) if self.order[w] < self.order[reader]]
        if not earlier:
            return self.value(arg)
        writer = earlier[-1]
        if _op_of(writer) is None or _op_of(writer).name not in _INPLACE:
            raise Unproven(writer, f"writes {arg.name} in place in a way the analysis does "
                                   "not model")
        return self.value(writer)

    # --- variables ---
    def var(self, stem: str, size) -> Lin:
        """A fresh index variable over [0, size); a size-1 axis has index 0."""
        if _int_size(size) == 1:
            return Lin((), 0)
        self._fresh += 1
        var = Var(f"{stem}" if stem in ("b", "h", "q", "k") else f"{stem}{self._fresh}")
        if var in self.ranges and not _same_size(self.ranges[var], size):
            var = Var(f"{stem}{self._fresh}")
        self.ranges[var] = size
        return _lin(var)

    def interval(self, lin: Lin) -> tuple[Optional[int], Optional[int]]:
        lo = hi = lin.const
        for term, coeff in lin.terms:
            size = self.ranges.get(term) if isinstance(term, Var) else None
            upper = None if size is None else _int_size(size)
            t_lo = 0 if size is not None else None
            t_hi = None if upper is None else upper - 1
            bounds = (t_lo, t_hi) if coeff > 0 else (t_hi, t_lo)
            lo = None if lo is None or bounds[0] is None else lo + coeff * bounds[0]
            hi = None if hi is None or bounds[1] is None else hi + coeff * bounds[1]
        return lo, hi

    def within(self, lin: Lin, size) -> bool:
        """Whether 0 <= lin < size for every value of its variables."""
        lo, hi = self.interval(lin)
        if lo is not None and hi is not None and _int_size(size) is not None:
            return lo >= 0 and hi < _int_size(size)
        if len(lin.terms) == 1 and lin.const == 0 and lin.terms[0][1] == 1:
            term = lin.terms[0][0]
            return isinstance(term, Var) and term in self.ranges and _same_size(
                self.ranges[term], size)
        return False

    # --- integer algebra ---
    def add(self, x, y):
        if isinstance(x, Select):
            return self.sel(x.cond, self.add(x.then, y), self.add(x.other, y))
        if isinstance(y, Select):
            return self.sel(y.cond, self.add(x, y.then), self.add(x, y.other))
        return x.plus(y)

    def scale(self, x, factor: int):
        if isinstance(x, Select):
            return self.sel(x.cond, self.scale(x.then, factor), self.scale(x.other, factor))
        return x.times(factor)

    def sel(self, cond, then, other):
        """An integer or float select, simplified."""
        if cond == TRUE or then == other:
            return then
        if cond == FALSE:
            return other
        if isinstance(then, Select) and then.cond == cond:
            then = then.then
        if isinstance(other, Select) and other.cond == cond:
            other = other.other
        return Select(cond, then, other)

    def cmp(self, op: str, x, y):
        """x <op> y for integer expressions; op among le lt ge gt eq ne."""
        if op in ("ge", "gt"):
            x, y, op = y, x, {"ge": "le", "gt": "lt"}[op]
        diff = self.add(x, self.scale(y, -1))
        if op == "lt":
            diff, op = self.add(diff, Lin((), 1)), "le"
        return self._cmp_zero(op, diff)

    def _cmp_zero(self, op: str, diff):
        if isinstance(diff, Select):
            return self.or_(self.and_(diff.cond, self._cmp_zero(op, diff.then)),
                            self.and_(self.not_(diff.cond), self._cmp_zero(op, diff.other)))
        return self.atom(op, diff)

    def atom(self, op: str, lin: Lin):
        if lin.terms:
            g = functools.reduce(math.gcd, (abs(c) for _, c in lin.terms))
            if op == "le":
                lin = Lin(tuple((t, c // g) for t, c in lin.terms), -((-lin.const) // g))
            elif lin.const % g:
                return FALSE if op == "eq" else TRUE
            else:
                lin = Lin(tuple((t, c // g) for t, c in lin.terms), lin.const // g)
                if lin.terms[0][1] < 0:
                    lin = lin.times(-1)
        lo, hi = self.interval(lin)
        if op == "le":
            if hi is not None and hi <= 0:
                return TRUE
            if lo is not None and lo > 0:
                return FALSE
        else:
            zero_only = lo == 0 and hi == 0
            excludes_zero = (lo is not None and lo > 0) or (hi is not None and hi < 0)
            if zero_only or excludes_zero:
                return BConst((op == "eq") == zero_only)
        return Cmp(op, lin)

    # --- boolean algebra ---
    def not_(self, b):
        if isinstance(b, BConst):
            return BConst(not b.value)
        if isinstance(b, Cmp):
            if b.op == "le":
                return self.atom("le", b.lin.times(-1).plus(Lin((), 1)))
            return self.atom("ne" if b.op == "eq" else "eq", b.lin)
        if isinstance(b, BRead):
            return BRead(b.read, not b.negated)
        if isinstance(b, And):
            return self.or_(*(self.not_(x) for x in b.items))
        return self.and_(*(self.not_(x) for x in b.items))

    def _operands(self, items, connective, absorbing: BConst) -> Optional[set]:
        """The operands of an and (or) -- nested ones flattened, the neutral constant dropped -- or
        None where one is ``absorbing`` or two are complementary (the result is then absorbing)."""
        flat: set = set()
        for item in items:
            if item == absorbing:
                return None
            if item != BConst(not absorbing.value):
                flat |= set(item.items) if isinstance(item, connective) else {item}
        if any(self.not_(x) in flat for x in flat if not isinstance(x, (And, Or))):
            return None
        return flat

    def and_(self, *items):
        flat = self._operands(items, And, FALSE)
        if flat is None:
            return FALSE
        if not flat:
            return TRUE
        return next(iter(flat)) if len(flat) == 1 else And(frozenset(flat))

    def or_(self, *items):
        terms = self._operands(items, Or, TRUE)
        if terms is None:
            return TRUE
        conjunctions = {frozenset(t.items) if isinstance(t, And) else frozenset({t})
                        for t in terms}
        changed = True
        while changed and len(conjunctions) > 1:
            changed = False
            for a in list(conjunctions):
                for b in list(conjunctions):
                    if a is b or a not in conjunctions or b not in conjunctions:
                        continue
                    if a < b:  # a | (a & c) == a
                        conjunctions.discard(b)
                        changed = True
                    elif len(a - b) == 1 and len(b - a) == 1 and \
                            self.not_(next(iter(a - b))) == next(iter(b - a)):
                        conjunctions -= {a, b}  # (a & c) | (a & ~c) == a
                        conjunctions.add(a & b)
                        changed = True
        if frozenset() in conjunctions:
            return TRUE
        merged = [self.and_(*c) for c in conjunctions]
        if not merged:
            return FALSE
        return merged[0] if len(merged) == 1 else Or(frozenset(merged))

    def select(self, kind: str, cond, then, other):
        if kind == "bool":
            return self.or_(self.and_(cond, then), self.and_(self.not_(cond), other))
        return self.sel(cond, then, other)

    # --- float algebra (piecewise constants) ---
    def fmap(self, node: fx.Node, fn: Callable[..., float], *operands):
        """fn applied leaf-wise to piecewise-constant floats."""
        for i, x in enumerate(operands):
            if isinstance(x, Select):
                pick = lambda branch: operands[:i] + (branch,) + operands[i + 1:]  # noqa: E731
                return self.sel(x.cond, self.fmap(node, fn, *pick(x.then)),
                                 self.fmap(node, fn, *pick(x.other)))
            if not isinstance(x, FConst):
                raise Unproven(node, f"computes with float data ({x!r}), not constants")
        return FConst(fn(*(x.value for x in operands)))

    def truth(self, node: fx.Node, x):
        """A float element as a boolean (nonzero)."""
        if isinstance(x, Select):
            return self.select("bool", x.cond, self.truth(node, x.then), self.truth(node, x.other))
        if isinstance(x, FConst):
            return BConst(x.value != 0)
        raise Unproven(node, f"tests float data ({x!r})")

    # --- conversions between element kinds ---
    def convert(self, node: fx.Node, x, source: str, target: str):
        if source == target:
            return x
        if source == "bool":
            one, zero = (Lin((), 1), Lin((), 0)) if target == "int" else (FConst(1.0), FConst(0.0))
            return self.select(target, x, one, zero)
        if source == "int" and target == "bool":
            return self.cmp("ne", x, Lin((), 0))
        if source == "int":  # -> float
            if isinstance(x, Select):
                return self.sel(x.cond, self.convert(node, x.then, "int", "float"),
                                 self.convert(node, x.other, "int", "float"))
            if x.is_const:
                return FConst(float(x.const))
            raise Unproven(node, f"turns index data {x!r} into floats")
        if target == "bool":
            return self.truth(node, x)
        if isinstance(x, Select):  # float -> int
            return self.sel(x.cond, self.convert(node, x.then, "float", "int"),
                             self.convert(node, x.other, "float", "int"))
        if isinstance(x, FConst) and math.isfinite(x.value):
            return Lin((), int(x.value))
        raise Unproven(node, f"turns float {x!r} into integers")

    def constant(self, node: fx.Node, value, kind: str):
        if isinstance(value, fx.Node):
            return self.scalar(value, kind)
        if isinstance(value, bool):
            return self.convert(node, BConst(value), "bool", kind)
        if isinstance(value, int):
            return self.convert(node, Lin((), value), "int", kind)
        if isinstance(value, float):
            if kind == "float":
                return FConst(value)
            if value.is_integer():
                return self.convert(node, Lin((), int(value)), "int", kind)
        raise Unproven(node, f"uses the constant {value!r}, which the analysis does not model")

    def scalar(self, node: fx.Node, kind: str):
        """A SymInt (or plain int) node as an integer expression converted to ``kind``."""
        value = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(value, bool):
            return self.convert(node, BConst(value), "bool", kind)
        if isinstance(value, int):
            return self.convert(node, Lin((), value), "int", kind)
        if isinstance(value, torch.SymInt):
            return self.convert(node, _lin(Read(node, (), "int")), "int", kind)
        raise Unproven(node, "is a scalar the analysis does not model")

    # --- node values ---
    def value(self, node: Any) -> Abstract:
        if not isinstance(node, fx.Node):
            raise TypeError(node)
        cached = self.values.get(node)
        if cached is None:
            cached = self._interpret(node)
            self.values[node] = cached
        return cached

    def _interpret(self, node: fx.Node) -> Abstract:
        fake = node.meta.get("example_value", node.meta.get("val"))
        if not isinstance(fake, torch.Tensor):
            return Abstract((), "int", lambda idx, lv: self.scalar(node, "int"))
        shape, kind = tuple(fake.shape), _kind_of(fake.dtype)
        op = _op_of(node)
        if op is None:
            return self._opaque(node, shape, kind)
        args = op.bind(node)
        if op.name in _COMPARISONS:
            element = self._compare(node, args, shape, op.name)
        else:
            # x op= y is x op y: the writer's node is what later readers of x see (``read``).
            name = _INPLACE.get(op.name, op.name).replace("_fn", "")
            element = getattr(self, "_op_" + name)(node, args, shape, kind)
        cache: dict = {}

        def memo(idx, levels):
            key = (idx, levels)
            if key not in cache:
                cache[key] = element(idx, levels)
            return cache[key]
        return Abstract(shape, kind, memo)

    def _opaque(self, node: fx.Node, shape, kind) -> Abstract:
        return Abstract(shape, kind, lambda idx, lv: self._read(node, idx, kind))

    @staticmethod
    def _read(node: fx.Node, idx, kind):
        read = Read(node, tuple(idx), kind)
        if kind == "int":
            return _lin(read)
        if kind == "bool":
            return BRead(read)
        return read  # float data: any arithmetic on it is refused

    def operand(self, node: fx.Node, arg, kind: str, shape) -> Callable:
        """An element function of ``arg`` broadcast to ``shape``, converted to ``kind``."""
        if not isinstance(arg, fx.Node):
            constant = self.constant(node, arg, kind)
            return lambda idx, lv: constant
        value = self.read(arg, node)
        if not value.shape and not isinstance(arg.meta.get("example_value", arg.meta.get("val")),
                                              torch.Tensor):
            return lambda idx, lv: self.scalar(arg, kind)
        offset = len(shape) - len(value.shape)

        def element(idx, levels):
            own = tuple(Lin((), 0) if _int_size(size) == 1 else i
                        for i, size in zip(idx[offset:], value.shape))
            return self.convert(node, value.element(own, levels), value.kind, kind)
        return element

    def kind_of_arg(self, arg) -> str:
        if isinstance(arg, fx.Node):
            fake = arg.meta.get("example_value", arg.meta.get("val"))
            if isinstance(fake, torch.Tensor):
                return _kind_of(fake.dtype)
            return "int"
        if isinstance(arg, bool):
            return "bool"
        return "int" if isinstance(arg, int) else "float"

    # --- handlers: factories ---
    def _op_arange(self, node, a, shape, kind):
        start, end, step = (0, a["a"], a["step"]) if a["b"] is None else (a["a"], a["b"], a["step"])
        if not isinstance(step, int) or step == 0:
            raise Unproven(node, f"arange step {step!r} is not a nonzero int constant")
        start_expr = self.constant(node, start, "int") if kind == "int" else None
        if kind != "int" or not isinstance(start_expr, Lin):
            raise Unproven(node, "arange of non-integer values")
        return lambda idx, lv: start_expr.plus(idx[0].times(step))

    def _fill(self, node, value, kind):
        constant = self.constant(node, value, kind)
        return lambda idx, lv: constant

    def _op_full(self, node, a, shape, kind):
        return self._fill(node, a["fill_value"], kind)

    _op_new_full = _op_full_like = _op_scalar_tensor = _op_full

    def _op_ones(self, node, a, shape, kind):
        return self._fill(node, 1, kind)

    _op_new_ones = _op_ones_like = _op_ones

    def _op_zeros(self, node, a, shape, kind):
        return self._fill(node, 0, kind)

    _op_new_zeros = _op_zeros_like = _op_zeros

    # --- handlers: elementwise ---
    def _binary(self, node, a, shape, kind, combine):
        x = self.operand(node, a["input"], kind, shape)
        y = self.operand(node, a["other"], kind, shape)
        return lambda idx, lv: combine(x(idx, lv), y(idx, lv))

    def _arithmetic(self, node, a, shape, kind, on_floats, on_bools, on_ints):
        """A binary op: ``on_floats`` on constants leaf by leaf, ``on_bools`` / ``on_ints`` on the
        symbolic elements (None: not modelled for that kind)."""
        combine = {"float": lambda x, y: self.fmap(node, on_floats, x, y), "bool": on_bools,
                   "int": on_ints}[kind]
        if combine is None:
            raise Unproven(node, f"is {node.target} of {kind} values, which is not modelled")
        return self._binary(node, a, shape, kind, combine)

    def _op_add(self, node, a, shape, kind):
        return self._arithmetic(node, a, shape, kind, operator.add, self.or_, self.add)

    def _op_sub(self, node, a, shape, kind):
        return self._arithmetic(node, a, shape, kind, operator.sub, None,
                                lambda x, y: self.add(x, self.scale(y, -1)))

    def _op_rsub(self, node, a, shape, kind):
        return self._op_sub(node, dict(input=a["other"], other=a["input"]), shape, kind)

    def _op_mul(self, node, a, shape, kind):
        def times(x, y):
            for factor, other in ((x, y), (y, x)):
                if isinstance(factor, Lin) and factor.is_const:
                    return self.scale(other, factor.const)
            if isinstance(x, Select):
                return self.sel(x.cond, times(x.then, y), times(x.other, y))
            if isinstance(y, Select):
                return self.sel(y.cond, times(x, y.then), times(x, y.other))
            raise Unproven(node, f"multiplies {x!r} by {y!r}: not affine in the indices")
        return self._arithmetic(node, a, shape, kind, operator.mul, self.and_, times)

    def _op_neg(self, node, a, shape, kind):
        x = self.operand(node, a["input"], kind, shape)
        if kind == "float":
            return lambda idx, lv: self.fmap(node, operator.neg, x(idx, lv))
        if kind != "int":
            raise Unproven(node, "negates booleans")
        return lambda idx, lv: self.scale(x(idx, lv), -1)

    def _compare(self, node, a, shape, op):
        kinds = {self.kind_of_arg(a["input"]), self.kind_of_arg(a["other"])}
        common = "float" if "float" in kinds else "int"
        x = self.operand(node, a["input"], common, shape)
        y = self.operand(node, a["other"], common, shape)
        if common == "float":
            python_op = getattr(operator, op)
            return lambda idx, lv: self.truth(node, self.fmap(
                node, lambda p, q: float(python_op(p, q)), x(idx, lv), y(idx, lv)))

        def element(idx, lv):
            result = self.cmp(op, x(idx, lv), y(idx, lv))
            for atom in _atoms(result):
                self.origins.setdefault(atom, node)
                self.origins.setdefault(self.not_(atom), node)
            return result
        return element

    def _op_and(self, node, a, shape, kind):
        if kind != "bool":
            raise Unproven(node, "is a bitwise and of integers")
        return self._binary(node, a, shape, kind, self.and_)

    def _op_or(self, node, a, shape, kind):
        if kind != "bool":
            raise Unproven(node, "is a bitwise or of integers")
        return self._binary(node, a, shape, kind, self.or_)

    def _op_not(self, node, a, shape, kind):
        if kind != "bool":
            raise Unproven(node, "is a bitwise not of integers")
        x = self.operand(node, a["input"], kind, shape)
        return lambda idx, lv: self.not_(x(idx, lv))

    def _op_where(self, node, a, shape, kind):
        cond = self.operand(node, a["condition"], "bool", shape)
        x = self.operand(node, a["input"], kind, shape)
        y = self.operand(node, a["other"], kind, shape)
        return lambda idx, lv: self.select(kind, cond(idx, lv), x(idx, lv), y(idx, lv))

    def _op_masked_fill(self, node, a, shape, kind):
        return self._op_where(node, dict(condition=a["mask"], input=a["value"], other=a["input"]),
                              shape, kind)

    def _op_cast(self, node, a, shape, kind):
        return self.operand(node, a["input"], kind, shape)

    # --- handlers: layout ---
    def _op_unsqueeze(self, node, a, shape, kind):
        dim = a["dim"] % len(shape)
        x = self.operand_exact(node, a["input"], kind)
        return lambda idx, lv: x(idx[:dim] + idx[dim + 1:], lv)

    def operand_exact(self, node, arg, kind) -> Callable:
        """An element function of tensor ``arg`` in its own shape, converted to ``kind``."""
        if not isinstance(arg, fx.Node):
            raise Unproven(node, f"takes {arg!r} where the analysis expects a tensor")
        value = self.read(arg, node)
        return lambda idx, lv: self.convert(node, value.element(tuple(idx), lv), value.kind, kind)

    def _reshape_by_ones(self, node, source, shape, kind):
        """A reshape that only inserts or removes size-1 dims."""
        value = self.read(source, node)
        kept_in = [i for i, s in enumerate(value.shape) if _int_size(s) != 1]
        kept_out = [i for i, s in enumerate(shape) if _int_size(s) != 1]
        if len(kept_in) != len(kept_out) or any(
                not _same_size(value.shape[i], shape[j]) for i, j in zip(kept_in, kept_out)):
            raise Unproven(node, f"reshapes {tuple(value.shape)} to {tuple(shape)} (not only "
                                 "adding or removing size-1 dims)")
        x = self.operand_exact(node, source, kind)

        def element(idx, lv):
            own = [Lin((), 0)] * len(value.shape)
            for i, j in zip(kept_in, kept_out):
                own[i] = idx[j]
            return x(tuple(own), lv)
        return element

    def _op_reshape(self, node, a, shape, kind):
        return self._reshape_by_ones(node, a["input"], shape, kind)

    def _op_squeeze(self, node, a, shape, kind):
        return self._reshape_by_ones(node, a["input"], shape, kind)

    def _op_expand(self, node, a, shape, kind):
        return self.operand(node, a["input"], kind, shape)

    _op_expand_as = _op_expand

    def _op_transpose(self, node, a, shape, kind):
        rank = len(shape)
        d0, d1 = a["dim0"] % rank, a["dim1"] % rank
        order = list(range(rank))
        order[d0], order[d1] = order[d1], order[d0]
        return self._permuted(node, a["input"], order, kind)

    def _op_permute(self, node, a, shape, kind):
        return self._permuted(node, a["input"], [d % len(shape) for d in a["dims"]], kind)

    def _permuted(self, node, source, order, kind):
        x = self.operand_exact(node, source, kind)

        def element(idx, lv):
            own = [None] * len(order)
            for out_dim, in_dim in enumerate(order):
                own[in_dim] = idx[out_dim]
            return x(tuple(own), lv)
        return element

    def _op_triu(self, node, a, shape, kind):
        return self._triangle(node, a, shape, kind, upper=True)

    def _op_tril(self, node, a, shape, kind):
        return self._triangle(node, a, shape, kind, upper=False)

    def _triangle(self, node, a, shape, kind, upper: bool):
        diagonal = a["diagonal"]
        if not isinstance(diagonal, int):
            raise Unproven(node, f"triangle diagonal {diagonal!r} is not an int constant")
        x = self.operand_exact(node, a["input"], kind)
        zero = self.constant(node, 0, kind)

        def element(idx, lv):
            row, col = idx[-2], idx[-1]
            offset = self.add(col, self.scale(row, -1))  # col - row
            keep = (self.cmp("ge", offset, Lin((), diagonal)) if upper
                    else self.cmp("le", offset, Lin((), diagonal)))
            return self.select(kind, keep, x(idx, lv), zero)
        return element

    def _op_getitem(self, node, a, shape, kind):
        return self._index(node, a["input"], a["index"], shape, kind)

    def _op_index(self, node, a, shape, kind):
        items = tuple(slice(None) if i is None else i for i in a["indices"])
        return self._index(node, a["input"], items, shape, kind)

    def _index(self, node, source, index, shape, kind):
        """Basic and advanced indexing (numpy rules) as index arithmetic."""
        value = self.read(source, node)
        items = list(index) if isinstance(index, tuple) else [index]
        consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
        if Ellipsis in items:
            at = items.index(Ellipsis)
            items[at:at + 1] = [slice(None)] * (len(value.shape) - consumed)
        items += [slice(None)] * (len(value.shape) - sum(1 for i in items if i is not None))
        tensors = [p for p, i in enumerate(items) if isinstance(i, fx.Node)]
        for p in tensors:
            fake = items[p].meta.get("example_value", items[p].meta.get("val"))
            if not isinstance(fake, torch.Tensor) or fake.dtype == torch.bool or \
                    fake.dtype.is_floating_point:
                raise Unproven(node, f"indexes with {items[p].name}, not an integer tensor")
        adv_shape = torch.broadcast_shapes(*(
            tuple(items[p].meta.get("example_value", items[p].meta.get("val")).shape)
            for p in tensors)) if tensors else ()
        contiguous = tensors == list(range(tensors[0], tensors[0] + len(tensors))) if tensors \
            else True
        # Output dims, in order: ("new",) ("slice", in_dim, start, step) ("advanced",)
        layout: list = [("advanced",)] if tensors and not contiguous else []
        in_dim = 0
        for position, item in enumerate(items):
            if item is None:
                layout.append(("new",))
                continue
            if isinstance(item, fx.Node):
                if contiguous and position == tensors[0]:
                    layout.append(("advanced",))
            elif isinstance(item, slice):
                layout.append(("slice", in_dim, *self._slice_start(node, item,
                                                                   value.shape[in_dim])))
            elif not isinstance(item, int):
                raise Unproven(node, f"indexes with {item!r}")
            in_dim += 1
        x = self.operand_exact(node, source, kind)
        indexers = [self.operand(node, items[p], "int", adv_shape) for p in tensors]

        def element(idx, lv):
            own: list = [None] * len(value.shape)
            cursor = 0
            advanced = None
            for entry in layout:
                if entry[0] == "new":
                    cursor += 1
                elif entry[0] == "slice":
                    _, dim, start, step = entry
                    own[dim] = Lin((), start).plus(idx[cursor].times(step))
                    cursor += 1
                else:
                    advanced = idx[cursor:cursor + len(adv_shape)]
                    cursor += len(adv_shape)
            dim = 0
            for item in items:
                if item is None:
                    continue
                if isinstance(item, int):
                    size = _int_size(value.shape[dim])
                    if item < 0 and size is None:
                        raise Unproven(node, "negative index into a dimension of symbolic size")
                    own[dim] = Lin((), item + size if item < 0 else item)
                elif isinstance(item, fx.Node):
                    where = indexers[tensors.index(dim_position(items, dim))](tuple(advanced), lv)
                    if not isinstance(where, Lin) or not self.within(where, value.shape[dim]):
                        raise Unproven(node, f"index {where!r} into a dimension of size "
                                             f"{value.shape[dim]} may be out of range (negative "
                                             "indices wrap)")
                    own[dim] = where
                dim += 1
            return x(tuple(own), lv)
        return element

    @staticmethod
    def _slice_start(node, item: slice, size) -> tuple[int, int]:
        step = 1 if item.step is None else item.step
        if not isinstance(step, int) or step <= 0:
            raise Unproven(node, f"slice step {step!r} is not a positive int")
        start = 0 if item.start is None else item.start
        if not isinstance(start, int):
            raise Unproven(node, f"slice start {start!r} is not an int constant")
        if start < 0:
            if _int_size(size) is None:
                raise Unproven(node, "negative slice start into a dimension of symbolic size")
            start = max(0, start + _int_size(size))
        return start, step

    # --- handlers: along a dim ---
    def _op_cat(self, node, a, shape, kind):
        dim = a["dim"] % len(shape)
        parts = [p for p in a["tensors"]
                 if not (isinstance(p, fx.Node) and _numel_zero(p))]
        return self._concatenated(node, parts, dim, shape, kind)

    def _concatenated(self, node, parts, dim, shape, kind):
        elements, starts, start = [], [], 0
        for part in parts:
            value = self.read(part, node)
            length = _int_size(value.shape[dim])
            if length is None and part is not parts[-1]:
                raise Unproven(node, "concatenates a part of symbolic length before another")
            elements.append((self.operand_exact(node, part, kind), value))
            starts.append(start)
            start += length or 0

        def element(idx, lv):
            position = idx[dim]
            result = None
            for (x, value), first in reversed(list(zip(elements, starts))):
                own = list(idx)
                own[dim] = position.plus(Lin((), -first))
                own = [Lin((), 0) if _int_size(s) == 1 and d != dim else i
                       for d, (i, s) in enumerate(zip(own, value.shape))]
                here = x(tuple(own), lv)
                if result is None:
                    result = here
                else:
                    end = first + _int_size(value.shape[dim])
                    result = self.select(kind, self.cmp("lt", position, Lin((), end)), here,
                                         result)
            return result
        return element

    def _op_diff(self, node, a, shape, kind):
        if a["n"] != 1:
            raise Unproven(node, f"diff of order {a['n']}")
        if kind == "bool":
            raise Unproven(node, "diff of booleans")
        dim = a["dim"] % len(shape)
        parts = [p for p in (a["prepend"], a["input"], a["append"]) if p is not None]
        joined = self._concatenated(node, parts, dim, None, kind)

        def element(idx, lv):
            nxt = list(idx)
            nxt[dim] = idx[dim].plus(Lin((), 1))
            later, earlier = joined(tuple(nxt), lv), joined(tuple(idx), lv)
            if kind == "float":
                return self.fmap(node, operator.sub, later, earlier)
            return self.add(later, self.scale(earlier, -1))
        return element

    def _op_cumsum(self, node, a, shape, kind):
        """Recognised only as document ids (or as all zeros)."""
        dim = a["dim"] % len(shape)
        source = a["input"]
        value = self.read(source, node)
        axes = tuple(self.var(f"c{d}_", size) for d, size in enumerate(shape))
        if _int_size(shape[dim]) is not None and _int_size(shape[dim]) < 2:
            raise Unproven(node, "cumsum over fewer than two positions")
        summand = lambda idx: self.convert(node, value.element(idx, ()), value.kind, "bool")  # noqa
        at_first = list(axes)
        at_first[dim] = Lin((), 0)
        step = self.var("w", shape[dim] - 1)
        at_next = list(axes)
        at_next[dim] = step.plus(Lin((), 1))
        first, later = summand(tuple(at_first)), summand(tuple(at_next))
        if value.kind not in ("bool",) or first != FALSE:
            raise Unproven(node, "is a cumsum that is not of document boundaries "
                                 "(diff(position_ids) != 1)")
        if later == FALSE:
            return lambda idx, lv: Lin((), 0)
        segmentation = self._boundary_of(later, step, dim, axes)
        if segmentation is None:
            raise Unproven(node, f"sums {later!r}, not the document boundaries "
                                 "position_ids[i] - position_ids[i - 1] != 1")
        self.segments[node] = segmentation
        return lambda idx, lv: self._read(node, idx, "int")

    # --- handlers: vmap (a batched tensor's element also depends on the levels' indices) ---
    def _op_add_batch_dim(self, node, a, shape, kind):
        in_dim, level = a["in_dim"], a["level"]
        x = self.operand_exact(node, a["input"], kind)

        def element(idx, lv):
            levels = dict(lv)
            if level not in levels:
                raise Unproven(node, f"reads vmap level {level} outside its vmap")
            return x(idx[:in_dim] + (levels[level],) + idx[in_dim:], lv)
        return element

    def _op_remove_batch_dim(self, node, a, shape, kind):
        level, out_dim = a["level"], a["out_dim"] % len(shape)
        x = self.operand_exact(node, a["input"], kind)

        def element(idx, lv):
            inner = tuple(sorted({**dict(lv), level: idx[out_dim]}.items()))
            return x(idx[:out_dim] + idx[out_dim + 1:], inner)
        return element

    def _boundary_of(self, summand, step: Lin, dim: int, axes: tuple) -> Optional[_Segmentation]:
        """How ``summand`` (at index w + 1 of the cumsum's dim) reads positions, where it is
        ``positions[.., w + 1] - positions[.., w] != 1``; None when it is anything else."""
        if not (isinstance(summand, Cmp) and summand.op == "ne" and len(summand.lin.terms) == 2):
            return None
        (t0, c0), (t1, c1) = summand.lin.terms
        if not (isinstance(t0, Read) and isinstance(t1, Read) and t0.source is t1.source
                and t0.kind == "int" and sorted((c0, c1)) == [-1, 1]):
            return None
        plus, minus = (t0, t1) if c0 == 1 else (t1, t0)
        # The atom is normalised to plus - minus + const != 0, whichever read comes first.
        if summand.lin.const == -1:
            later, earlier = plus, minus
        elif summand.lin.const == 1:
            later, earlier = minus, plus
        else:
            return None
        differing = [i for i, (x, y) in enumerate(zip(later.index, earlier.index)) if x != y]
        if len(differing) != 1 or not step.terms:
            return None
        seq = differing[0]
        if later.index[seq] != step.plus(Lin((), 1)) or earlier.index[seq] != step:
            return None
        step_var = step.terms[0][0]
        if any(step_var in _vars_of(i) for p, i in enumerate(later.index) if p != seq):
            return None
        template = tuple(axes[dim] if p == seq else i for p, i in enumerate(later.index))
        return _Segmentation(later.source, axes, template, dim)


def dim_position(items: list, dim: int) -> int:
    """The position in ``items`` (None entries skipped in the count) of input dim ``dim``."""
    count = 0
    for position, item in enumerate(items):
        if item is None:
            continue
        if count == dim:
            return position
        count += 1
    raise IndexError(dim)


def _numel_zero(node: fx.Node) -> bool:
    fake = node.meta.get("example_value", node.meta.get("val"))
    return isinstance(fake, torch.Tensor) and any(_int_size(s) == 0 for s in fake.shape)


def _vars_of(lin: Lin) -> set:
    found = set()
    for term, _ in lin.terms:
        if isinstance(term, Var):
            found.add(term)
        else:
            for index in term.index:
                found |= _vars_of(index)
    return found


def _atoms(expr) -> list:
    if isinstance(expr, (Cmp, BRead)):
        return [expr]
    if isinstance(expr, (And, Or)):
        return [a for item in expr.items for a in _atoms(item)]
    return []


def _op_of(node: fx.Node) -> Optional[OpSpec]:
    for candidate in OPS:
        if candidate.matches(node) and candidate.bind(node) is not None:
            return candidate
    return None


# --- the API ---------------------------------------------------------------------------------------

MASK_USES = ("keep", "drop", "additive")


class MaskAnalysis:
    """Proves the structure of the masks of one graph's attentions (values are cached, so the
    mask every layer shares is interpreted once)."""

    def __init__(self, graph: fx.Graph):
        self._interp = _Interpreter(graph)

    def structure(self, mask: fx.Node, use: str, scores_shape: tuple, reader: fx.Node,
                  value_scale: float = 1.0) -> MaskStructure:
        """What ``mask`` lets each query see, as it enters scores of ``scores_shape`` = (B, H, Sq,
        Sk): "keep" (boolean, true = may attend: SDPA), "drop" (boolean, true = masked:
        masked_fill), "additive" (added to the scores, then multiplied by ``value_scale`` > 0
        before softmax), read by node ``reader``. Raises Unproven, naming the node, where it
        cannot prove it."""
        if use not in MASK_USES:
            raise ValueError(f"use={use!r} is not one of {MASK_USES}")
        interp = self._interp
        value = interp.read(mask, reader)
        batch, heads, seq_q, seq_k = scores_shape
        if not _same_size(seq_q, seq_k):
            raise Unproven(mask, f"queries ({seq_q}) and keys ({seq_k}) differ in length")
        if len(value.shape) > 4:
            raise Unproven(mask, f"has {len(value.shape)} dims; attention scores have 4")
        index = (interp.var("b", batch), interp.var("h", heads), interp.var("q", seq_q),
                 interp.var("k", seq_k))
        own = []
        for size, full, i in zip(value.shape, scores_shape[4 - len(value.shape):],
                                 index[4 - len(value.shape):]):
            if _int_size(size) == 1:
                own.append(Lin((), 0))
            elif _same_size(size, full):
                own.append(i)
            else:
                raise Unproven(mask, f"has shape {tuple(value.shape)}, which does not broadcast "
                                     f"to the scores' {tuple(scores_shape)}")
        element = value.element(tuple(own), ())
        if use == "additive":
            allowed = self._allowed_additive(mask, element, value.kind, value_scale)
        else:
            allowed = interp.convert(mask, element, value.kind, "bool")
            allowed = interp.not_(allowed) if use == "drop" else allowed
        return self._classify(mask, allowed, index, scores_shape)

    def _allowed_additive(self, mask: fx.Node, element, kind: str, value_scale: float):
        interp = self._interp
        if kind != "float":
            raise Unproven(mask, "is added to the scores but is not a float tensor")

        def allowed(x):
            if isinstance(x, Select):
                return interp.select("bool", x.cond, allowed(x.then), allowed(x.other))
            if isinstance(x, FConst):
                scaled = x.value * value_scale
                if scaled == 0:
                    return TRUE
                if scaled == float("-inf") or scaled <= MASKED_ADDITIVE_MAX:
                    return FALSE
                raise Unproven(mask, f"adds {x.value!r} to some scores: a bias, not a mask "
                                     "(masked entries must be -inf or <= "
                                     f"{MASKED_ADDITIVE_MAX})")
            raise Unproven(mask, f"adds data ({x!r}) to the scores, not a mask built from "
                                 "positions")
        return allowed(element)

    def _classify(self, mask: fx.Node, allowed, index: tuple, scores_shape: tuple) -> MaskStructure:
        interp = self._interp
        if allowed == TRUE:
            return MaskStructure(causal=False)
        if allowed == FALSE:
            raise Unproven(mask, "masks every key")
        if isinstance(allowed, Or):
            raise Unproven(mask, f"lets a query see a key where {allowed!r}: a union of "
                                 "conditions, not a causal, sliding-window or document mask")
        atoms = set(allowed.items) if isinstance(allowed, And) else {allowed}
        q, k = index[2], index[3]
        documents, atoms = self._documents(mask, atoms, q, k, scores_shape)
        causal, window = False, None
        for atom in sorted(atoms, key=repr):
            if isinstance(atom, Cmp) and atom.op == "le" and atom.lin == k.plus(q.times(-1)):
                causal = True
            elif (isinstance(atom, Cmp) and atom.op == "le" and atom.lin.terms
                  == q.plus(k.times(-1)).terms and atom.lin.const <= 0):
                width = 1 - atom.lin.const
                window = width if window is None else min(window, width)
            else:
                raise Unproven(interp.origins.get(atom, mask),
                               f"keeps only keys where {atom!r} (b: batch, h: head, q: query, "
                               "k: key index), which is not part of a causal, sliding-window or "
                               "document mask")
        if not causal:
            raise Unproven(mask, "lets queries see later keys (a bidirectional "
                                 f"{'document ' if documents else ''}"
                                 f"{'window ' if window else ''}mask), which graphopt has no "
                                 "kernel for")
        return MaskStructure(causal=True, window=window, documents=documents)

    def _documents(self, mask, atoms: set, q: Lin, k: Lin, scores_shape) -> tuple:
        """The document atom seg[.., q] == seg[.., k] (if any) and the other atoms with positions
        of one document rewritten as indices: P[q] - P[k] == q - k inside a document."""
        interp = self._interp
        found = None
        for atom in atoms:
            pair = self._same_document(atom, q, k)
            if pair is None:
                continue
            if found is not None and found[1] != pair:
                raise Unproven(interp.origins.get(atom, mask),
                               "compares two different document-id tensors")
            found = (atom, pair)
        if found is None:
            return None, atoms
        atom, (segmentation, read_q, read_k) = found
        positions_q, positions_k = (self._positions_read(segmentation, r) for r in (read_q, read_k))
        rewritten = set()
        for other in atoms - {atom}:
            if isinstance(other, Cmp):
                coeffs = other.lin.coeffs()
                a = coeffs.get(positions_q, 0)
                if a and coeffs.get(positions_k, 0) == -a:
                    del coeffs[positions_q], coeffs[positions_k]
                    lin = Lin.of(coeffs, other.lin.const).plus(q.times(a)).plus(k.times(-a))
                    other = interp.atom(other.op, lin)
            if other != TRUE:
                rewritten.add(other)
        return self._documents_of(mask, segmentation, positions_q, q, scores_shape), rewritten

    def _same_document(self, atom, q: Lin, k: Lin):
        """(segmentation, read at q, read at k) where atom is seg[.., q] == seg[.., k]."""
        if not (isinstance(atom, Cmp) and atom.op == "eq" and atom.lin.const == 0
                and len(atom.lin.terms) == 2):
            return None
        (t0, c0), (t1, c1) = atom.lin.terms
        if not (isinstance(t0, Read) and isinstance(t1, Read) and t0.source is t1.source
                and c0 == -c1 and t0.source in self._interp.segments):
            return None
        segmentation = self._interp.segments[t0.source]
        dim = segmentation.dim
        if [i for i, (x, y) in enumerate(zip(t0.index, t1.index)) if x != y] != [dim]:
            return None
        ends = {t0.index[dim]: t0, t1.index[dim]: t1}
        if set(ends) != {q, k}:
            return None
        return segmentation, ends[q], ends[k]

    @staticmethod
    def _positions_read(segmentation: _Segmentation, seg_read: Read) -> Read:
        mapping = {axis.terms[0][0]: i for axis, i in zip(segmentation.axes, seg_read.index)
                   if axis.terms}
        return Read(segmentation.positions,
                    tuple(t.substitute(mapping) for t in segmentation.template), "int")

    def _documents_of(self, mask, segmentation, positions_q: Read, q: Lin,
                      scores_shape) -> Documents:
        positions = segmentation.positions
        fake = positions.meta.get("example_value", positions.meta.get("val"))
        index = positions_q.index
        if fake is None or fake.dim() not in (1, 2) or index[-1] != q or \
                not _same_size(fake.shape[-1], scores_shape[2]):
            raise Unproven(positions, "delimits documents but is not a [batch, sequence] or "
                                      "[sequence] tensor of the attention's length")
        if fake.dim() == 1:
            return Documents(positions, row=0)
        row = index[0]
        if row.is_const:
            return Documents(positions, row=row.const)
        if row == self._interp.var("b", scores_shape[0]) and _same_size(fake.shape[0],
                                                                         scores_shape[0]):
            return Documents(positions, row=None)
        raise Unproven(positions, f"delimits documents with row {row!r} of its batch")
