"""Every private torch API graphopt uses, imported here and feature-detected.

graphopt runs on torch 2.11 (the GPU machines) through 2.13 (the CPU machines). Nothing else in the
package imports ``torch._...`` where this module can do it instead, so a change in torch's internals
is mended in one place.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import logging
from typing import Any, Callable

import torch

TORCH_VERSION = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])

# --- Dynamo / AOTAutograd / Inductor entry points -------------------------------------------------
from torch._dynamo.backends.common import aot_autograd  # noqa: E402
from torch._dynamo.backends.registry import register_backend  # noqa: E402
from torch._functorch.partitioners import (  # noqa: E402
    default_partition,
    min_cut_rematerialization_partition,
)
from torch._functorch.aot_autograd import make_boxed_func  # noqa: E402
from torch._inductor.compile_fx import compile_fx, compile_fx_inner  # noqa: E402
from torch._inductor.custom_graph_pass import CustomGraphPass  # noqa: E402

try:
    from torch._inductor.custom_graph_pass import CustomPartitionerFn
except ImportError:  # pragma: no cover - torch older than the supported range
    CustomPartitionerFn = None  # type: ignore[assignment]

PartitionerBase = CustomPartitionerFn if CustomPartitionerFn is not None else object
HAS_CUSTOM_PARTITIONER = CustomPartitionerFn is not None and hasattr(
    torch._inductor.config, "custom_partitioner_fn")

try:
    from torch._inductor.custom_graph_pass import CustomSchedulerPass
except ImportError:  # torch 2.11: the hook takes a plain callable (its cache key pickles the pass)
    CustomSchedulerPass = None  # type: ignore[assignment]

SchedulerPassBase = CustomSchedulerPass if CustomSchedulerPass is not None else object
# Inductor's hook on its kernel list after fusion (BaseSchedulerNodes in, the order to run out).
POST_FUSION_PASS = "_post_fusion_custom_pass"
HAS_POST_FUSION_PASS = hasattr(torch._inductor.config, POST_FUSION_PASS)
HAS_PEAK_MEMORY_REORDER = hasattr(torch._inductor.config, "reorder_for_peak_memory")


def inductor_config():
    """torch._inductor.config, for ``patch`` only: graphopt never assigns torch's global config."""
    return torch._inductor.config


def core_aten_decompositions() -> dict:
    from torch._decomp import core_aten_decompositions as table
    return table()


def compile_id() -> str | None:
    """Dynamo's id of the frame being compiled, e.g. '0/1', or None outside a compile."""
    from torch._guards import CompileContext
    cid = CompileContext.current_compile_id()
    return None if cid is None else str(cid)


def trace_structured(name: str, payload: Callable[[], str], encoding: str = "string") -> None:
    """A tlparse artifact; silently nothing where structured tracing is unavailable."""
    try:
        from torch._logging import trace_structured as emit
    except ImportError:  # pragma: no cover
        return
    emit("artifact", metadata_fn=lambda: {"name": name, "encoding": encoding}, payload_fn=payload)


def structured_trace_enabled() -> bool:
    """Whether ``trace_structured`` artifacts go anywhere (``TORCH_TRACE`` set): else their
    payloads need not be made."""
    try:
        from torch._logging._internal import trace_log
    except ImportError:  # pragma: no cover
        return False
    return bool(trace_log.handlers)


def fake_tensor_mode_of(gm: torch.fx.GraphModule):
    """The FakeTensorMode that produced ``node.meta['val']`` in ``gm``, or None."""
    from torch._guards import detect_fake_mode
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    return detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])


