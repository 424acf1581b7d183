"""Step time, peak memory per GPU and MFU of one layout, with the parts shown.

Per micro-batch, one rank runs every block (forward, backward, recomputation), the head (embedding,
final norm, output projection, loss) and the collectives its layout adds; per step, gradient
accumulation repeats that and the optimizer updates its shard. The model, part by part:

  block      the block's joint graph traced at toy size (``model_facts``) evaluated at
             (micro-batch, local sequence); the memory plan is graphopt's own
             (``plan_rematerialization.choose_plan``: min-cut, then remat budget / offload), planned
             on that graph as the pass plans it (exactly up to MAX_EXACT_PLANS sizes, then replayed
             from the nearest size). Offload adds its copies' traffic through device memory. Its schedule (forward, backward with
             recomputation before first use) is priced kernel by kernel: GEMMs at the sustained
             GEMM rate (less the last partial wave of 128 x 128 tiles over the SMs), attention at
             the profile's attention rate, everything else at HBM bandwidth over the bytes the
             kernel reads and writes. Under Inductor a pointwise chain is one kernel
             (``liveness.inline_pointwise``: what it computes inside its readers moves no bytes);
             under eager codegen every op is a kernel. Each kernel costs at least a launch.
  head       eager (the blocks are what graphopt compiles): every op a kernel; memory as autograd
             keeps it (what the backward reads is saved, nothing recomputed).
  TP         plain Megatron tensor parallelism: per block an all-reduce after each row-parallel
             GEMM in forward, priced by ``overlap_cost.choose_overlap`` (what the overlap pass will
             choose at that site: sequential, chunked, copy engine or tile -- the last two only
             inside a node), and an all-reduce of each column-parallel group's input gradient in
             backward, which the pass leaves sequential (a sum of GEMMs feeds it).
  SP         graphopt's sequence-parallel attention: each rank holds seq/sp tokens; causal work is
             balanced, so each rank does 1/sp of the attention; K/V travel around the ring in
             sp - 1 steps (forward: K and V; backward: K, V and their gradients), each step hidden
             under that step's attention unless the link is slower, plus a latency and a few
             launches per step (SP_STEP_KERNELS).
  FSDP2      parameters, gradients and optimizer state sharded over dp x sp ranks: per micro-batch
             and block an all-gather in forward (and again in backward when parameters are
             resharded after forward) and a reduce-scatter of the gradients, each overlapped with
             the neighbouring block's compute (exposed: what exceeds it, plus the first gather and
             the last reduce-scatter); the head's parameters are gathered and reduced without overlap.
  optimizer  memory-bound: read parameters, gradients and state, write parameters and state.

Peak memory per GPU = sharded parameters, gradients and optimizer state + FSDP's gathered
parameters (two blocks in flight, or every block without resharding) + activations: every block's
saved tensors at the end of its forward, then the larger of (one block's whole forward + backward
on top of the others', with the head's outputs held) and (the head's own peak on top of every block).

Comm is priced at the world's links (``World.link``): NVLink inside a node, the network across.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

from graphopt.analysis import liveness, overlap_cost, remat_solver
from graphopt.analysis.device_profile import DeviceProfile
from graphopt.analysis.remat_solver import JointGraph, Plan
from graphopt.planning.layouts import MIN_CUT, Layout, MemoryPlan
from graphopt.planning.model_facts import BlockFacts, JointGraphAtSize, ModelFacts
from graphopt.planning.world import GIB, World

NUM_SMS = overlap_cost.NUM_SMS
# Remat / offload plans solved exactly (graphopt's own planner at the layout's size), per
# (tp, memory plan, codegen, tokens per micro-batch); beyond, a layout replays the plan solved at
# the nearest token count (simulated at its own size): a search over hundreds of layouts stays at
# seconds per plan, and the one-GPU sweep, with fewer keys, is planned exactly.
MAX_EXACT_PLANS = 48
# Kernels one ring step of sequence-parallel attention launches besides its attention block
# (exchange, partial-output merge, log-sum-exp update), each at least a launch.
SP_STEP_KERNELS = 4
GEMM_TILE = 128   # rows and columns of one output tile: a GEMM runs whole waves of NUM_SMS tiles


@dataclasses.dataclass(frozen=True)
class Rates:
    """What the profile says each kind of kernel runs at (per second)."""

    gemm: float
    gemm_fp32: float
    attention: float
    hbm: float
    launch_s: float

    @classmethod
    def of(cls, profile: DeviceProfile) -> "Rates":
        gemm = (profile.sustained_matmul_tflops or profile.matmul_tflops) * 1e12
        attention = (profile.attention_tflops or profile.matmul_tflops) * 1e12
        return cls(gemm, profile.matmul_tflops_fp32 * 1e12, attention, profile.hbm_gbps * 1e9,
                   profile.kernel_launch_s)


@dataclasses.dataclass(frozen=True)
class Training:
    """What one parameter costs in memory and in the optimizer, beside the model itself."""

    param_bytes: int          # the stored (sharded) parameter: 2 for bf16, 4 for fp32 master weights
    grad_bytes: int           # the stored gradient, also the reduce-scatter's dtype
    optimizer_bytes: float    # optimizer state per parameter (Adam: 2 x its dtype's bytes)

    @classmethod
    def for_dtype(cls, nbytes: int, optimizer_bytes: Optional[float] = None) -> "Training":
        return cls(nbytes, nbytes, 2 * nbytes if optimizer_bytes is None else optimizer_bytes)


@dataclasses.dataclass
class BlockRun:
    """One block at one size, under one memory plan and code generator (per micro-batch)."""

    forward_s: float
    backward_s: float           # backward, recomputation included
    recompute_s: float
    forward_end_bytes: int      # saved tensors + the block's output, at the end of its forward
    peak_bytes: int             # the block's own forward + backward high-water mark
    offloaded_bytes: int
    exposed_copies_s: float
    attention_forward_s: float  # per rank, sequence parallelism included
    attention_backward_s: float
    saved: int
    recomputed: int
    refusals: tuple[str, ...]


@dataclasses.dataclass
class HeadRun:
    time_s: float
    peak_bytes: int
    held_bytes: int             # outputs the caller keeps through the backward (logits)


@dataclasses.dataclass
class Prediction:
    layout: Layout
    step_s: float
    parts_s: dict[str, float]          # where the step's time goes (sums to step_s)
    exposed_by_link_s: dict[str, float]
    memory_bytes: dict[str, int]       # what the peak is made of (sums to peak_bytes)
    peak_bytes: int
    usable_bytes: int
    mfu: float
    tokens_per_s_per_gpu: float
    overlap: dict[str, list[str]]      # TP sites: the runtime the overlap pass will pick
    notes: list[str]

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.usable_bytes

    def why_not_fit(self) -> Optional[str]:
        if self.fits:
            return None
        big = max(self.memory_bytes, key=self.memory_bytes.get)
        return (f"predicted peak {self.peak_bytes / GIB:.1f} GiB > {self.usable_bytes / GIB:.1f} GiB "
                f"usable (largest part: {big} {self.memory_bytes[big] / GIB:.1f} GiB)")

    def to_json(self) -> dict[str, Any]:
        return {"layout": self.layout.to_json(), "describe": self.layout.describe(),
                "step_s": self.step_s, "parts_s": self.parts_s,
                "exposed_by_link_s": self.exposed_by_link_s, "memory_bytes": self.memory_bytes,
                "peak_bytes": self.peak_bytes, "usable_bytes": self.usable_bytes, "fits": self.fits,
                "mfu": self.mfu, "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu,
                "overlap": self.overlap, "notes": self.notes}


class Predictor:
    """Predictions for one model, world and batch; caches every block and head evaluation."""

    def __init__(self, facts: ModelFacts, world: World, seq_len: int, global_batch_tokens: int,
                 training: Optional[Training] = None):
        self.facts, self.world = facts, world
        self.seq_len, self.global_batch_tokens = seq_len, global_batch_tokens
        self.compute_bytes = itemsize(facts.compute_dtype)
        self.training = training or Training.for_dtype(itemsize(facts.param_dtype))
        self.rates = Rates.of(world.profile)
        self._runs: dict[tuple, BlockRun] = {}
        self._heads: dict[tuple, HeadRun] = {}
        self._graphs: dict[tuple, JointGraph] = {}
        self._solved: dict[tuple, Plan] = {}
        self._model_flops: Optional[float] = None

    # -- the whole step --

    def predict(self, layout: Layout) -> Prediction:
        facts, world = self.facts, self.world
        if layout.world_size != world.size:
            raise ValueError(f"layout {layout.describe()} uses {layout.world_size} GPUs; the world "
                             f"has {world.size}")
        if self.seq_len % layout.sp:
            raise ValueError(f"sequence length {self.seq_len} does not split over sp={layout.sp}")
        s_local = self.seq_len // layout.sp
        mb, layers = layout.micro_batch, facts.n_blocks
        block = facts.block(layout.tp)
        run = self.block_run(block, mb, s_local, layout.memory, layout.codegen, layout.sp)
        head = self.head_run(mb, s_local)
        notes = list(run.refusals)

        tp_link = world.link(layout.tp, 1)
        sp_link = world.link(layout.sp, layout.tp)
        fsdp_link = world.link(layout.fsdp, layout.tp)
        tp_exposed, overlap = self._tensor_parallel(block, mb * s_local, layout.tp, tp_link)
        sp_exposed = self._sequence_parallel(block, run, mb, s_local, layout.sp, sp_link)
        block_compute = run.forward_s + run.backward_s
        fsdp_micro, fsdp_tail = self._fsdp(layout, block, run, fsdp_link)

        micro = layers * (block_compute + tp_exposed + sp_exposed + run.exposed_copies_s) \
            + head.time_s + fsdp_micro
        optimizer = self._optimizer_s(layout, block)
        step = layout.grad_accum * micro + fsdp_tail + optimizer
        ga = layout.grad_accum
        parts = {
            "compute": ga * (layers * (block_compute - run.recompute_s) + head.time_s),
            "recompute": ga * layers * run.recompute_s,
            "tp_comm": ga * layers * tp_exposed,
            "sp_comm": ga * layers * sp_exposed,
            "fsdp_comm": ga * fsdp_micro + fsdp_tail,
            "copies": ga * layers * run.exposed_copies_s,
            "optimizer": optimizer,
        }
        by_link = {"nvlink": 0.0, "network": 0.0}
        for part, link in (("tp_comm", tp_link), ("sp_comm", sp_link), ("fsdp_comm", fsdp_link)):
            by_link[link.level] += parts[part]

        memory = self._memory(layout, block, run, head)
        peak = sum(memory.values())
        model_flops = self.model_flops_per_step()
        return Prediction(
            layout=layout, step_s=step, parts_s=parts, exposed_by_link_s=by_link,
            memory_bytes=memory, peak_bytes=peak, usable_bytes=world.usable_memory,
            mfu=model_flops / (step * world.size * world.peak_flops()),
            tokens_per_s_per_gpu=self.global_batch_tokens / (step * world.size),
            overlap=overlap, notes=notes)

    # -- blocks --

    def graph(self, block: BlockFacts, mb: int, s_local: int, codegen: str) -> JointGraph:
        """The block's graph at this size, its node times filled in (the remat solver reads them)."""
        key = (block.tp, mb, s_local, codegen)
        graph = self._graphs.get(key)
        if graph is None:
            traced = block.traces.at(mb, s_local)
            sized = traced.at(mb, s_local)
            times = {name: self._node_seconds(traced, sized, name, mb, s_local, 1)
                     for name in sized.order}
            graph = dataclasses.replace(sized, time_s=times, fuse_pointwise=codegen == "inductor",
                                        hold_backward_inputs=codegen == "eager")
            self._graphs[key] = graph
        return graph

    def block_run(self, block: BlockFacts, mb: int, s_local: int, memory: MemoryPlan,
                  codegen: str, sp: int) -> BlockRun:
        key = (block.tp, mb, s_local, memory, codegen, sp)
        run = self._runs.get(key)
        if run is None:
            run = self._plan_block(block, mb, s_local, memory, codegen, sp)
            self._runs[key] = run
        return run

    def _plan_block(self, block: BlockFacts, mb: int, s_local: int, memory: MemoryPlan,
                    codegen: str, sp: int) -> BlockRun:
        from graphopt.passes.plan_rematerialization import choose_plan, offload_choices

        graph = self.graph(block, mb, s_local, codegen)
        base_saved = remat_solver.min_cut_saved(graph)
        base = remat_solver.evaluate(graph, base_saved)
        refusals: list[str] = []
        if memory == MIN_CUT:  # the min-cut plan is what budget 1.0 alone chooses: nothing frees
            plan = base  # bytes at no cost, so the knapsack's cheapest member is it
        else:
            key = (block.tp, memory, codegen, mb * s_local)
            solved = self._solved.get(key) or self._nearest_solved(key)
            if solved is None:
                offload = {}
                if memory.offload:
                    offload, _ = offload_choices(graph, base, self.world.profile, _OffloadConfig())
                plan, _, _, refusals = choose_plan(graph, base_saved, base, memory.budget, offload)
                self._solved[key] = plan
            else:  # the same choices, simulated at this size
                offloaded = {name: remat_solver.Option("offload", 0, 0.0, alpha)
                             for name, alpha in solved.offloaded.items()}
                plan = remat_solver.evaluate(graph, solved.saved, offloaded)
        times = self._schedule_seconds(block.traces.at(mb, s_local), graph, plan, mb, s_local, sp)
        timeline = plan.timeline
        forward_end = timeline.live_bytes[timeline.boundary - 1] if timeline.boundary else 0
        offloaded = int(sum(alpha * graph.logical_bytes[name] for name, alpha in plan.offloaded.items()))
        return BlockRun(forward_s=times["forward"], backward_s=times["backward"],
                        recompute_s=times["recompute"], forward_end_bytes=forward_end,
                        peak_bytes=timeline.peak, offloaded_bytes=offloaded,
                        # the copies' own bytes through device memory (read for the offload, written
                        # by the reload), taken from the compute kernels they run beside
                        exposed_copies_s=plan.exposed_offload_s + 2 * offloaded / self.rates.hbm,
                        attention_forward_s=times["attention_forward"],
                        attention_backward_s=times["attention_backward"],
                        saved=len(plan.saved), recomputed=len(plan.recomputed),
                        refusals=tuple(f"block memory plan: {r}" for r in refusals))

    def _nearest_solved(self, key: tuple) -> Optional[Plan]:
        """A plan solved for the same tokens per micro-batch split otherwise, or past
        MAX_EXACT_PLANS the one of the nearest token count (same tp, memory plan and codegen);
        None: solve this one."""
        tp, memory, codegen, tokens = key
        same = [(abs(math.log(k[3] / tokens)), k) for k in self._solved if k[:3] == (tp, memory, codegen)]
        if not same or (min(same)[0] > 0 and len(self._solved) < MAX_EXACT_PLANS):
            return None
        return self._solved[min(same)[1]]

    def _schedule_seconds(self, traced: JointGraphAtSize, graph: JointGraph, plan: Plan, mb: int,
                          s_local: int, sp: int) -> dict[str, float]:
        """Forward, backward and recompute seconds of ``plan``'s schedule, kernel by kernel."""
        steps, pinned, boundary = remat_solver.plan_steps(graph, plan.saved, plan.recomputed,
                                                          plan.offloaded)
        if graph.fuse_pointwise:
            steps = liveness.inline_pointwise(steps, pinned, boundary)
        storage_bytes, storage_of = _storage_sizes(steps)
        totals = dict.fromkeys(("forward", "backward", "recompute", "attention_forward",
                                "attention_backward"), 0.0)
        for step in steps:
            prefix, name = step.key[:2], step.key[2:]
            if prefix not in ("f:", "b:") or name not in traced.costs:
                continue
            cost = traced.costs[name]
            if cost.kind == "free":
                continue
            if cost.kind == "memory" and graph.fuse_pointwise:
                if not step.nbytes and not step.outputs and step.kind == "pointwise":
                    continue  # computed inside its readers' kernels
                moved = step.nbytes + sum(step.outputs)
                moved += sum(storage_bytes.get(storage_of.get(i, i), 0) for i in set(step.inputs))
                moved += sum(graph.logical_bytes[i] for i in graph.inputs[name]
                             if graph.role[i] == "primal")
                seconds = max(moved / self.rates.hbm, self.rates.launch_s)
            else:
                seconds = self._node_seconds(traced, graph, name, mb, s_local, sp)
            phase = "forward" if prefix == "f:" else "backward"
            totals[phase] += seconds
            if prefix == "b:" and graph.is_forward(name):
                totals["recompute"] += seconds
            if cost.kind == "attention":
                totals[f"attention_{phase}"] += seconds
        return totals

    def _node_seconds(self, traced: JointGraphAtSize, graph: JointGraph, name: str, mb: int,
                      s_local: int, sp: int) -> float:
        """One op as its own kernel: GEMMs and attention compute-bound, the rest memory-bound."""
        cost = traced.costs.get(name)
        if cost is None or cost.kind == "free":
            return 0.0
        moved = traced.value(cost.bytes, mb, s_local)
        memory_s = moved / self.rates.hbm
        if cost.kind == "memory":
            return max(memory_s, self.rates.launch_s)
        flops = traced.value(cost.flops, mb, s_local)
        if cost.kind == "attention":
            # each rank does 1/sp of the causal work of the whole sequence: sp x its local share
            return max(flops * sp / self.rates.attention, memory_s, self.rates.launch_s)
        rate = self.rates.gemm_fp32 if cost.fp32 else self.rates.gemm
        compute_s = flops / (rate * _wave_efficiency(graph.shapes.get(name, ())))
        return max(compute_s, memory_s, self.rates.launch_s)

    # -- the head --

    def head_run(self, mb: int, s_local: int) -> HeadRun:
        key = (mb, s_local)
        head = self._heads.get(key)
        if head is None:
            traced = self.facts.head(mb, s_local)
            graph = traced.at(mb, s_local)
            plan = remat_solver.evaluate(graph, graph.bw_needed())  # autograd saves, never recomputes
            seconds = sum(self._node_seconds(traced, graph, name, mb, s_local, 1)
                          for name in graph.order if graph.role[name] in ("fw", "bw"))
            held = sum(graph.logical_bytes[name] for name in graph.fw_outputs[1:])
            head = HeadRun(seconds, plan.timeline.peak, held)
            self._heads[key] = head
        return head

    # -- communication --

    def _tensor_parallel(self, block: BlockFacts, tokens: int, tp: int,
                         link) -> tuple[float, dict[str, list[str]]]:
        """Exposed seconds of one block's TP collectives, and the runtime of each forward site."""
        if tp == 1:
            return 0.0, {}
        profile = dataclasses.replace(self.world.profile, allreduce_bus_gbps=link.collective_gbps,
                                      p2p_gbps=link.p2p_gbps)
        exposed, modes = 0.0, []
        for n, k in block.sites.forward:
            choice = overlap_cost.choose_overlap(
                "all_reduce", tokens, n, k, self.compute_bytes, tp, profile, is_cuda=True,
                symmetric_memory=not link.spans_nodes, triton=not link.spans_nodes, replay=True)
            chosen = choice.estimates_s[overlap_cost.plan_key(choice)]
            exposed += max(0.0, chosen - choice.estimates_s["gemm"])
            modes.append(overlap_cost.plan_key(choice))
        for width in block.sites.backward:
            exposed += _collective_s("all_reduce", tokens * width * self.compute_bytes, tp,
                                     link.collective_gbps, self.world.profile)
        return exposed, {"forward_all_reduce": modes,
                         "backward_all_reduce": ["sequential"] * len(block.sites.backward)}

    def _sequence_parallel(self, block: BlockFacts, run: BlockRun, mb: int, s_local: int, sp: int,
                           link) -> float:
        """Exposed seconds of one block's ring exchanges (K/V forward; K/V and their gradients
        backward), step by step against that step's share of attention."""
        if sp == 1:
            return 0.0
        kv_bytes = self._kv_bytes(block, mb, s_local)
        profile = self.world.profile
        latency = profile.collective_latency_s
        steps = sp - 1
        forward_step = kv_bytes / (link.p2p_gbps * 1e9) + latency
        backward_step = 2 * kv_bytes / (link.p2p_gbps * 1e9) + latency
        # every step also waits for its exchange and launches the merge of partial results
        overhead = 2 * steps * (latency + SP_STEP_KERNELS * profile.kernel_launch_s)
        return overhead + steps * (max(0.0, forward_step - run.attention_forward_s / sp)
                                   + max(0.0, backward_step - run.attention_backward_s / sp))

    def _kv_bytes(self, block: BlockFacts, mb: int, s_local: int) -> float:
        """Bytes of one rank's keys and values (GQA: the key/value heads, not their repeats)."""
        traced = block.traces.at(mb, s_local)
        graph = traced.at(mb, s_local)
        for name in graph.order:
            cost = traced.costs.get(name)
            if cost is not None and cost.kind == "attention":
                q = graph.inputs[name][0]
                ratio = 1.0
                family = self.facts.family
                if family.heads and family.kv_heads:
                    ratio = family.kv_heads / family.heads
                return 2 * graph.logical_bytes[q] * ratio
        return 0.0

    def _fsdp(self, layout: Layout, block: BlockFacts, run: BlockRun, link) -> tuple[float, float]:
        """(exposed seconds per micro-batch, exposed seconds once per step) of FSDP2."""
        n = layout.fsdp
        if n == 1:
            return 0.0, 0.0
        profile = self.world.profile

        def collective(kind: str, nbytes: float) -> float:
            return _collective_s(kind, nbytes, n, link.collective_gbps, profile)

        gather = collective("all_gather", block.params * self.compute_bytes)
        reduce = collective("reduce_scatter", block.params * self.training.grad_bytes)
        backward_comm = reduce + (gather if layout.reshard_after_forward else 0.0)
        layers = self.facts.n_blocks
        forward_exposed = gather + (layers - 1) * max(0.0, gather - run.forward_s)
        backward_exposed = (layers - 1) * max(0.0, backward_comm - run.backward_s) \
            + (gather if layout.reshard_after_forward else 0.0)
        head = self.facts.head_params
        head_comm = (collective("all_gather", head * self.compute_bytes)
                     + collective("reduce_scatter", head * self.training.grad_bytes))
        return forward_exposed + backward_exposed + head_comm, reduce

    def _optimizer_s(self, layout: Layout, block: BlockFacts) -> float:
        t = self.training
        params = self._local_params(block) / layout.fsdp
        moved = params * (2 * t.param_bytes + t.grad_bytes + 2 * t.optimizer_bytes)
        return moved / self.rates.hbm

    # -- memory --

    def _local_params(self, block: BlockFacts) -> int:
        return self.facts.n_blocks * block.params + self.facts.head_params

    def _memory(self, layout: Layout, block: BlockFacts, run: BlockRun, head: HeadRun) -> dict[str, int]:
        """What the peak is made of. Gradients are counted where they are alive: all of them from
        the second micro-batch on (accumulated in ``.grad``) and in the optimizer step; in the
        first micro-batch only those already computed (the head's, when a block's backward runs;
        each graph's own are in its peak). The loop zeroes gradients to None before each step."""
        t = self.training
        shard = self._local_params(block) / layout.fsdp
        layers = self.facts.n_blocks
        memory = {"parameters": int(shard * t.param_bytes),
                  "optimizer_state": int(shard * t.optimizer_bytes), "gathered_parameters": 0}
        if layout.fsdp > 1:
            blocks_gathered = 2 if layout.reshard_after_forward else layers
            memory["gathered_parameters"] = int(
                (blocks_gathered * block.params + self.facts.head_params) * self.compute_bytes)
        all_grads = shard * t.grad_bytes
        carried = all_grads if layout.grad_accum > 1 else 0.0
        head_grads = self.facts.head_params * t.grad_bytes / layout.fsdp
        phases = (  # (activations, gradients) while the head runs, while a block's backward runs, at the end
            (layers * run.forward_end_bytes + head.peak_bytes, carried),
            ((layers - 1) * run.forward_end_bytes + run.peak_bytes + head.held_bytes,
             max(carried, head_grads)),
            (0.0, all_grads))
        activations, gradients = max(phases, key=sum)
        memory["gradients"] = int(gradients)
        memory["activations"] = int(activations)
        return memory

    # -- MFU --

    def model_flops_per_step(self) -> float:
        """Model FLOPs of one step over the world, the usual count: 6 per parameter a token
        multiplies with per token, plus 3x the forward's causal attention FLOPs at the full
        sequence (recomputation not counted)."""
        if self._model_flops is None:
            traced = self.facts.block(1).traces.at(1, self.seq_len)
            graph = traced.reference
            attention = sum(traced.value(traced.costs[name].flops, 1, self.seq_len)
                            for name in graph.order
                            if graph.role[name] == "fw" and traced.costs[name].kind == "attention")
            sequences = self.global_batch_tokens / self.seq_len
            self._model_flops = (6 * self.facts.matmul_params * self.global_batch_tokens
                                 + 3 * self.facts.n_blocks * attention * sequences)
        return self._model_flops


