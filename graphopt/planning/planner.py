"""``plan``: enumerate the layouts, predict each, keep those that fit, pick the fastest, explain.

Deterministic: the same model, world and batch give the same report on every rank (layouts are
enumerated in a fixed order, ties broken by the layout's key, and nothing is measured), which
``PlanReport.fingerprint`` lets ranks check before they apply it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Optional, Union

import torch.nn as nn

from graphopt.planning import explain
from graphopt.planning.layouts import MIN_CUT, Layout, Refused, SearchSpace, enumerate_layouts
from graphopt.planning.model_facts import LossFn, ModelFacts, trace_model
from graphopt.planning.predict import Prediction, Predictor, Training, itemsize
from graphopt.planning.world import GIB, World

log = logging.getLogger("graphopt.planning")


class NoLayoutFitsError(ValueError):
    """No layout of the search space fits the GPUs' memory."""

    def __init__(self, report: "PlanReport"):
        closest = min(report.unfit, key=lambda p: p.peak_bytes, default=None)
        detail = (f"; the lowest predicted peak is {closest.peak_bytes / GIB:.1f} GiB "
                  f"({closest.layout.describe()}) of {closest.usable_bytes / GIB:.1f} GiB usable"
                  if closest else "")
        super().__init__(
            f"no layout of {report.model['model']} fits {report.world['usable_memory_gib']} GiB per "
            f"GPU at sequence {report.seq_len} x {report.global_batch_tokens} tokens per step"
            f"{detail}. Use more GPUs, a shorter sequence, or allow lower remat budgets / offload "
            "(SearchSpace.memory_plans)")
        self.report = report


@dataclasses.dataclass
class PlanReport:
    chosen: Optional[Prediction]
    ranked: list[Prediction]          # layouts that fit, fastest first
    unfit: list[Prediction]           # layouts that do not fit, fastest first
    refused: list[Refused]            # degrees the rules excluded, with the reason
    model: dict[str, Any]
    world: dict[str, Any]
    seq_len: int
    global_batch_tokens: int
    training: Training
    facts: Optional[ModelFacts] = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def layout(self) -> Layout:
        if self.chosen is None:
            raise NoLayoutFitsError(self)
        return self.chosen.layout

    def flags(self, layout: Optional[Layout] = None) -> dict[str, Any]:
        """graphopt flags for the blocks' compile (``parallelize`` adds the sequence-parallel group)."""
        return layout_flags(layout or self.layout)

    def fingerprint(self) -> str:
        """What every rank must agree on before it applies the plan: the chosen layout and the
        inputs it was planned for."""
        payload = {"layout": self.layout.to_json(), "model": self.model, "world": self.world,
                   "seq_len": self.seq_len, "global_batch_tokens": self.global_batch_tokens}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def explain(self, top_k: int = 5) -> str:
        return explain.report_markdown(self, top_k)

    def to_json(self, top_k: int = 20) -> dict[str, Any]:
        return {"chosen": self.chosen.to_json() if self.chosen else None,
                "flags": self.flags() if self.chosen else None,
                "top": [p.to_json() for p in self.ranked[:top_k]],
                "why_not": explain.reasons(self),
                "unfit_fastest": [p.to_json() for p in self.unfit[:top_k]],
                "refused": [dataclasses.asdict(r) for r in self.refused],
                "model": self.model, "world": self.world, "seq_len": self.seq_len,
                "global_batch_tokens": self.global_batch_tokens,
                "training": dataclasses.asdict(self.training),
                "layouts_predicted": len(self.ranked) + len(self.unfit)}

    def write(self, folder: str, top_k: int = 20) -> str:
        """``layout_plan.json`` and ``layout_plan.md`` in ``folder``; returns the Markdown path."""
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "layout_plan.json"), "w") as handle:
            json.dump(self.to_json(top_k), handle, indent=1, default=str)
        path = os.path.join(folder, "layout_plan.md")
        with open(path, "w") as handle:
            handle.write(explain.report_markdown(self, top_k))
        return path


