"""``graphopt.parallelize(model, plan)``: apply a layout plan to a model.

    report = graphopt.planning.plan(model_on_meta, world, seq_len=8192, global_batch_tokens=2**20)
    par = graphopt.parallelize(model, report)          # every rank, after init_process_group
    for inputs, labels in loader:                      # the global batch, [sequences, seq_len]
        for mb in par.micro_batches(inputs, labels):   # this rank's share, micro-batch by micro-batch
            loss = loss_fn(par.model, mb.tokens, mb.labels, mb.position_ids) / par.layout.grad_accum
            loss.backward()
        optimizer.step(); optimizer.zero_grad()

What it builds, in torchtitan's order (tensor parallelism, compile, FSDP2):

  mesh       ranks in ``[dp, sp, tp]`` row-major order, as the planner placed them
             (``graphopt.planning.world``): a ``("fsdp", "tp")`` mesh for FSDP2 and DTensor TP, and
             the sequence-parallel groups of a ``("dp", "sp", "tp")`` mesh.
  TP         DTensor column / row-parallel linears of every block, from the family's plan as data
             (graphopt's reference Llama, Hugging Face models with a plain ``base_model_tp_plan``);
             the embedding, final norm and output projection stay replicated.
  compile    every block's forward compiled with ``graphopt.backend(**flags)``: the plan's memory
             plan and codegen, sequence-parallel attention over the SP group, the GEMM + all-reduce
             overlap for TP. The rest of the model runs eagerly.
  FSDP2      ``fully_shard`` on every block and the root over the dp x sp ranks (gradients are
             averaged over them: each sequence-parallel rank's loss is the mean over its own
             tokens, which averages to the whole sequence's mean when every position has a label),
             bf16 compute with fp32 reduction when the parameters are fp32.
  data       ``micro_batches`` gives this rank its sequences (dp), its slice of each (sp, with
             global position ids) and gradient accumulation's micro-batches.

Every rank checks that all ranks apply the same plan (a fingerprint gathered over the world) and
fails within seconds naming the ranks that differ.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any, Iterator, Optional, Union

import torch
import torch.distributed as dist
import torch.nn as nn

from graphopt.planning.layouts import Layout
from graphopt.planning.model_facts import ModelFamily, blocks_of, detect_family, with_own_code

if TYPE_CHECKING:
    from graphopt.planning.planner import PlanReport

log = logging.getLogger("graphopt.planning.parallelize")


class PlanMismatchError(RuntimeError):
    """The ranks were given different plans, or a plan that does not match the world."""


@dataclasses.dataclass
class MicroBatch:
    tokens: torch.Tensor          # [micro_batch, seq_len / sp] this rank's tokens
    labels: Optional[torch.Tensor]
    position_ids: torch.Tensor    # their global positions (sequence parallelism shifts them)


@dataclasses.dataclass
class ParallelModel:
    """The parallelized model and what the training loop needs to feed it."""

    model: nn.Module
    layout: Layout
    flags: dict[str, Any]
    dp_rank: int = 0
    sp_rank: int = 0
    sp_group: Any = None
    mesh: Any = None

    def micro_batches(self, tokens: torch.Tensor,
                      labels: Optional[torch.Tensor] = None) -> Iterator[MicroBatch]:
        """This rank's micro-batches of a global batch ``tokens`` [sequences, seq_len] (and its
        ``labels``, each position's target, split the same way)."""
        layout = self.layout
        if tokens.dim() != 2:
            raise ValueError(f"tokens {tuple(tokens.shape)} must be [sequences, seq_len]")
        sequences = tokens.shape[0]
        per_rank = layout.micro_batch * layout.grad_accum
        if sequences != per_rank * layout.dp:
            raise ValueError(
                f"the plan takes {per_rank * layout.dp} sequences per step ({layout.dp} data-parallel "
                f"ranks x micro-batch {layout.micro_batch} x {layout.grad_accum} accumulation steps); "
                f"got {sequences}. Feed the global batch the plan was made for")
        if labels is not None and labels.shape != tokens.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must match tokens {tuple(tokens.shape)}")
        start = self.dp_rank * per_rank
        for step in range(layout.grad_accum):
            rows = slice(start + step * layout.micro_batch, start + (step + 1) * layout.micro_batch)
            yield self._shard(tokens[rows], None if labels is None else labels[rows])

    def _shard(self, tokens: torch.Tensor, labels: Optional[torch.Tensor]) -> MicroBatch:
        """This rank's slice of the sequence (sp > 1) with global positions; contiguous, as models
        that ``view`` their inputs (Hugging Face's loss does) need."""
        if self.layout.sp == 1:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        else:
            from graphopt.distributed.sharding import shard_sequence
            if labels is not None:
                labels = shard_sequence(labels, group=self.sp_group)[0]
            tokens, positions = shard_sequence(tokens, group=self.sp_group)
        return MicroBatch(tokens.contiguous(), None if labels is None else labels.contiguous(),
                          positions.contiguous())


