from graphopt.backends.graphopt_backend import backend, compile_graph

__all__ = ["backend", "compile_graph"]