def fake_tensor_mode():
    """A FakeTensorMode that also accepts real (and meta) tensors: shapes flow, nothing is computed."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    return FakeTensorMode(allow_non_fake_inputs=True)


def shape_guards(shape_env) -> list:
    """The sympy expressions of the guards a ShapeEnv recorded (each must hold for its graph)."""
    return [guard.expr for guard in getattr(shape_env, "guards", ())]


def is_static_graph_input(node: torch.fx.Node) -> bool:
    """A placeholder of a Dynamo graph that stands for a parameter or buffer of the model (Dynamo
    marks the inputs it lifted from modules as static)."""
    return node.op == "placeholder" and \
        "_dynamo_static_input_type" in (node.meta.get("tensor_dict") or {})


def is_symbolic(value: Any) -> bool:
    return isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool))


def vmap_add_batch_dim_functions() -> tuple:
    """The functions Dynamo records for vmap's ``_add_batch_dim`` (transformers 4.53-4.57 vmap
    their mask functions), as many as this torch has."""
    return _functorch_functions("_add_batch_dim")


def vmap_remove_batch_dim_functions() -> tuple:
    return _functorch_functions("_remove_batch_dim")


def _functorch_functions(name: str) -> tuple:
    found = []
    for module_name in ("torch._functorch.predispatch", "torch._C._functorch",
                        "torch._functorch.vmap"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        function = getattr(module, name, None)
        if function is not None and function not in found:
            found.append(function)
    return tuple(found)


def hint_int(value: Any, fallback: int = 8192) -> int:
    """A concrete int for a possibly symbolic size (its hint), for cost estimates only."""
    if isinstance(value, int):
        return value
    node = getattr(value, "node", None)
    if node is not None and node.hint is not None:
        return int(node.hint)
    if node is not None:  # unbacked or hint-less: ask the shape env, else the fallback
        try:
            return int(node.shape_env.size_hint(node.expr, allow_none=False))
        except Exception:
            return fallback
    return int(value)


def statically_equal(a: Any, b: Any) -> bool:
    """``a == b`` for sizes that may be symbolic, decided without adding a guard to the shape
    environment (False where the symbols alone do not decide it)."""
    if not is_symbolic(a) and not is_symbolic(b):
        return a == b
    from torch.fx.experimental.symbolic_shapes import statically_known_true, sym_eq
    return bool(statically_known_true(sym_eq(a, b)))


def sympy_floor_div():
    """The sympy function symbolic sizes use for ``//`` (torch.utils._sympy.functions.FloorDiv)."""
    from torch.utils._sympy.functions import FloorDiv
    return FloorDiv


def functional_collectives_ops():
    """The ``_c10d_functional`` op namespace (all_reduce, reduce_scatter_tensor, wait_tensor, ...)."""
    import torch.distributed._functional_collectives  # noqa: F401  registers the ops
    return torch.ops._c10d_functional


def symmetric_memory():
    """``torch.distributed._symmetric_memory`` or None where this build lacks it."""
    try:
        import torch.distributed._symmetric_memory as symm_mem
    except ImportError:
        return None
    return symm_mem


def set_context_parallel_rotate_method(method: str) -> None:
    """How torch's context_parallel passes K/V shards between its ranks ("alltoall": a ring;
    "allgather"); benchmarks set it to compare against that ring."""
    from torch.distributed.tensor.experimental import _attention
    _attention.set_rotate_method(method)


def context_parallel_per_document_balancer():
    """torch's per-document head-tail load balancer for context_parallel (torch >= 2.9), or None."""
    try:
        from torch.distributed.tensor.experimental import _context_parallel
    except ImportError:
        return None
    return getattr(_context_parallel, "_PerDocumentHeadTailLoadBalancer", None)


def resolve_process_group(group):
    """A ProcessGroup from None (WORLD), a group, or a group name as functional collectives carry."""
    import torch.distributed as dist
    if group is None:
        return dist.group.WORLD
    if isinstance(group, str):
        from torch.distributed.distributed_c10d import _resolve_process_group
        return _resolve_process_group(group)
    return group


def default_store():
    """The key-value store of the default process group (torchrun's TCPStore, a FileStore, ...)."""
    from torch.distributed.distributed_c10d import _get_default_store
    return _get_default_store()


def group_name(group) -> str:
    """The registered name functional collectives use to refer to ``group``."""
    group = resolve_process_group(group)
    return group.group_name


@functools.lru_cache(maxsize=None)
def print_readable_kwargs() -> dict:
    params = inspect.signature(torch.fx.GraphModule.print_readable).parameters
    kwargs = {"print_output": False}
    if "include_stride" in params:
        kwargs["include_stride"] = True
    if "include_device" in params:
        kwargs["include_device"] = True
    return kwargs


def readable_code(gm: torch.fx.GraphModule) -> str:
    """The graph as Python with shape, dtype, stride and device annotations on every line."""
    try:
        return gm.print_readable(**print_readable_kwargs())
    except Exception:  # a graph whose meta is incomplete still gets a plain listing
        return gm.code


@contextlib.contextmanager
def inductor_config_patch(**changes):
    with torch._inductor.config.patch(**changes):
        yield


