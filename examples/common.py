"""What the examples share: starting under torchrun, their command-line sizes, and ``--check``,
which trains an eager, unsharded copy of the model beside the compiled one and compares losses.

Not part of graphopt: each example's own file shows everything graphopt needs.
"""

from __future__ import annotations

import argparse
import copy
import os
from typing import Callable

import torch
import torch.distributed as dist

from graphopt.debug.dump import describe_compiles


def parse_args(description: str, **defaults) -> argparse.Namespace:
    """Sizes default to 8B-model layer dimensions on a GPU; ``--model tiny`` runs on any CPU."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", choices=("llama3-8b", "tiny"), default="llama3-8b",
                        help="layer dimensions: Llama 3 8B's, or a tiny model for CPU runs")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=defaults.get("seq_len", 8192),
                        help="tokens per sequence (the whole sequence, before any sharding)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--codegen", choices=("inductor", "eager"), default="inductor",
                        help="eager compiles in seconds on CPU; inductor generates fused kernels")
    parser.add_argument("--dump-dir", default=None, help="write graphopt's dump here")
    parser.add_argument("--check", action="store_true",
                        help="train an eager copy alongside and fail if the losses disagree")
    for name, (kind, value, text) in defaults.get("extra", {}).items():
        if kind is bool:
            parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=value,
                                help=text)
        else:
            parser.add_argument(f"--{name}", type=kind, default=value, help=text)
    return parser.parse_args()


def init_distributed() -> torch.device:
    """The process group torchrun asked for: NCCL with one GPU per rank, else gloo on CPU."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return device


def training_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def random_batch(step: int, vocab_size: int, batch: int, seq_len: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, the same on every rank (a real loader reads a data set)."""
    generator = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, vocab_size, (batch, seq_len + 1), generator=generator)
    return tokens[:, :-1].to(device), tokens[:, 1:].to(device)


def log(text: str) -> None:
    if dist.get_rank() == 0:
        print(text, flush=True)


LEARNING_RATE = 1e-3


class EagerCheck:
    """``--check``: an eager, unsharded copy of the model (made before any sharding) trained with
    the same optimizer beside the compiled one; each step's losses are compared."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model = copy.deepcopy(model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LEARNING_RATE)
        # fp32 on CPU agrees to ~1e-7 where the rewrite is right (sums reorder); bf16 on GPU less
        self.tolerance = 2e-2 if device.type == "cuda" else 1e-5
        self.worst = 0.0

    def compare(self, step: int, loss: float,
                reference_loss: Callable[[torch.nn.Module], torch.Tensor]) -> None:
        expected = reference_loss(self.model)
        expected.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        error = abs(loss - expected.item()) / max(abs(expected.item()), 1e-6)
        self.worst = max(self.worst, error)
        log(f"step {step}: loss {loss:.6f}, eager reference {expected.item():.6f} "
            f"(rel. diff {error:.1e})")

    def finish(self) -> None:
        if self.worst > self.tolerance:
            log(f"check FAILED: compiled and eager losses differ by {self.worst:.2e} "
                f"(tolerance {self.tolerance:.0e})")
            raise SystemExit(1)
        log(f"check OK: losses agree to {self.worst:.1e}")


def report(step: int, loss: float, check: EagerCheck | None,
           reference_loss: Callable[[torch.nn.Module], torch.Tensor]) -> None:
    """After an optimizer step: what graphopt did and the peak memory (first step), then the loss
    or the comparison with the eager copy."""
    if step == 0:
        log(describe_compiles())
        if torch.cuda.is_available():
            log(f"peak memory, rank 0: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    if check is not None:
        check.compare(step, loss, reference_loss)
    else:
        log(f"step {step}: loss {loss:.4f}")
