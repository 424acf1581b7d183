"""How Dynamo records torch calls, as data: an :class:`OpSpec` names an operation's functions,
Tensor methods and parameters, and binds a node's arguments to those names.

Dynamo's torch IR records ``a + b`` as ``operator.add``, ``torch.add`` or ``a.add(b)`` depending on
the source, and keeps positional and keyword arguments as written; a spec hides that, so a matcher
reads ``args["input"]`` whatever the spelling.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

FACTORY_KWARGS = ("device", "dtype", "layout", "pin_memory", "requires_grad", "memory_format")


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """An operation as Dynamo records it: as functions and/or Tensor methods with named params."""

    name: str
    functions: tuple[Callable, ...] = ()
    methods: tuple[str, ...] = ()
    params: tuple[str, ...] = ()
    defaults: tuple[tuple[str, Any], ...] = ()
    ignored_kwargs: tuple[str, ...] = ()  # keyword arguments that do not change the values
    varargs: bool = False  # the last param also takes sizes given one by one: x.view(B, H, S, D)

    def matches(self, node: fx.Node) -> bool:
        return ((node.op == "call_function" and node.target in self.functions)
                or (node.op == "call_method" and node.target in self.methods))

    def bind(self, node: fx.Node) -> Optional[dict[str, Any]]:
        """The node's arguments by parameter name, or None when the node is not this op."""
        if not self.matches(node):
            return None
        kwargs = {k: v for k, v in node.kwargs.items() if k not in self.ignored_kwargs}
        args = tuple(node.args)
        if self.varargs and len(args) >= len(self.params) and not (
                len(args) == len(self.params) and isinstance(args[-1], (tuple, list, torch.Size))):
            args = args[:len(self.params) - 1] + (args[len(self.params) - 1:],)
        if len(args) > len(self.params) or any(k not in self.params for k in kwargs):
            return None
        bound = dict(self.defaults)
        bound.update(zip(self.params, args))
        bound.update(kwargs)
        return bound if all(p in bound for p in self.params) else None


def spec(name, functions=(), methods=(), params=(), ignored_kwargs=(), varargs=False,
         **defaults) -> OpSpec:
    """An OpSpec; keyword arguments after the named ones are parameter defaults."""
    return OpSpec(name, tuple(functions), tuple(methods), tuple(params), tuple(defaults.items()),
                  tuple(ignored_kwargs), varargs)


def bind_any(node: Any, specs) -> tuple[Optional[OpSpec], Optional[dict]]:
    """The first of ``specs`` that ``node`` is, with its bound arguments; (None, None) if none."""
    if isinstance(node, fx.Node):
        for candidate in specs:
            args = candidate.bind(node)
            if args is not None:
                return candidate, args
    return None, None


def fake_value(node: Any):
    """The node's fake tensor (``meta['val']``, or Dynamo's ``meta['example_value']``), or None."""
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("val", node.meta.get("example_value"))
    return value if isinstance(value, torch.Tensor) else None


def source_line(node: fx.Node) -> str:
    """Where the user's code made ``node``: the last frame of its stack trace, as 'file:line: code'."""
    trace = node.meta.get("stack_trace") or ""
    lines = [line.strip() for line in trace.strip().splitlines() if line.strip()]
    frames = [i for i, line in enumerate(lines) if line.startswith("File ")]
    if not frames:
        return f"node {node.name} (no stack trace recorded)"
    last = frames[-1]
    where = lines[last][len("File "):].replace('"', "")
    code = lines[last + 1] if last + 1 < len(lines) and not lines[last + 1].startswith("File ") else ""
    return f"{where}: {code}" if code else where


def module_path(node: fx.Node) -> str:
    """The dotted path of the innermost module that made ``node`` ('model.layers.0.self_attn'),
    '' outside any module."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    # L['self'].model.layers[0].self_attn, L['args'][0]._modules['model'] -> model.layers.0.self_attn
    path = re.sub(r"^L(\[[^\]]*\])+", "", path)
    path = re.sub(r"\._modules\[['\"]([^'\"]*)['\"]\]", r".\1", path)
    path = re.sub(r"\[['\"]?([^'\"\]]*)['\"]?\]", r".\1", path)
    return path.lstrip(".")


def module_type(node: fx.Node) -> str:
    """The class name of the innermost module that made ``node``, '' outside any module."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    kind = list(stack.values())[-1][1]
    return getattr(kind, "__name__", str(kind))