def inductor_cache_dir() -> str:
    """The folder of Inductor's on-disk caches (``TORCHINDUCTOR_CACHE_DIR`` or its default)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    return cache_dir()


@contextlib.contextmanager
def no_compile_caches():
    """No Inductor FX-graph or AOTAutograd cache hits: a hit runs no backend pass."""
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield


def mark_must_save(node: torch.fx.Node) -> None:
    """Tag a joint-graph node so the partitioner saves it and never recomputes it in backward.

    The same tag torch's partitioner gives every ``_c10d_functional`` collective; graphopt ops that
    contain a collective need it (recomputing them would run the collective again on one side).
    """
    from torch.utils.checkpoint import CheckpointPolicy
    node.meta["recompute"] = CheckpointPolicy.MUST_SAVE


def pin_input_strides(node: torch.fx.Node) -> None:
    """Have Inductor hand a custom op that a pass inserted its tensor inputs in the strides of their
    ``meta["val"]``. Inductor honours a custom op's default layout constraint (exact strides) only
    where the node carries the values it was called with eagerly (``eager_input_vals``); a node a
    pass inserted has none, so Inductor gives it whatever layout it picked for the producer --
    measured on CPU: the rotated q / k of an HF Llama came contiguous [B, H, S, D] where the graph
    said [B, S, H, D] memory, and the offload copied them into the planned layout first (a second
    copy of each on the device). With them, Inductor lays the producer out as the graph says."""
    def value(arg: Any) -> Any:
        if isinstance(arg, torch.fx.Node):
            return arg.meta.get("val")
        if isinstance(arg, (list, tuple)):
            return type(arg)(value(a) for a in arg)
        return arg

    node.meta["eager_input_vals"] = (value(tuple(node.args)), value(dict(node.kwargs)))


def fake_process_group(rank: int, world_size: int) -> None:
    """Initialise torch.distributed with the in-process fake backend (graph tests, no peers)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)


def graph_break_counts() -> dict[str, int]:
    """Dynamo's graph breaks so far in this process: {reason: times} (``torch._dynamo.utils.counters``)."""
    from torch._dynamo import utils as dynamo_utils
    return dict(dynamo_utils.counters.get("graph_break", {}))


def version_counter(tensor) -> int | None:
    """How many times ``tensor``'s memory was written in place (autograd's version counter); None
    for an inference tensor, which keeps none."""
    return None if tensor.is_inference() else tensor._version


def mark_side_effectful(op) -> None:
    """Keep FX dead-code elimination from dropping ``op`` (an OpOverload) even if its output is unused."""
    from torch.fx import node as fx_node
    fx_node._side_effectful_functions.add(op)


def symmetric_tensor(shape, dtype, device, group_name: str):
    """A symmetric-memory tensor, its rendezvous handle and every rank's view of it (peer tensors).

    Feature-detected across torch versions: ``get_remote_tensor`` (newer) or ``get_buffer`` at the
    tensor's offset inside its allocation (older). Never uses multicast.
    """
    symm_mem = symmetric_memory()
    if symm_mem is None:
        raise RuntimeError(f"torch {torch.__version__} has no distributed._symmetric_memory; "
                           "use the chunked runtime (graphopt.config.overlap_mode='chunked')")
    if hasattr(symm_mem, "enable_symm_mem_for_group"):
        with contextlib.suppress(Exception):
            symm_mem.enable_symm_mem_for_group(group_name)
    local = symm_mem.empty(*shape, dtype=dtype, device=device)
    handle = symm_mem.rendezvous(local, group_name)
    if hasattr(handle, "get_remote_tensor"):
        peers = [handle.get_remote_tensor(r, local.size(), dtype) for r in range(handle.world_size)]
    else:
        offset = (local.data_ptr() - handle.buffer_ptrs[handle.rank]) // local.element_size()
        peers = [handle.get_buffer(r, list(local.size()), dtype, offset)
                 for r in range(handle.world_size)]
    return local, handle, peers


# --- real tensors at compile time (measure/op_timing) ----------------------------------------------