def _predict_all(predictor: Predictor, layouts: list[Layout]) -> list[Prediction]:
    """Predictions of ``layouts``, skipping the dominated ones: a memory plan other than the
    min-cut plan only adds recomputation or copies, so it is predicted only where the min-cut plan
    of the same layout does not fit -- and, for the explanation, for the fastest layout that fits."""
    def base_of(layout: Layout) -> Layout:
        return dataclasses.replace(layout, memory=MIN_CUT)

    enumerated = set(layouts)
    predictions: dict[Layout, Prediction] = {}
    for layout in layouts:
        base = base_of(layout)
        if base in enumerated and base not in predictions:
            predictions[base] = predictor.predict(base)
        if base in predictions and predictions[base].fits and layout != base:
            continue
        if layout not in predictions:
            predictions[layout] = predictor.predict(layout)
    fitting = sorted((p for p in predictions.values() if p.fits), key=lambda p: (p.step_s, p.layout.key()))
    if fitting:
        best = base_of(fitting[0].layout)
        for layout in layouts:
            if base_of(layout) == best and layout not in predictions:
                predictions[layout] = predictor.predict(layout)
    # A lower budget no plan reaches runs the same lowest-peak plan as a higher one: keep the first.
    seen: set[tuple] = set()
    kept = []
    for layout in layouts:
        prediction = predictions.get(layout)
        if prediction is None:
            continue
        outcome = (base_of(layout), layout.memory.offload, round(prediction.step_s, 9),
                   prediction.peak_bytes)
        if outcome not in seen:
            seen.add(outcome)
            kept.append(prediction)
    return kept


def layout_flags(layout: Layout) -> dict[str, Any]:
    flags: dict[str, Any] = {"codegen": layout.codegen, **layout.memory.flags()}
    if layout.sp > 1:
        flags["sequence_parallel_attention"] = True
    if layout.tp > 1:
        flags["overlap_matmul_allreduce"] = True
    return flags


def plan(model: Union[nn.Module, ModelFacts], world: Optional[World] = None, *, seq_len: int,
         global_batch_tokens: int, optimizer_bytes: Optional[float] = None,
         param_bytes: Optional[int] = None, grad_bytes: Optional[int] = None,
         loss_fn: Optional[LossFn] = None, space: SearchSpace = SearchSpace(),
         dump_dir: Optional[str] = None, require_fit: bool = True) -> PlanReport:
    """The fastest layout of ``model`` on ``world`` that fits, with every alternative predicted.

    ``model``: an nn.Module (best built on the meta device) or the ``ModelFacts`` of one.
    ``optimizer_bytes``: optimizer state per parameter (default: Adam in the parameters' dtype,
    2 x its size); ``param_bytes`` / ``grad_bytes``: stored parameter and gradient bytes (default:
    the parameters' dtype). The report goes to ``dump_dir`` (default: graphopt.config.dump_dir)
    as layout_plan.json / .md. Raises :class:`NoLayoutFitsError` when none fits (``require_fit``)."""
    if dump_dir is None:
        from graphopt import config
        dump_dir = config.dump_dir
    facts = model if isinstance(model, ModelFacts) else trace_model(model, loss_fn)
    world = world or World(gpus_per_node=1)
    size = itemsize(facts.param_dtype)
    training = Training(param_bytes or size, grad_bytes or size,
                        2 * size if optimizer_bytes is None else optimizer_bytes)
    layouts, refused = enumerate_layouts(facts, world, seq_len, global_batch_tokens, space)
    predictor = Predictor(facts, world, seq_len, global_batch_tokens, training)
    predictions = _predict_all(predictor, layouts)
    order = sorted(predictions, key=lambda p: (p.step_s, p.layout.key()))
    ranked = [p for p in order if p.fits]
    report = PlanReport(ranked[0] if ranked else None, ranked, [p for p in order if not p.fits],
                        refused, facts.describe(), world.describe(), seq_len, global_batch_tokens,
                        training, facts)
    if dump_dir:
        log.info("layout plan written to %s", report.write(dump_dir))
    if report.chosen is None and require_fit:
        raise NoLayoutFitsError(report)
    return report

