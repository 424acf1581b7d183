"""The layout planner: which data / tensor / sequence-parallel degrees, micro-batch, gradient
accumulation and memory plan train a model fastest on a given world, and why.

It sits above the per-graph planners (``passes/plan_rematerialization``'s graph builder and
``analysis/remat_solver``, ``analysis/overlap_cost``, ``analysis/offload_model``), whose models it
runs for every layout, and below ``planning/parallelize``, which applies its choice. It is pure
modelling: nothing here allocates on a device, communicates or compiles a model.

    facts = trace_model(model)                       # once: the model on the meta device
    report = plan(facts, world, seq_len=8192, global_batch_tokens=2**20)
    print(report.explain())                          # top layouts, why the others lost
    model = graphopt.parallelize(model, report)      # mesh, TP, FSDP2, sequence sharding, flags
"""

from graphopt.planning.layouts import Layout, MemoryPlan
from graphopt.planning.model_facts import ModelFacts, trace_model
from graphopt.planning.planner import PlanReport, plan
from graphopt.planning.world import World

__all__ = ["Layout", "MemoryPlan", "ModelFacts", "PlanReport", "World", "plan", "trace_model"]
