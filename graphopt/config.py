"""graphopt's configuration: typed flags, grouped by pass, one comment each.

A flag is set in one of four ways:

    graphopt.config.memory_budget = "40GiB"                      # assignment
    with graphopt.config.patch(memory_budget="40GiB"): ...       # a scope (also a decorator)
    torch.compile(model, backend=graphopt.backend(memory_budget="40GiB"))   # one backend
    GRAPHOPT_MEMORY_BUDGET=40GiB python train.py                 # the environment

Precedence, for every flag: **environment > graphopt.backend(...) > patch / assignment > default**.
An environment variable ``GRAPHOPT_<NAME>`` overrides the flag wherever it is set, so a pass can be
switched on or off from the command line without editing code.

Every value is parsed and checked where it is set, into the type its consumers take: a byte size
becomes an int of bytes ("40GiB" -> 42949672960), a fraction a float, a choice is checked against
its choices, a path is checked on disk, a process group is checked to be one. A wrong value fails
there -- at the assignment, at ``patch(...)``, at ``graphopt.backend(...)``, or (the environment)
when the flag is read, ``graphopt.backend(...)`` is made or a graph compiles -- with the flag's
name, the value, what is accepted and an example. A ``GRAPHOPT_*`` variable that names no flag
(checked when ``graphopt.backend(...)`` is made and when a graph compiles), and a
``disabled_passes`` entry that names no pass, fail too, naming the closest match.

The backend takes one :class:`ConfigSnapshot` (``compile_snapshot``) when a graph starts compiling;
passes, planners and the ops they emit read that snapshot or values handed on from it, never this
module. torch.compile compiles at the model's first call, not when ``torch.compile`` is called: a
``patch`` that has ended by then does not apply to the graph. graphopt warns once, at the first
compile after such a patch ended with no graphopt compile inside it (``FlagsNotAppliedWarning``);
give the flags to ``graphopt.backend(...)`` instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import hashlib
import json
import math
import os
import re
import sys
import types
import warnings
from typing import Any, Callable

_ENV_PREFIX = "GRAPHOPT_"

# The passes of graphopt/passes/pipeline.py, in order: the names `disabled_passes` takes (a test
# checks that they are the pipeline's).
PASS_NAMES = ("shard_attention", "specialize_attention_masks", "attention_selection",
              "overlap_matmul_collectives", "plan_rematerialization", "offload_activations")
# Earlier names, accepted as flags and in disabled_passes: old name -> name.
ALIASES = {"overlap_matmul_allreduce": "overlap_matmul_collectives"}


class ConfigError(ValueError):
    """A flag value is wrong; the message names the flag, the value, what is accepted, an example."""


class UnknownFlagError(ConfigError, AttributeError):
    """No flag has this name; the message names the closest and lists the valid ones."""


class FlagsNotAppliedWarning(UserWarning):
    """Flags were patched while torch.compile was called but not while the graph compiled."""


class _Rejected(Exception):
    """Raised by a parser: why the value is wrong (the caller adds where it was set)."""


def _a(value: Any) -> str:
    """'an int', 'a str': the type of ``value`` with its article."""
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


@dataclasses.dataclass(frozen=True)
class Flag:
    name: str
    default: Any
    parse: Callable[[Any], Any]         # a Python value -> the typed value; raises _Rejected
    from_text: Callable[[str], Any]     # an environment variable's text -> a value for parse
    group: str
    doc: str
    accepts: str                        # what the flag takes, for error messages
    example: str                        # one setting that works
    choices: tuple[Any, ...] | None = None
    from_env: bool = True               # False for values that cannot be written as text
    rank_local: bool = False            # may differ between ranks: changes nothing a rank computes
                                        # or sends (the rank agreement leaves it out)


# --- parsers: a Python value in, the typed value out -----------------------------------------------

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise _Rejected("is not a bool")


def _boolean_text(text: str) -> Any:
    lowered = text.strip().lower()
    return True if lowered in _TRUE else False if lowered in _FALSE else text


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if isinstance(value, str) and value in choices:
            return value
        close = difflib.get_close_matches(str(value), choices, n=1)
        raise _Rejected("is not one of them" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return parse


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Rejected(f"is {_a(value)}, not an int")
    if value < 0:
        raise _Rejected("is negative")
    return value


def _int_text(text: str) -> Any:
    with contextlib.suppress(ValueError):
        return int(text.strip())
    return text


def _non_negative(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Rejected(f"is {_a(value)}, not a number")
    if not math.isfinite(value):
        raise _Rejected("is not a finite number")
    if value < 0:
        raise _Rejected("is negative")
    return float(value)


def _float_text(text: str) -> Any:
    with contextlib.suppress(ValueError):
        return float(text.strip())
    return text


def _text(text: str) -> Any:
    return text


_BYTE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"\s*([+-]?[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*")


def _number_and_unit(value: Any) -> tuple[int | float, str]:
    """(number, lower-case unit or '') of a size written as an int, a float or a string."""
    if isinstance(value, bool):
        raise _Rejected("is a bool, not a size")
    if isinstance(value, (int, float)):
        number, unit = value, ""
    elif isinstance(value, str):
        match = _SIZE.fullmatch(value)
        if not match:
            raise _Rejected("is not a number with an optional unit")
        text, unit = match.group(1), match.group(2).lower()
        number = int(text) if text.isdigit() else float(text)
        if unit and unit not in _BYTE_UNITS:
            raise _Rejected(f"has the unit {match.group(2)!r}, not one of B, KB, MB, GB, TB, KiB, "
                            "MiB, GiB, TiB")
    else:
        raise _Rejected(f"is {_a(value)}, not a number or a string")
    if not math.isfinite(number):
        raise _Rejected("is not a finite number")
    if number <= 0:
        raise _Rejected("is not positive")
    return number, unit


def _bytes(value: Any) -> int:
    number, unit = _number_and_unit(value)
    if unit:
        return int(number * _BYTE_UNITS[unit])
    if number != int(number):
        raise _Rejected("is not a whole number of bytes (a fraction needs a unit, e.g. '1.5GiB')")
    return int(number)


def _optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def parse_or_none(value: Any) -> Any:
        return None if value is None else parse(value)
    return parse_or_none


def _optional_text(from_text: Callable[[str], Any]) -> Callable[[str], Any]:
    def none_or_text(text: str) -> Any:
        return None if text.strip().lower() in ("", "none") else from_text(text)
    return none_or_text


def _memory_budget(value: Any) -> int | float:
    """A fraction in (0, 1] (float) or bytes (int > 1): the same number means the same budget
    however it is written (1, 1.0 and '1' are the fraction 1; 4e10 and '4e10' are bytes)."""
    number, unit = _number_and_unit(value)
    if unit:
        return int(number * _BYTE_UNITS[unit])
    if number <= 1:
        return float(number)
    if number != int(number):
        raise _Rejected("is more than 1, so not a fraction, and not a whole number of bytes")
    return int(number)


def _path(value: Any) -> str:
    if not isinstance(value, (str, os.PathLike)):
        raise _Rejected(f"is {_a(value)}, not a path")
    return os.fspath(value)


def _dump_dir(value: Any) -> str | None:
    """A folder that exists or can be created, and is writable; '' means no dump, as None."""
    path = _path(value)
    if not path:
        return None
    probe = os.path.abspath(path)
    if os.path.exists(probe) and not os.path.isdir(probe):
        raise _Rejected("exists and is not a folder")
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise _Rejected(f"cannot be created: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise _Rejected(f"cannot be written: {probe} is not writable")
    return path


def _device_profile(value: Any) -> str | None:
    """The path of a profile file that loads (read, JSON, every field of a DeviceProfile)."""
    path = _path(value)
    if not path:
        return None
    from graphopt.analysis.device_profile import load_profile
    try:
        load_profile(path)
    except OSError as error:
        raise _Rejected(f"cannot be read ({error.strerror or error})") from None
    except json.JSONDecodeError as error:
        raise _Rejected(f"is not JSON ({error.msg} at line {error.lineno}, column {error.colno})") \
            from None
    except ValueError as error:
        raise _Rejected(f"is not a device profile: {error}") from None
    return path


def _process_group(value: Any) -> Any:
    if isinstance(value, str):
        if not value:
            raise _Rejected("is an empty group name")
        return value
    import torch.distributed as dist
    if dist.is_available() and isinstance(value, dist.ProcessGroup):
        return value
    hint = " (pass mesh.get_group(dim) for one dimension of a DeviceMesh)" \
        if type(value).__name__ == "DeviceMesh" else ""
    raise _Rejected(f"is {_a(value)}, not a process group{hint}")


def _pass_names(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        names = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, (list, tuple)) and all(isinstance(name, str) for name in value):
        names = [name.strip() for name in value]
    else:
        raise _Rejected(f"is {_a(value)}, not pass names (a tuple of str or a "
                        "comma-separated str)")
    known = PASS_NAMES + tuple(ALIASES)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _Rejected(f"names no pass: {name!r}{hint}")
    return tuple(dict.fromkeys(ALIASES.get(name, name) for name in names))


def _patterns(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if isinstance(value, (list, tuple)) and all(isinstance(item, str) and item.strip() for item in value):
        return tuple(item.strip() for item in value)
    raise _Rejected(f"is {_a(value)}, not module-path patterns (a tuple of str or a "
                    "comma-separated str)")


# --- the flags ------------------------------------------------------------------------------------

_FLAGS: dict[str, Flag] = {}
_BOOL = dict(parse=_boolean, from_text=_boolean_text, accepts="True or False (environment: 1/0, "
             "true/false, yes/no, on/off)")


def _flag(group: str, name: str, default: Any, doc: str, *, parse, from_text, accepts: str,
          example: str | None = None, choices=None, from_env: bool = True,
          rank_local: bool = False) -> None:
    _FLAGS[name] = Flag(name, default, parse, from_text, group, doc, accepts,
                        example or f"{name}={default!r}", choices, from_env, rank_local)


def _choice_flag(group: str, name: str, default: str, doc: str, choices: tuple[str, ...]) -> None:
    _flag(group, name, default, doc, parse=_choice(*choices), from_text=_text,
          accepts="one of " + ", ".join(repr(c) for c in choices), example=f"{name}={choices[-1]!r}",
          choices=choices)


# --- general -------------------------------------------------------------------------------------
_choice_flag("general", "codegen", "inductor",
             "Code generator after the passes: 'inductor' (fast code) or 'eager' (debugging, fast CPU "
             "tests).", ("inductor", "eager"))
_flag("general", "dump_dir", None,
      "Folder for the per-graph dump: code after every stage and pass, summary.json, index.html.",
      parse=_optional(_dump_dir), from_text=_optional_text(_text),
      accepts="None or a folder that exists or can be created, writable",
      example="dump_dir='graphopt_dump'", rank_local=True)
_flag("general", "debug", False,
      "Lint every graph between passes and fail at the pass that broke an invariant.", **_BOOL,
      example="debug=True", rank_local=True)
_flag("general", "disabled_passes", (),
      "Names of passes to switch off although their feature flag is on (comma-separated in the "
      "environment): " + ", ".join(PASS_NAMES) + " (overlap_matmul_allreduce: the old name of "
      "overlap_matmul_collectives).",
      parse=_pass_names, from_text=_text,
      accepts="a tuple of pass names (or one comma-separated str) out of " + ", ".join(PASS_NAMES),
      example="disabled_passes=('offload_activations',)")
_flag("general", "device_profile", None,
      "Path of a device profile written by `python -m graphopt calibrate`; None uses built-in defaults.",
      parse=_optional(_device_profile), from_text=_optional_text(_text),
      accepts="None or the path of a JSON profile written by `python -m graphopt calibrate --out PATH`",
      example="device_profile='profile.json'")

# --- ranks agree or fail together (measure/agreement.py) ----------------------------------------
_flag("ranks", "rank_agreement", True,
      "In a run of several ranks, check through the default store, before a compiled graph's first "
      "collective, that every rank of its process groups compiled the same graph with the same "
      "flags and took the same decisions (rewritten sites, memory plan, offloads); a mismatch is an "
      "error on every rank naming the flag or decision and the ranks.", **_BOOL,
      example="rank_agreement=False")
_flag("ranks", "rank_agreement_timeout_s", 300.0,
      "Seconds a rank waits for the ranks it runs a graph with to compile that graph too (they "
      "compile it at about the same time; a rank that fails meanwhile ends the wait at once) "
      "before it fails, naming them.",
      parse=_non_negative, from_text=_float_text, accepts="a finite number of seconds >= 0",
      example="rank_agreement_timeout_s=600", rank_local=True)

# --- sequence-parallel attention (passes/shard_attention.py) ------------------------------------
_flag("sequence_parallel_attention", "sequence_parallel_attention", False,
      "Replace every attention with DISTFLASHATTN-style attention over the sequence-parallel group.",
      **_BOOL, example="sequence_parallel_attention=True")
_flag("sequence_parallel_attention", "sp_group", None,
      "Process group the sequence is sharded over; None means the default (WORLD) group.",
      parse=_optional(_process_group), from_text=_text,
      accepts="None (the WORLD group), a torch.distributed.ProcessGroup or the name of one",
      example="sp_group=torch.distributed.new_group([0, 1])", from_env=False)
_flag("sequence_parallel_attention", "sp_load_balance", True,
      "Balance causal work token-level across ranks (idle ranks compute blocks for busy ones).",
      **_BOOL, example="sp_load_balance=False")
_flag("sequence_parallel_attention", "sp_split_diagonal", True,
      "Open and close each rank's step sequence with half of its own diagonal block, so the first "
      "inputs and the last returned partials travel under compute (an argument of each op the pass "
      "emits; False runs the diagonal whole, first in forward and last in backward).",
      **_BOOL, example="sp_split_diagonal=False")
_flag("sequence_parallel_attention", "sp_local_attention", (),
      "Module paths (fnmatch patterns, e.g. 'vision_tower.*') of attentions meant to stay local to "
      "each rank's chunk; every other attention is rewritten or the compile fails naming it.",
      parse=_patterns, from_text=_text,
      accepts="a tuple of fnmatch patterns of module paths (or one comma-separated str)",
      example="sp_local_attention=('vision_tower.*',)")
_flag("sequence_parallel_attention", "sp_peer_timeout_s", 30.0,
      "Seconds a rank waits for its peers at a sequence-parallel attention (the call check every "
      "call makes, and P2P transfers on CPU) before raising; cover the compile-time skew of ranks.",
      parse=_non_negative, from_text=_float_text, accepts="a finite number of seconds >= 0",
      example="sp_peer_timeout_s=120", rank_local=True)

# --- attention kernels and masks (passes/specialize_attention_masks.py, ops/attention.py) -------
_choice_flag("attention", "attention_kernel", "auto",
             "CUDA attention blocks: 'auto' runs torch's cuDNN attention where it computes a block "
             "exactly (no mask or the diagonal block, fp16/bf16, D % 8 == 0, D <= 128, sm90+) and "
             "graphopt's Triton kernels elsewhere; 'triton' always runs graphopt's kernels (an "
             "argument of each op the passes emit).", ("auto", "triton"))
_flag("attention", "specialize_attention_masks", True,
      "Prove each attention's mask from the graph (transformers builds a [1, 1, S, S] mask under "
      "torch.compile) and run the matching kernel: is_causal=True SDPA for a causal mask, graphopt's "
      "block-skipping kernels for sliding-window and packed-document masks.",
      **_BOOL, example="specialize_attention_masks=False")

# --- GEMM + collective overlap (passes/overlap_matmul_collectives.py) ---------------------------
_flag("overlap_matmul_collectives", "overlap_matmul_collectives", False,
      "Decompose GEMM + all-reduce / reduce-scatter and all-gather + GEMM into overlapped chunks "
      "(also accepted as overlap_matmul_allreduce, its name before it handled reduce-scatter and "
      "all-gather).", **_BOOL, example="overlap_matmul_collectives=True")
_choice_flag("overlap_matmul_collectives", "overlap_mode", "auto",
             "'auto' lets the cost model choose; force 'sequential', 'chunked', 'copy_engine', 'tile' "
             "or 'tracked' (cuBLASLt's chunk counters trigger the communication) for experiments.",
             ("auto", "sequential", "chunked", "copy_engine", "tile", "tracked"))
_flag("overlap_matmul_collectives", "overlap_chunks", 0,
      "Chunks of the chunked runtime (sub-chunks per rank block of copy_engine); 0: the model picks.",
      parse=_count, from_text=_int_text, accepts="an int >= 0", example="overlap_chunks=4")
_flag("overlap_matmul_collectives", "overlap_graph_replay", True,
      "Copy-engine calls replay a CUDA graph of the call from the second time the same tensors "
      "(addresses, shapes, strides) come back: same device work and result, a graph launch of host "
      "time instead of issuing 10-80 ops. The cost model prices the call accordingly.",
      **_BOOL, example="overlap_graph_replay=False")

# --- op times for the planners (measure/op_timing.py) -------------------------------------------
_choice_flag("planning", "op_timing", "auto",
             "Op times the remat and offload planners use: 'measure' times each distinct op once on "
             "its device at compile time, 'model' uses the roofline cost model, 'auto' measures on "
             "CUDA and models elsewhere. With several ranks the lowest rank of the graph's process "
             "groups measures and the others adopt its times, so every rank makes the same plan; "
             "'auto' keeps the roofline for a graph that names no process group.",
             ("auto", "measure", "model"))
_flag("planning", "op_timing_agreement_timeout_s", 300.0,
      "Seconds a rank waits for the measuring rank's op times (it measures them at compile time) "
      "before planning without them: the roofline under 'auto', its own measurement under 'measure'.",
      parse=_non_negative, from_text=_float_text, accepts="a finite number of seconds >= 0",
      example="op_timing_agreement_timeout_s=600", rank_local=True)

# --- rematerialization (passes/plan_rematerialization.py) ---------------------------------------
_flag("rematerialization", "memory_budget", None,
      "Memory budget of each compiled graph's step: bytes ('40GiB', 4e10; parsed to an int) bound "
      "its peak device memory -- the graph's inputs (parameters, buffers, the batch) plus what its "
      "forward and backward allocate (activations, gradients, workspaces); not optimizer state. A "
      "fraction f in (0, 1] (a float) keeps at most f of the activation bytes torch's min-cut plan "
      "saves, at no higher peak (torch's activation_memory_budget; the same bytes under either "
      "codegen; 1.0: the min-cut plan). A budget no plan meets runs the lowest-peak plan and warns "
      "once, naming the floor in bytes.",
      parse=_optional(_memory_budget), from_text=_optional_text(_text),
      accepts="None, bytes (an int > 1, a whole float such as 4e10, or a size with a unit: '40GiB', "
              "'512MiB', '1.5GB') or a fraction in (0, 1] (0.5, '0.5', 1)",
      example="memory_budget='40GiB' or memory_budget=0.5")

# --- activation offload (passes/offload_activations.py) -----------------------------------------
_flag("offload", "offload_activations", False,
      "Offload saved activations chosen by the joint plan to pinned host memory, overlapped.",
      **_BOOL, example="offload_activations=True")
_flag("offload", "offload_host_capacity", None,
      "Most pinned host bytes the offload plan may use ('64GiB'; parsed to an int); None means no "
      "limit.", parse=_optional(_bytes), from_text=_optional_text(_text),
      accepts="None or a positive size: an int of bytes, a whole float (4e10) or a size with a unit "
              "('64GiB', '500MB')", example="offload_host_capacity='64GiB'")
_flag("offload", "offload_link_slack", 0.02,
      "Slack the offload schedule leaves on the host link: copies are planned, waited for and "
      "reloaded as if the link ran this fraction slower than the device profile says, so a copy "
      "that runs a little late does not stall the step; under Inductor 0.10 more, the error its "
      "modelled kernel times are held to (analysis/kernel_time). 0 plans at the profile's bandwidth. "
      "Measured at S = 8K on one H100 (bench/offload.py, link margins): 0 / 0.02 / 0.06 offloaded "
      "93 / 91 / 88% of what the forward's link time could carry, each at 2.1-2.3% step overhead.",
      parse=_non_negative, from_text=_float_text, accepts="a finite fraction >= 0",
      example="offload_link_slack=0.05")


# --- attention selection for fine-tuning (passes/attention_selection.py) ------------------------

def _kept_fraction(value: Any) -> float:
    number = _non_negative(value)
    if not 0 < number <= 1:
        raise _Rejected("is not in (0, 1]")
    return number


def _layer_fractions(value: Any) -> tuple[float, ...]:
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, (list, tuple)) or not value:
        raise _Rejected(f"is {_a(value)}, not a non-empty tuple of fractions")
    fractions = []
    for item in value:
        if isinstance(item, str):
            item = _float_text(item)
        number = _non_negative(item)
        if number > 1:
            raise _Rejected(f"has {number}, more than 1")
        fractions.append(number)
    return tuple(fractions)


_flag("attention_selection", "attention_selection", False,
      "Fine-tuning: every attention module (q/k/v projections to the output projection) runs on "
      "the samples a run-time selection picks and adds zero to the residual of the others, forward "
      "and backward (graphopt.ops.attention_selection drives the selection); graphs compiled without "
      "grad are left whole.", **_BOOL, example="attention_selection=True")
_flag("attention_selection", "attention_selection_kept_fraction", 0.6,
      "Fraction of the samples each attention module runs on: its capacity, round(fraction x batch), "
      "is compiled into the graph.", parse=_kept_fraction, from_text=_float_text,
      accepts="a fraction in (0, 1]", example="attention_selection_kept_fraction=0.5")
_choice_flag("attention_selection", "attention_selection_strategy", "random",
             "Which samples run: 'random' (a fresh random choice every step), 'score' (drawn in "
             "proportion to how large their attention output was against their residual when last "
             "measured; needs plan_step(sample_ids)), 'layer' (per-module capacities fixed from a "
             "warm-up: attention_selection_layer_fractions).", ("random", "score", "layer"))
_flag("attention_selection", "attention_selection_layer_fractions", None,
      "Kept fraction of each attention module in graph order (strategy 'layer'), e.g. from "
      "graphopt.ops.attention_selection.selector().layer_fractions() after a warm-up; None: "
      "attention_selection_kept_fraction everywhere.",
      parse=_optional(_layer_fractions), from_text=_optional_text(_text),
      accepts="None or a tuple of fractions in [0, 1] (environment: comma-separated)",
      example="attention_selection_layer_fractions=(1.0, 0.5, 0.25, 0.65)")
_flag("attention_selection", "attention_selection_seed", 0,
      "Seed of the host-side random choices of plan_step (the same on every rank).",
      parse=_count, from_text=_int_text, accepts="an int >= 0", example="attention_selection_seed=1")


def _unknown(name: str) -> UnknownFlagError:
    close = difflib.get_close_matches(name, list(_FLAGS) + list(ALIASES), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return UnknownFlagError(f"graphopt.config has no flag {name!r}; {hint}valid flags: "
                            f"{', '.join(sorted(_FLAGS))}")


def _canonical(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in _FLAGS:
        raise _unknown(name)
    return name


def _parse(name: str, value: Any, where: str) -> Any:
    """The typed value of ``value`` for flag ``name``, or a ConfigError saying what was wrong where."""
    flag = _FLAGS[name]
    try:
        return flag.parse(value)
    except _Rejected as why:
        raise ConfigError(f"{where} {why}. {flag.name} takes {flag.accepts}; for example "
                          f"{flag.example}") from None


def _parse_changes(changes: dict[str, Any], where: Callable[[str, Any], str]) -> dict[str, Any]:
    """Flag name (aliases resolved) -> typed value; an alias and its flag given together must agree."""
    parsed: dict[str, Any] = {}
    for given, value in changes.items():
        name = _canonical(given)
        typed = _parse(name, value, where(given, value))
        if name in parsed and parsed[name] != typed:
            raise ConfigError(f"{given} is another name of {name}, which is set to {parsed[name]!r} "
                              f"in the same call; set one of them")
        parsed[name] = typed
    return parsed


# --- the environment --------------------------------------------------------------------------------

_UNSET = object()
# Flag -> the variables that set it: GRAPHOPT_<NAME>, and GRAPHOPT_<OLD NAME> for an alias.
_ENV_KEYS = {name: (_ENV_PREFIX + name.upper(),) + tuple(_ENV_PREFIX + old.upper() for old, new
                                                          in ALIASES.items() if new == name)
             for name in _FLAGS}
_ENV_NAMES = {key: name for name, keys in _ENV_KEYS.items() for key in keys}
_parsed_environment: dict[tuple[str, str], Any] = {}  # (variable, text) -> typed value


def _environment_value(name: str) -> Any:
    """The typed value the environment gives flag ``name``, or _UNSET (parsed once per text)."""
    value = _UNSET
    for key in _ENV_KEYS[name]:
        text = os.environ.get(key)
        if text is None:
            continue
        typed = _parsed_environment.get((key, text), _UNSET)
        if typed is _UNSET:
            flag = _FLAGS[name]
            if not flag.from_env:
                raise ConfigError(f"environment variable {key}: {name} cannot be set from the "
                                  f"environment (it takes {flag.accepts}); set it in code, for "
                                  f"example {flag.example}")
            typed = _parse(name, flag.from_text(text), f"environment variable {key}={text!r}")
            _parsed_environment[(key, text)] = typed
        if value is not _UNSET and value != typed:
            raise ConfigError(f"environment variables {' and '.join(_ENV_KEYS[name])} (an old name "
                              f"of {name}) disagree; set one of them")
        value = typed
    return value


def _environment() -> dict[str, Any]:
    """Flag -> typed value of every ``GRAPHOPT_*`` variable set now; an unknown variable or a bad
    value raises."""
    for key in os.environ:
        if key.startswith(_ENV_PREFIX) and key not in _ENV_NAMES:
            close = difflib.get_close_matches(key, list(_ENV_NAMES), n=1)
            raise ConfigError(f"environment variable {key} names no graphopt flag" +
                              (f"; did you mean {close[0]}?" if close else "") +
                              f" graphopt reads {_ENV_PREFIX}<FLAG> for the flags of "
                              "`python -m graphopt flags`; unset it or fix its name")
    values = {name: _environment_value(name) for name in _FLAGS}
    return {name: value for name, value in values.items() if value is not _UNSET}


# --- snapshots --------------------------------------------------------------------------------------

class ConfigSnapshot:
    """The typed value of every flag at one moment; attribute access, hashable description."""

    def __init__(self, values: dict[str, Any]):
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._values[ALIASES.get(name, name)]
        except KeyError:
            raise _unknown(name) from None

    def __deepcopy__(self, memo) -> "ConfigSnapshot":
        return self  # read-only

    def __reduce__(self):
        return (ConfigSnapshot, (self._values,))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a ConfigSnapshot is read-only; use graphopt.config.patch(...) or "
                             "graphopt.backend(...)")

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def describe(self) -> dict[str, Any]:
        """JSON-friendly values (process groups and other objects as their repr)."""
        return {k: v if isinstance(v, (bool, int, float, str, type(None))) else repr(v)
                for k, v in sorted(self._values.items())}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()


_values: dict[str, Any] = {}  # flags set by assignment or an active patch (typed)


def snapshot(**overrides: Any) -> ConfigSnapshot:
    """Every flag's typed value now: the environment over ``overrides`` (what graphopt.backend(...)
    fixes) over assignments and patches over the defaults."""
    values = {name: _values.get(name, flag.default) for name, flag in _FLAGS.items()}
    values.update(_parse_changes(overrides, lambda name, value: f"graphopt.backend({name}={value!r})"))
    values.update(_environment())
    return ConfigSnapshot(values)


_compiles = 0                              # graphs graphopt has started compiling in this process
_patched_unapplied: dict[str, Any] = {}    # flags of patches that ended with no compile inside


def compile_snapshot(**overrides: Any) -> ConfigSnapshot:
    """The snapshot one graph compiles with (the backend calls this once per graph).

    Warns once about the flags of patches that ended, with no graphopt compile inside them, before
    this compile began, and that this snapshot does not carry: the README's ``with patch(...):
    model = torch.compile(model, ...)`` compiles at the first call, after the patch ended."""
    global _compiles
    _compiles += 1
    result = snapshot(**overrides)
    missed = {name: value for name, value in _patched_unapplied.items()
              if getattr(result, name) != value}
    _patched_unapplied.clear()
    if missed:
        settings = ", ".join(f"{name}={value!r}" for name, value in missed.items())
        warnings.warn(FlagsNotAppliedWarning(
            f"graphopt flags {settings} were patched when torch.compile was called but not when the "
            "graph compiled (torch.compile compiles at the model's first call, after the "
            "graphopt.config.patch block ended); pass them to graphopt.backend(...): "
            f"torch.compile(model, backend=graphopt.backend({settings}))"), stacklevel=2)
    return result


class patch(contextlib.ContextDecorator):
    """Set flags for a scope: ``with graphopt.config.patch(memory_budget="40GiB"): ...``.

    The values are checked here, when the patch is made. A graph compiles with the flags in force
    when it compiles -- at the compiled model's first call -- so a patch must be active then (or
    give the flags to ``graphopt.backend(...)``)."""

    def __init__(self, **changes: Any):
        self._changes = _parse_changes(
            changes, lambda name, value: f"graphopt.config.patch({name}={value!r})")
        self._saved: list[tuple[dict[str, Any], int]] = []

    def __enter__(self) -> "patch":
        self._saved.append((dict(_values), _compiles))
        _values.update(self._changes)
        return self

    def __exit__(self, *exc) -> None:
        saved, compiles_before = self._saved.pop()
        _values.clear()
        _values.update(saved)
        if _compiles == compiles_before:
            _patched_unapplied.update(self._changes)


class _ConfigModule(types.ModuleType):
    """Module type of ``graphopt.config``: checks assignments and applies environment overrides."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        name = _canonical(name)
        value = _environment_value(name)
        return _values.get(name, _FLAGS[name].default) if value is _UNSET else value

    def __setattr__(self, name: str, value: Any) -> None:
        plain = name not in _FLAGS and name not in ALIASES and name in self.__dict__
        if name.startswith("_") or plain:
            super().__setattr__(name, value)
            return
        _values.update(_parse_changes({name: value},
                                      lambda given, v: f"graphopt.config.{given}={v!r}"))


def flags() -> dict[str, Flag]:
    """Every flag with its group, default, what it accepts and its comment."""
    return dict(_FLAGS)


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
