import importlib.util
import os

import pytest
import torch

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every test compiles from scratch and sees only its own compile summaries."""
    import torch._dynamo
    from graphopt.debug.dump import clear_compile_summaries

    torch._dynamo.reset()
    clear_compile_summaries()
    yield
    torch._dynamo.reset()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run through the device tool)")
    skip_multi = pytest.mark.skip(reason="needs two or more CUDA GPUs")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "multigpu" in item.keywords and torch.cuda.device_count() < 2:
            item.add_marker(skip_multi)


BENCH_DIR = os.path.join(os.path.dirname(__file__), "..", "bench")


def load_bench(name: str):
    """bench/<name>.py as a module (the benches are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(BENCH_DIR, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
