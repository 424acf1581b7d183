"""The README as a new user follows it: every fenced Python block runs as printed, and every
command it prints (`python -m graphopt ...`, `torchrun ...`) runs as printed and does what the
README says, each in a fresh process in an empty folder (with `examples/` beside it)."""

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
TIMEOUT_S = 600

PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
COMMANDS = [line.split("#")[0].strip()
            for block in re.findall(r"```bash\n(.*?)```", README, re.S)
            for line in block.splitlines()
            if line.startswith(("python -m graphopt", "torchrun "))]

def _run(argv: list[str], cwd: pathlib.Path) -> subprocess.CompletedProcess:
    (cwd / "examples").symlink_to(REPO / "examples")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, f"{' '.join(argv)}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


def _argv(command: str) -> list[str]:
    words = shlex.split(command)
    if words[0] == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", *words[1:]]
    assert words[0] == "python", command
    return [sys.executable, *words[1:]]


def test_the_readme_shows_the_commands_and_recipes_it_promises():
    assert len(PYTHON_BLOCKS) >= 1
    for expected in ("--help", "flags", "demo", "calibrate --out profile.json"):
        assert f"python -m graphopt {expected}" in COMMANDS, expected
    for script in ("sequence_parallel", "tensor_parallel", "fsdp_memory_budget", "hf_llama"):
        assert any(f"examples/{script}.py" in c and "--check" in c for c in COMMANDS), script
    for link in re.findall(r"\]\(((?:docs|examples)/[^)#]*)\)", README):
        assert (REPO / link).exists(), link


def test_the_readme_never_shows_flags_patched_around_torch_compile():
    """Flags patched around ``torch.compile`` are not there when the graph compiles (at the first
    call); the README shows only graphopt.backend(**flags)."""
    assert "config.patch" not in README


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_block_runs_as_printed(index, tmp_path):
    script = tmp_path / "snippet.py"
    script.write_text(PYTHON_BLOCKS[index])
    done = _run([sys.executable, str(script)], tmp_path)
    if "dump_dir=" in PYTHON_BLOCKS[index]:
        index_page = (tmp_path / "graphopt_dump" / "index.html").read_text()
        assert "plan_rematerialization" in index_page, "the snippet's memory budget left no plan"
    if "describe_compiles()" in PYTHON_BLOCKS[index]:
        assert "partition / plan_rematerialization: planned peak" in done.stdout


def _expect(command: str, done: subprocess.CompletedProcess, folder: pathlib.Path) -> None:
    """What the README says each command does."""
    out = done.stdout
    if command.endswith("--help"):
        assert all(word in out for word in ("demo", "calibrate", "flags"))
    elif command.endswith(" flags"):
        assert "[general]" in out and "memory_budget" in out and "sequence_parallel_attention" in out
    elif command.endswith(" demo"):
        assert "MISMATCH" not in out and out.count(" OK ") >= 4
        index = (folder / "graphopt_dump" / "index.html").read_text()
        assert all(p in index for p in ("shard_attention", "overlap_matmul",
                                        "plan_rematerialization", "offload_activations"))
    elif " calibrate " in command:
        profile = json.loads((folder / "profile.json").read_text())
        assert profile["matmul_tflops"] > 0
        if not torch.cuda.is_available():
            assert "no CUDA GPU visible" in out and "keeps built-in defaults" in out
    elif "--check" in command:
        assert "check OK" in out
    else:
        raise AssertionError(f"no expectation written for {command!r}")


@pytest.mark.parametrize("command", [
    pytest.param(c, id=c.replace("torchrun --standalone ", "")) for c in COMMANDS])
def test_command_runs_as_printed(command, tmp_path):
    done = _run(_argv(command), tmp_path)
    _expect(command, done, tmp_path)
