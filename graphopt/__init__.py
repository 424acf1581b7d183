"""graphopt: a torch.compile backend for long-context, multi-GPU training.

    import graphopt
    model = torch.compile(model, backend=graphopt.backend(sequence_parallel_attention=True,
                                                          memory_budget="60GiB"))

Flags given to ``graphopt.backend(...)`` apply to every graph that backend compiles; a
``graphopt.config.patch`` applies to graphs compiled while it is active (at the model's first call).
"""

from graphopt import config
from graphopt.backends import backend, compile_graph

__version__ = "0.1.0"


def parallelize(model, plan, **flag_overrides):
    """Apply a layout plan (``graphopt.planning.plan``'s report, or a Layout) to ``model``: device
    mesh, tensor parallelism, per-block graphopt compile, FSDP2, sequence sharding.
    See graphopt/planning/parallelize.py."""
    from graphopt.planning.parallelize import parallelize as apply
    return apply(model, plan, **flag_overrides)


def _register() -> None:
    from graphopt import _compat
    try:
        _compat.register_backend(name="graphopt")(compile_graph)
    except Exception:  # already registered (for example through the entry point)
        pass


_register()

__all__ = ["backend", "compile_graph", "config", "parallelize", "__version__"]
