"""Layouts: one way to spread a training step over the world, and the rules that enumerate them.

A layout fixes the data-parallel degree (FSDP2 shards parameters, gradients and optimizer state over
the data- and sequence-parallel ranks), the tensor-parallel degree, the sequence-parallel degree
(graphopt's sequence-parallel attention), the micro-batch and gradient accumulation, the memory
plan of every block (graphopt's remat budget, activation offload) and the code generator.

Enumeration is deterministic (sorted, no sets), so every rank that plans gets the same list.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from graphopt.planning.world import World


@dataclasses.dataclass(frozen=True, order=True)
class MemoryPlan:
    """How each block's activations are kept: graphopt's ``memory_budget`` as a fraction of the
    min-cut plan's saved bytes (1.0: the runtime-optimal min-cut plan; lower recomputes more; None:
    no budget, offload alone) and ``offload_activations``."""

    budget: Optional[float] = 1.0
    offload: bool = False

    def __post_init__(self) -> None:
        if self.budget is None and not self.offload:
            raise ValueError("MemoryPlan(budget=None) needs offload=True; use budget=1.0 for the "
                             "min-cut plan without offload")
        if self.budget is not None and not 0 < self.budget <= 1:
            raise ValueError(f"MemoryPlan budget {self.budget} must be a fraction in (0, 1]")

    def flags(self) -> dict[str, Any]:
        return {"memory_budget": self.budget, "offload_activations": self.offload}

    def describe(self) -> str:
        if self.budget is None:
            return "offload"
        name = "min-cut" if self.budget == 1.0 else f"remat {self.budget:g}"
        return name + (" + offload" if self.offload else "")

    def sort_key(self) -> tuple:
        return (self.budget is None, -(self.budget or 0.0), self.offload)


MIN_CUT = MemoryPlan(1.0)
DEFAULT_MEMORY_PLANS = (MemoryPlan(1.0), MemoryPlan(None, True), MemoryPlan(0.6), MemoryPlan(0.3))
CODEGENS = ("inductor", "eager")


@dataclasses.dataclass(frozen=True)
class Layout:
    dp: int
    tp: int
    sp: int
    micro_batch: int
    grad_accum: int
    memory: MemoryPlan = MIN_CUT
    codegen: str = "inductor"
    reshard_after_forward: bool = True   # FSDP2: free the gathered parameters after forward

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.sp

    @property
    def fsdp(self) -> int:
        """Ranks the parameters are sharded over: the data- and sequence-parallel ranks."""
        return self.dp * self.sp

    def key(self) -> tuple:
        return (self.tp, self.sp, self.dp, self.micro_batch, self.memory.sort_key(),
                CODEGENS.index(self.codegen) if self.codegen in CODEGENS else 9,
                not self.reshard_after_forward)

    def describe(self) -> str:
        parts = [f"dp{self.dp}", f"tp{self.tp}", f"sp{self.sp}",
                 f"mb{self.micro_batch}x{self.grad_accum}", self.memory.describe()]
        if self.codegen != "inductor":
            parts.append(self.codegen)
        if self.fsdp > 1 and not self.reshard_after_forward:
            parts.append("no-reshard")
        return " ".join(parts)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["memory"] = dataclasses.asdict(self.memory)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Layout":
        return cls(**{**data, "memory": MemoryPlan(**data["memory"])})


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """What the enumeration tries; None tries every value the rules allow."""

    tp_degrees: Optional[tuple[int, ...]] = None
    sp_degrees: Optional[tuple[int, ...]] = None
    micro_batches: Optional[tuple[int, ...]] = (1, 2, 4, 8)
    memory_plans: tuple[MemoryPlan, ...] = DEFAULT_MEMORY_PLANS
    codegens: tuple[str, ...] = ("inductor",)
    reshard_after_forward: tuple[bool, ...] = (True, False)
    min_tokens_per_sp_rank: int = 1024   # finer sequence sharding leaves each rank too little work

    def __post_init__(self) -> None:
        unknown = [c for c in self.codegens if c not in CODEGENS]
        if unknown:
            raise ValueError(f"codegens {unknown} are not among {CODEGENS}")


@dataclasses.dataclass(frozen=True)
class Refused:
    what: str
    reason: str


def enumerate_layouts(facts, world: World, seq_len: int, global_batch_tokens: int,
                      space: SearchSpace = SearchSpace()) -> tuple[list[Layout], list[Refused]]:
    """Every layout of ``world`` the rules allow for this batch, and what was refused and why.

    Rules: tp divides the block's heads and split widths (``facts.tp_refusal``); every group is
    placed evenly on nodes; sp divides the sequence and leaves each rank at least
    ``min_tokens_per_sp_rank`` tokens; dp divides the global batch's sequences; micro-batch x
    gradient accumulation = the sequences of one data-parallel rank."""
    if seq_len < 1 or global_batch_tokens < 1:
        raise ValueError(f"seq_len={seq_len} and global_batch_tokens={global_batch_tokens} must be positive")
    if global_batch_tokens % seq_len:
        raise ValueError(f"global batch of {global_batch_tokens} tokens is not a whole number of "
                         f"sequences of {seq_len}; give a multiple of {seq_len}")
    sequences = global_batch_tokens // seq_len
    size = world.size
    layouts: list[Layout] = []
    refused: list[Refused] = []
    for tp in _divisors(size):
        if space.tp_degrees is not None and tp not in space.tp_degrees:
            continue
        why = facts.tp_refusal(tp) or world.placement_refusal(tp, 1)
        if why:
            refused.append(Refused(f"tp{tp}", why))
            continue
        for sp in _divisors(size // tp):
            if space.sp_degrees is not None and sp not in space.sp_degrees:
                continue
            why = _sp_refusal(sp, seq_len, space) or world.placement_refusal(sp, tp)
            if why:
                refused.append(Refused(f"tp{tp} sp{sp}", why))
                continue
            dp = size // (tp * sp)
            why = world.placement_refusal(dp, tp * sp)
            if why is None and sequences % dp:
                why = (f"the global batch's {sequences} sequences do not split over {dp} "
                       "data-parallel ranks")
            if why:
                refused.append(Refused(f"dp{dp} tp{tp} sp{sp}", why))
                continue
            per_rank = sequences // dp
            for micro in _divisors(per_rank):
                if space.micro_batches is not None and micro not in space.micro_batches:
                    continue
                for memory in sorted(space.memory_plans, key=MemoryPlan.sort_key):
                    for codegen in space.codegens:
                        reshards = space.reshard_after_forward if dp * sp > 1 else (True,)
                        for reshard in reshards:
                            layouts.append(Layout(dp, tp, sp, micro, per_rank // micro, memory,
                                                  codegen, reshard))
    layouts.sort(key=Layout.key)
    return layouts, refused


def _sp_refusal(sp: int, seq_len: int, space: SearchSpace) -> Optional[str]:
    if sp == 1:
        return None
    if seq_len % sp:
        return f"sequence length {seq_len} is not divisible by sp={sp}"
    if seq_len // sp < space.min_tokens_per_sp_rank:
        return (f"sp={sp} leaves {seq_len // sp} tokens per rank, fewer than "
                f"{space.min_tokens_per_sp_rank}")
    return None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
