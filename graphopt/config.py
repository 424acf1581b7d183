"""graphopt's configuration: typed flags, grouped by pass, one comment each.

Read a flag as an attribute (``graphopt.config.memory_budget``), set one by assignment or, for a
scope, with ``graphopt.config.patch(...)`` (a context manager and a decorator). An environment
variable ``GRAPHOPT_<NAME>`` overrides a flag wherever it is set, so a pass can be switched on or off
from the command line without editing code (``GRAPHOPT_DUMP_DIR=dump python train.py``).

The backend takes a :class:`ConfigSnapshot` when it starts compiling a graph; passes read that
snapshot, never the live module, so a compile sees one consistent configuration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import sys
import types
from typing import Any, Callable, Iterator

_ENV_PREFIX = "GRAPHOPT_"


@dataclasses.dataclass(frozen=True)
class Flag:
    name: str
    default: Any
    kind: type | tuple[type, ...]
    group: str
    doc: str
    choices: tuple[Any, ...] | None = None
    from_env: bool = True  # False for flags whose values cannot be written as text


_FLAGS: dict[str, Flag] = {}


def _flag(group: str, name: str, default: Any, kind, doc: str, *, choices=None, from_env=True) -> None:
    _FLAGS[name] = Flag(name, default, kind, group, doc, choices, from_env)


# --- general -------------------------------------------------------------------------------------
_flag("general", "codegen", "inductor", str,
      "Code generator after the passes: 'inductor' (fast code) or 'eager' (debugging, fast CPU tests).",
      choices=("inductor", "eager"))
_flag("general", "dump_dir", None, (str, type(None)),
      "Folder for the per-graph dump: code after every stage and pass, summary.json, index.html.")
_flag("general", "debug", False, bool,
      "Lint every graph between passes and fail at the pass that broke an invariant.")
_flag("general", "disabled_passes", (), tuple,
      "Names of passes to switch off although their feature flag is on (comma-separated in the env).")
_flag("general", "device_profile", None, (str, type(None)),
      "Path of a device profile written by `python -m graphopt calibrate`; None uses built-in defaults.")

# --- sequence-parallel attention (passes/shard_attention.py) ------------------------------------
_flag("sequence_parallel_attention", "sequence_parallel_attention", False, bool,
      "Replace every attention with DISTFLASHATTN-style attention over the sequence-parallel group.")
_flag("sequence_parallel_attention", "sp_group", None, object,
      "Process group the sequence is sharded over; None means the default (WORLD) group.",
      from_env=False)
_flag("sequence_parallel_attention", "sp_load_balance", True, bool,
      "Balance causal work token-level across ranks (idle ranks compute blocks for busy ones).")
_flag("sequence_parallel_attention", "sp_split_diagonal", True, bool,
      "Open and close each rank's step sequence with half of its own diagonal block, so the first "
      "inputs and the last returned partials travel under compute (an argument of each op the pass "
      "emits; False runs the diagonal whole, first in forward and last in backward).")
_flag("sequence_parallel_attention", "sp_local_attention", (), tuple,
      "Module paths (fnmatch patterns, e.g. 'vision_tower.*') of attentions meant to stay local to "
      "each rank's chunk; every other attention is rewritten or the compile fails naming it.")
_flag("sequence_parallel_attention", "sp_peer_timeout_s", 30.0, (float, int),
      "Seconds a rank waits for its peers at a sequence-parallel attention (the call check every "
      "call makes, and P2P transfers on CPU) before raising; cover the compile-time skew of ranks.")

# --- attention kernels and masks (passes/specialize_attention_masks.py, ops/attention.py) -------
_flag("attention", "attention_kernel", "auto", str,
      "CUDA attention blocks: 'auto' runs torch's cuDNN attention where it computes a block exactly "
      "(no mask or the diagonal block, fp16/bf16, D % 8 == 0, D <= 128, sm90+) and graphopt's "
      "Triton kernels elsewhere; 'triton' always runs graphopt's kernels (an argument of each op "
      "the passes emit).", choices=("auto", "triton"))
_flag("attention", "specialize_attention_masks", True, bool,
      "Prove each attention's mask from the graph (transformers builds a [1, 1, S, S] mask under "
      "torch.compile) and run the matching kernel: is_causal=True SDPA for a causal mask, graphopt's "
      "block-skipping kernels for sliding-window and packed-document masks.")

# --- GEMM + collective overlap (passes/overlap_matmul_allreduce.py) -----------------------------
_flag("overlap_matmul_allreduce", "overlap_matmul_allreduce", False, bool,
      "Decompose GEMM + all-reduce / reduce-scatter / all-gather + GEMM into overlapped chunks.")
_flag("overlap_matmul_allreduce", "overlap_mode", "auto", str,
      "'auto' lets the cost model choose; force 'sequential', 'chunked', 'copy_engine' or 'tile' for "
      "experiments.", choices=("auto", "sequential", "chunked", "copy_engine", "tile"))
_flag("overlap_matmul_allreduce", "overlap_chunks", 0, int,
      "Chunks of the chunked runtime (sub-chunks per rank block of copy_engine); 0: the model picks.")
_flag("overlap_matmul_allreduce", "overlap_graph_replay", True, bool,
      "Copy-engine calls replay a CUDA graph of the call from the second time the same tensors "
      "(addresses, shapes, strides) come back: same device work and result, a graph launch of host "
      "time instead of issuing 10-80 ops. The cost model prices the call accordingly.")

# --- op times for the planners (analysis/op_timing.py) ------------------------------------------
_flag("planning", "op_timing", "auto", str,
      "Op times the remat and offload planners use: 'measure' times each distinct op once on its "
      "device at compile time, 'model' uses the roofline cost model, 'auto' measures on CUDA and "
      "models elsewhere. With several ranks the lowest rank of the graph's process groups measures "
      "and the others adopt its times, so every rank makes the same plan; 'auto' keeps the roofline "
      "for a graph that names no process group.", choices=("auto", "measure", "model"))
_flag("planning", "op_timing_agreement_timeout_s", 300.0, (float, int),
      "Seconds a rank waits for the measuring rank's op times (it measures them at compile time) "
      "before planning without them: the roofline under 'auto', its own measurement under 'measure'.")

# --- rematerialization (passes/plan_rematerialization.py) ---------------------------------------
_flag("rematerialization", "memory_budget", None, (str, int, float, type(None)),
      "Peak activation-memory budget: bytes ('40GiB', 4e10) or a fraction f: the min-cut plan's peak "
      "less (1 - f) of what it saves (1.0: the runtime-optimal min-cut plan, as torch's budget 1.0).")

# --- activation offload (passes/offload_activations.py) -----------------------------------------
_flag("offload", "offload_activations", False, bool,
      "Offload saved activations chosen by the joint plan to pinned host memory, overlapped.")
_flag("offload", "offload_host_capacity", None, (str, int, type(None)),
      "Most pinned host bytes the offload plan may use ('64GiB'); None means no limit.")
_flag("offload", "offload_link_slack", 0.02, (float, int),
      "Slack the offload schedule leaves on the host link: copies are planned, waited for and "
      "reloaded as if the link ran this fraction slower than the device profile says, so a copy "
      "that runs a little late does not stall the step. 0 plans at the profile's bandwidth. "
      "Measured at S = 8K on one H100 (bench/offload.py, link margins): 0 / 0.02 / 0.06 offloaded "
      "93 / 91 / 88% of what the forward's link time could carry, each at 2.1-2.3% step overhead.")


class ConfigError(ValueError):
    """A flag value is wrong; the message names the fix."""


class UnknownFlagError(ConfigError, AttributeError):
    """No flag has this name; the message lists the valid ones."""


def _unknown(name: str) -> UnknownFlagError:
    valid = ", ".join(sorted(_FLAGS))
    return UnknownFlagError(f"graphopt.config has no flag {name!r}; valid flags: {valid}")


def _parse_env(flag: Flag, text: str) -> Any:
    kinds = flag.kind if isinstance(flag.kind, tuple) else (flag.kind,)
    lowered = text.strip().lower()
    if type(None) in kinds and lowered in ("", "none"):
        return None
    if bool in kinds:
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{_ENV_PREFIX}{flag.name.upper()}={text!r} is not a boolean; use 1/0 or true/false")
    if tuple in kinds:
        return tuple(part.strip() for part in text.split(",") if part.strip())
    if int in kinds:
        with contextlib.suppress(ValueError):
            return int(text)
    if float in kinds:
        with contextlib.suppress(ValueError):
            return float(text)
    return text


def _validate(flag: Flag, value: Any) -> Any:
    if flag.kind is tuple and isinstance(value, (list, str)):
        value = tuple(value.split(",")) if isinstance(value, str) else tuple(value)
    if flag.kind is not object and not isinstance(value, flag.kind):
        raise ConfigError(
            f"graphopt.config.{flag.name} must be {_kind_name(flag.kind)}, got {type(value).__name__} "
            f"{value!r}")
    if flag.choices is not None and value not in flag.choices:
        raise ConfigError(f"graphopt.config.{flag.name}={value!r} is not one of {flag.choices}")
    return value


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("None" if k is type(None) else k.__name__ for k in kinds)


class ConfigSnapshot:
    """The values of every flag at one moment; attribute access, hashable description."""

    def __init__(self, values: dict[str, Any]):
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            raise _unknown(name) from None

    def __deepcopy__(self, memo) -> "ConfigSnapshot":
        return self  # read-only

    def __reduce__(self):
        return (ConfigSnapshot, (self._values,))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a ConfigSnapshot is read-only; use graphopt.config.patch(...)")

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def describe(self) -> dict[str, str]:
        """JSON-friendly values (process groups and other objects as their repr)."""
        return {k: v if isinstance(v, (bool, int, float, str, type(None))) else repr(v)
                for k, v in sorted(self._values.items())}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()


class _ConfigModule(types.ModuleType):
    """Module type of ``graphopt.config``: validates assignments and applies env overrides."""

    def __getattr__(self, name: str) -> Any:
        flag = _FLAGS.get(name)
        if flag is None:
            if name.startswith("__"):
                raise AttributeError(name)
            raise _unknown(name)
        env = os.environ.get(_ENV_PREFIX + name.upper())
        if env is not None and flag.from_env:
            return _validate(flag, _parse_env(flag, env))
        return _values.get(name, flag.default)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_") or name not in _FLAGS and name in self.__dict__:
            super().__setattr__(name, value)
            return
        flag = _FLAGS.get(name)
        if flag is None:
            raise _unknown(name)
        _values[name] = _validate(flag, value)


_values: dict[str, Any] = {}


def flags() -> dict[str, Flag]:
    """Every flag with its group, type, default and comment."""
    return dict(_FLAGS)


def snapshot(**overrides: Any) -> ConfigSnapshot:
    """The current value of every flag, with ``overrides`` (validated) on top."""
    module = sys.modules[__name__]
    values = {name: getattr(module, name) for name in _FLAGS}
    for name, value in overrides.items():
        if name not in _FLAGS:
            raise _unknown(name)
        values[name] = _validate(_FLAGS[name], value)
    return ConfigSnapshot(values)


class patch(contextlib.ContextDecorator):
    """Set flags for a scope: ``with graphopt.config.patch(memory_budget="40GiB"): ...``."""

    def __init__(self, **changes: Any):
        for name, value in changes.items():
            if name not in _FLAGS:
                raise _unknown(name)
            _validate(_FLAGS[name], value)
        self._changes = changes
        self._saved: list[dict[str, Any]] = []

    def __enter__(self) -> "patch":
        self._saved.append(dict(_values))
        for name, value in self._changes.items():
            _values[name] = _validate(_FLAGS[name], value)
        return self

    def __exit__(self, *exc) -> None:
        _values.clear()
        _values.update(self._saved.pop())


def source_digest() -> str:
    """Hash of graphopt's own source files, so a cache never serves code made by an older graphopt."""
    return _source_digest_cached()


@functools.lru_cache(maxsize=1)
def _source_digest_cached() -> str:
    root = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                digest.update(os.path.relpath(path, root).encode())
                with open(path, "rb") as handle:
                    digest.update(handle.read())
    return digest.hexdigest()


def describe_flags() -> str:
    """Every flag with its default and comment, grouped by pass (`python -m graphopt flags`)."""
    lines = []
    group = None
    for flag in _FLAGS.values():
        if flag.group != group:
            group = flag.group
            lines.append(f"[{group}]")
        lines.append(f"  {flag.name} = {flag.default!r}  # {flag.doc}")
    return "\n".join(lines)


sys.modules[__name__].__class__ = _ConfigModule
