"""graphopt: a torch.compile backend for long-context, multi-GPU training.

    import graphopt
    model = torch.compile(model, backend=graphopt.backend(sequence_parallel_attention=True,
                                                          memory_budget="60GiB"))
"""

from graphopt import config
from graphopt.backends import backend, compile_graph

__version__ = "0.1.0"


def _register() -> None:
    from graphopt import _compat
    try:
        _compat.register_backend(name="graphopt")(compile_graph)
    except Exception:  # already registered (for example through the entry point)
        pass


_register()

__all__ = ["backend", "compile_graph", "config", "__version__"]
