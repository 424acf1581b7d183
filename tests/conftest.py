"""Test set-up shared by every test: a fresh Dynamo per test, skip reasons a user understands, and
the Triton-interpreter tests run in one subprocess per module with their results reported here.

Markers (pyproject.toml): ``gpu`` needs a CUDA GPU, ``multigpu`` two of them; ``slow`` compiles
through Inductor on CPU; ``triton_interpreter`` runs a Triton kernel under ``TRITON_INTERPRET=1``.
The interpreter must be switched on before triton is first imported, which other tests do, so
without it set, the first such test of a module starts one ``pytest`` subprocess with it set for
all of the module's, and each test passes, fails or skips here as it did there (counted as run, not as skipped).
"""

import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
# Inductor's on-disk caches start empty for every test process (and the processes it spawns), so
# that what a test sees of graphopt's stages does not depend on what an earlier run left in /tmp:
# a cache hit runs no partitioner and no forward / backward pass. Tests of the cache itself give
# their own folder. TORCHINDUCTOR_CACHE_DIR set by the caller is kept.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="graphopt-tests-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# Set in the interpreter subprocess: where each test's outcome is written for the parent.
_REPORT_ENV = "GRAPHOPT_INTERPRETER_REPORT"
_INTERPRETER_TIMEOUT_S = 900
_INTERPRETED_IDS = pytest.StashKey[list]()
_INTERPRETED_RESULTS = pytest.StashKey[dict]()  # module -> node id -> outcome
_INTERPRETER_TAIL = pytest.StashKey[dict]()     # module -> the subprocess's last output


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every test compiles from scratch and sees only its own compile summaries."""
    import torch._dynamo
    from graphopt.debug.dump import clear_compile_summaries

    torch._dynamo.reset()
    clear_compile_summaries()
    yield
    torch._dynamo.reset()


def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def pytest_collection_modifyitems(config, items):
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_multi = pytest.mark.skip(reason="needs 2 CUDA GPUs")
    skip_triton = pytest.mark.skip(
        reason="needs triton to run the Triton interpreter: pip install -e '.[test]'")
    interpreted = []
    for item in items:
        if "gpu" in item.keywords and gpus == 0:
            item.add_marker(skip_gpu)
        elif "multigpu" in item.keywords and gpus < 2:
            item.add_marker(skip_multi)
        elif "triton_interpreter" in item.keywords:
            if not _has_triton():
                item.add_marker(skip_triton)
            elif not INTERPRETED:
                interpreted.append(item.nodeid)
    config.stash[_INTERPRETED_IDS] = interpreted


def _interpreter_results(config, nodeid: str) -> dict:
    """Run the collected ``triton_interpreter`` tests of ``nodeid``'s module once, in one
    subprocess; outcome by node id. Per module, so that pytest-xdist's workers (``--dist
    loadfile``: a module's tests on one worker) each run only the tests they were given."""
    module = nodeid.split("::")[0]
    cache = config.stash.setdefault(_INTERPRETED_RESULTS, {})
    if module in cache:
        return cache[module]
    ids = [i for i in config.stash[_INTERPRETED_IDS] if i.split("::")[0] == module]
    with tempfile.TemporaryDirectory(prefix="graphopt_interpreter_") as folder:
        report = os.path.join(folder, "report.jsonl")
        env = dict(os.environ, TRITON_INTERPRET="1", **{_REPORT_ENV: report})
        env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
        try:
            done = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                 *ids],
                cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                timeout=_INTERPRETER_TIMEOUT_S)
            tail = done.stdout[-4000:] + done.stderr[-2000:]
        except subprocess.TimeoutExpired:
            tail = f"the interpreter subprocess ran past {_INTERPRETER_TIMEOUT_S} s"
        results = {}
        if os.path.exists(report):
            with open(report) as handle:
                for line in handle:
                    record = json.loads(line)
                    results[record["nodeid"]] = record
    cache[module] = results
    config.stash.setdefault(_INTERPRETER_TAIL, {})[module] = tail
    return results


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """A ``triton_interpreter`` test outside the interpreter reports its subprocess outcome."""
    if INTERPRETED or "triton_interpreter" not in pyfuncitem.keywords:
        return None
    config = pyfuncitem.config
    record = _interpreter_results(config, pyfuncitem.nodeid).get(pyfuncitem.nodeid)
    if record is None:
        pytest.fail("the Triton-interpreter subprocess reported no result for this test:\n"
                    + config.stash[_INTERPRETER_TAIL][pyfuncitem.nodeid.split("::")[0]],
                    pytrace=False)
    if record["outcome"] == "skipped":
        pytest.skip(record["message"])
    if record["outcome"] == "failed":
        pytest.fail("under TRITON_INTERPRET=1 in a subprocess:\n" + record["message"], pytrace=False)
    return True


def pytest_runtest_logreport(report):
    """In the interpreter subprocess: write each test's outcome for the parent process."""
    path = os.environ.get(_REPORT_ENV)
    if not path or not INTERPRETED:
        return
    if report.when == "call" or report.outcome != "passed":
        message = "" if report.passed else (
            report.longrepr[2] if report.skipped and isinstance(report.longrepr, tuple)
            else str(report.longrepr)[-6000:])
        with open(path, "a") as handle:
            handle.write(json.dumps({"nodeid": report.nodeid, "outcome": report.outcome,
                                     "message": message}) + "\n")


BENCH_DIR = os.path.join(os.path.dirname(__file__), "..", "bench")


def load_bench(name: str):
    """bench/<name>.py as a module (the benches are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(BENCH_DIR, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module