class _OffloadConfig:
    """The offload flags the pass reads, at their defaults (the plan sets no others)."""

    offload_link_slack = 0.02
    offload_host_capacity = None


def _wave_efficiency(shape: tuple) -> float:
    """Share of the GEMM's last wave of output tiles that does work (1 when tiles fill every wave)."""
    if len(shape) < 2:
        return 1.0
    tiles = math.prod(shape[:-2]) * math.ceil(shape[-2] / GEMM_TILE) * math.ceil(shape[-1] / GEMM_TILE)
    if tiles <= 0:
        return 1.0
    return tiles / (math.ceil(tiles / NUM_SMS) * NUM_SMS)


def _storage_sizes(steps: list) -> tuple[dict[str, int], dict[str, str]]:
    """Bytes of each allocation of a schedule and the allocation each key lives in."""
    storage_of: dict[str, str] = {}
    size: dict[str, int] = {}
    for step in steps:
        for index, nbytes in enumerate(step.outputs):
            size[f"{step.key}#{index}"] = nbytes
            storage_of[f"{step.key}#{index}"] = f"{step.key}#{index}"
        storage_of[step.key] = storage_of.get(step.storage, step.storage)
        if step.storage == step.key:
            size[step.key] = step.nbytes
    return size, storage_of


def _collective_s(kind: str, nbytes: float, world: int, bus_gbps: float, profile: DeviceProfile) -> float:
    """NCCL ring time of one collective over ``world`` ranks (bus bandwidth convention)."""
    share = 2 * (world - 1) / world if kind == "all_reduce" else (world - 1) / world
    bus = bus_gbps * (1.0 if kind == "all_reduce" else overlap_cost.RS_AG_BUS_FRACTION)
    return nbytes * share / (bus * 1e9) + profile.collective_latency_s


def itemsize(dtype) -> int:
    import torch
    return torch.empty((), dtype=dtype).element_size()
