"""Run a function in several processes with torch.distributed initialised (gloo or NCCL).

Used by the demo and the distributed CPU tests: ``spawn(fn, 3, arg)`` calls ``fn(rank, 3, arg)``
in three fresh processes and returns what each returned.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from graphopt.distributed import faults


class WorkerFailed(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, backend: str, timeout_s: float,
            result_dir: str, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    path = os.path.join(result_dir, f"rank{rank}.pt")
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
        value = fn(rank, world_size, *args)
        torch.save({"ok": True, "value": value}, path)
    except BaseException as error:
        faults.report(error)  # the peers' graphopt waits end with this rank's message
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo",
          timeout_s: float = 300) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return their results.

    ``fn`` must be importable by name (a module-level function): workers are started fresh.
    A failure on any rank raises :class:`WorkerFailed` with that rank's traceback.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ValueError(f"backend 'nccl' with {world_size} processes needs {world_size} GPUs, "
                         f"{torch.cuda.device_count()} visible; use backend='gloo' or fewer ranks")
    with tempfile.TemporaryDirectory(prefix="graphopt_spawn_") as result_dir:
        context = mp.start_processes(
            _worker, args=(world_size, free_port(), backend, timeout_s, result_dir, fn, args),
            nprocs=world_size, join=False, start_method="spawn")
        crashed = None
        try:
            while not context.join(timeout=timeout_s):
                pass
        except Exception as err:  # a worker exited non-zero; its traceback is in its result file
            crashed = err
        results, errors = [], []
        for rank in range(world_size):
            path = os.path.join(result_dir, f"rank{rank}.pt")
            if not os.path.exists(path):
                errors.append(f"rank {rank} died without a result ({crashed})")
                continue
            record = torch.load(path, weights_only=False)
            if record["ok"]:
                results.append(record["value"])
            else:
                errors.append(f"rank {rank}:\n{record['error']}")
        if errors:
            raise WorkerFailed("\n".join(errors))
        return results