def real_tensors():
    """A context in which ops make real tensors although a compile's FakeTensorMode is active
    (the partitioner and the stage compilers run under it)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    return unset_fake_temporarily()


# --- partitioner internals (plan_rematerialization) -----------------------------------------------

def checkpoint_policy():
    """torch.utils.checkpoint.CheckpointPolicy (MUST_SAVE, PREFER_SAVE, MUST_RECOMPUTE, PREFER_RECOMPUTE)."""
    from torch.utils.checkpoint import CheckpointPolicy
    return CheckpointPolicy


def extract_fwd_bwd_modules(joint_module, saved_values, saved_sym_nodes, *, num_fwd_outputs,
                            static_lifetime_input_nodes=None):
    """torch's own forward/backward extraction for a chosen saved set (the backward recomputes
    whatever it needs that is not saved)."""
    from torch._functorch.partitioners import _extract_fwd_bwd_modules
    from torch.utils._ordered_set import OrderedSet
    params = inspect.signature(_extract_fwd_bwd_modules).parameters
    kwargs = {"num_fwd_outputs": num_fwd_outputs}
    if "static_lifetime_input_nodes" in params:
        kwargs["static_lifetime_input_nodes"] = OrderedSet(static_lifetime_input_nodes or ())
    return _extract_fwd_bwd_modules(joint_module, list(saved_values), list(saved_sym_nodes), **kwargs)


def activation_memory_budget_patch(fraction: float):
    """Context manager setting torch's own activation_memory_budget (the baseline in bench/remat.py)."""
    return torch._functorch.config.patch(activation_memory_budget=fraction)


def saved_for_backward_output_indices(fw_gm: torch.fx.GraphModule) -> list[int] | None:
    """Positions of the forward graph's outputs that AOTAutograd saves for the backward.

    Read from the output descriptors AOTAutograd attaches (``meta["desc"]``); None where this torch
    does not attach them (the caller then needs the names from the partitioner)."""
    output = next(iter(fw_gm.graph.find_nodes(op="output")))
    descs = output.meta.get("desc")
    if not isinstance(descs, (list, tuple)) or len(descs) != len(output.args[0]):
        return None
    return [i for i, desc in enumerate(descs) if type(desc).__name__.startswith("SavedForBackwards")]



@contextlib.contextmanager
def cuda_allocator_settings(settings: str, restore: str):
    """The CUDA caching allocator configured with ``settings`` (``PYTORCH_CUDA_ALLOC_CONF``
    syntax, e.g. "expandable_segments:True") for the scope, ``restore`` after; segments allocated
    before keep their kind."""
    torch.cuda.memory._set_allocator_settings(settings)
    try:
        yield
    finally:
        torch.cuda.memory._set_allocator_settings(restore)


def record_cuda_memory_history(enabled: bool, max_entries: int = 200_000, stacks: str = "all") -> None:
    """Start (or stop) the CUDA caching allocator's record of allocations and frees; ``stacks``
    "python" records Python frames only (cheaper than "all", which adds C++)."""
    torch.cuda.memory._record_memory_history("all" if enabled else None, stacks=stacks,
                                             max_entries=max_entries)


def cuda_memory_trace() -> list[dict]:
    """The recorded allocator events of the current device: dicts with 'action' and 'size'."""
    snapshot = torch.cuda.memory._snapshot()
    traces = snapshot.get("device_traces") or [[]]
    return list(traces[torch.cuda.current_device()] if len(traces) > 1 else traces[0])


# --- torch.utils.checkpoint regions under torch.compile (shard_attention) -------------------------

def checkpoint_regions(gm: torch.fx.GraphModule) -> list[torch.fx.GraphModule]:
    """The bodies of ``torch.utils.checkpoint`` regions Dynamo recorded in ``gm`` (any depth)."""
    hop = getattr(torch.ops.higher_order, "tag_activation_checkpoint", None)
    bodies = []
    for owner in (m for m in gm.modules() if isinstance(m, torch.fx.GraphModule)):
        for node in owner.graph.nodes:
            if node.op == "call_function" and node.target is hop and node.args[0].op == "get_attr":
                bodies.append(owner.get_submodule(node.args[0].target))
    return bodies


def checkpoint_region_context_fn(body: torch.fx.GraphModule):
    """The ``context_fn`` (selective-checkpoint policy) of a region's body; None for plain AC."""
    return body.meta.get("_checkpoint_context_fn")


def set_checkpoint_region_context_fn(body: torch.fx.GraphModule, context_fn) -> None:
    body.meta["_checkpoint_context_fn"] = context_fn


def cleanup_recompute_tags(joint_module):
    """torch's pass that saves the boundary between consecutive checkpointed regions (their last
    output becomes MUST_SAVE), so a plan recomputes one region at a time, as min-cut does."""
    from torch._functorch import partitioners
    cleanup = getattr(partitioners, "cleanup_recompute_tags", None)
    if cleanup is None:  # pragma: no cover - older torch
        return joint_module
    if "is_default_partition" in inspect.signature(cleanup).parameters:
        return cleanup(joint_module, is_default_partition=False)
    return cleanup(joint_module)