def parallelize(model: nn.Module, plan: Union["PlanReport", Layout], *,
                device: Optional[torch.device] = None, **flag_overrides: Any) -> ParallelModel:
    """Apply ``plan`` (a ``PlanReport`` or a ``Layout``) to ``model`` in place; see the module doc.

    ``flag_overrides`` are graphopt flags for the blocks' compile on top of the plan's
    (``codegen="eager"``, ``dump_dir=...``)."""
    from graphopt.planning.planner import PlanReport, layout_flags

    layout = plan.layout if isinstance(plan, PlanReport) else plan
    fingerprint = plan.fingerprint() if isinstance(plan, PlanReport) else repr(layout.to_json())
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if layout.world_size != world:
        raise PlanMismatchError(
            f"the plan {layout.describe()} is for {layout.world_size} ranks; this process group has "
            f"{world}" + ("" if world > 1 else " (call torch.distributed.init_process_group first)"))
    if world > 1:
        _check_agreement(fingerprint, layout)
    family = detect_family(model)
    device = device or next(model.parameters()).device
    par = ParallelModel(model, layout, {})
    rank = dist.get_rank() if world > 1 else 0
    par.dp_rank = rank // (layout.sp * layout.tp)
    par.sp_rank = (rank // layout.tp) % layout.sp
    fsdp_mesh = tp_mesh = None
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        par.mesh = init_device_mesh(device.type, (layout.fsdp, layout.tp), mesh_dim_names=("fsdp", "tp"))
        fsdp_mesh, tp_mesh = par.mesh["fsdp"], par.mesh["tp"]
        if layout.sp > 1:
            grid = init_device_mesh(device.type, (layout.dp, layout.sp, layout.tp),
                                    mesh_dim_names=("dp", "sp", "tp"))
            par.sp_group = grid["sp"].get_group()
    blocks = blocks_of(model, family)
    if layout.tp > 1:
        apply_tensor_parallel(blocks, family, tp_mesh)
    flags = {**layout_flags(layout), **flag_overrides}
    if layout.sp > 1:
        flags["sp_group"] = par.sp_group
    par.flags = flags
    compile_blocks(blocks, flags)
    if layout.fsdp > 1:
        compute = getattr(torch, str(plan.model["compute_dtype"]).replace("torch.", "")) \
            if isinstance(plan, PlanReport) else None
        apply_fsdp(model, blocks, fsdp_mesh, layout, compute)
    log.info("parallelized %s as %s with flags %s", type(model).__name__, layout.describe(),
             {k: v for k, v in flags.items() if k != "sp_group"})
    return par


def _check_agreement(fingerprint: str, layout: Layout) -> None:
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, fingerprint)
    differing = [rank for rank, other in enumerate(gathered) if other != gathered[0]]
    if differing:
        raise PlanMismatchError(
            f"ranks {differing} were given a different plan than rank 0 (this rank: "
            f"{layout.describe()}); plan once with the same model, world and batch on every rank "
            "(the planner is deterministic), or plan on rank 0 and broadcast the report")


def apply_tensor_parallel(blocks: nn.ModuleList, family: ModelFamily, tp_mesh) -> None:
    """Column / row-parallel linears of every block (Megatron's split, all-reduce after each
    row-parallel linear); inputs and outputs of the blocks stay replicated local tensors."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    if family.tp_plan is None:
        raise PlanMismatchError(f"tensor parallelism needs a known plan: {family.tp_refusal}")
    plan = {name: ColwiseParallel() for name in family.tp_plan.colwise}
    plan.update({name: RowwiseParallel() for name in family.tp_plan.rowwise})
    for block in blocks:
        parallelize_module(block, tp_mesh, plan)


def compile_blocks(blocks: nn.ModuleList, flags: dict[str, Any]) -> None:
    """Compile every block's forward with graphopt; hooks on the block (FSDP2's) stay outside the
    graph. Dynamo compiles the first block and reuses its code for every identical block -- except
    with activation offload, whose static host pool holds one forward of each compiled graph until
    its backward: there every block gets a graph (and a pool) of its own, at the price of one
    compile per block."""
    from graphopt.backends import backend as graphopt_backend

    backend = graphopt_backend(**flags)
    for index, block in enumerate(blocks):
        forward = block.forward
        if flags.get("offload_activations"):
            forward = with_own_code(forward, f"graphopt_block_{index}_forward")
        block.forward = torch.compile(forward, backend=backend)


def apply_fsdp(model: nn.Module, blocks: nn.ModuleList, mesh, layout: Layout,
               compute_dtype: Optional[torch.dtype] = None) -> None:
    """FSDP2 on every block and the root; parameters stored in their dtype and gathered in
    ``compute_dtype`` when that differs (gradients reduced in the stored dtype)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtype = next(model.parameters()).dtype
    policy = (MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=dtype)
              if compute_dtype is not None and compute_dtype != dtype else MixedPrecisionPolicy())
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=layout.reshard_after_forward,
                    mp_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=layout.reshard_after_forward, mp_policy=policy)
