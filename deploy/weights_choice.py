"""Turn ``weights: auto`` and an unset ``tp`` into a concrete plan at start-up.

The probe (about a second) runs here, in the process that starts the
server, on every core of this machine: the target shards run on the same
machine unless a Ray cluster is joined, and then the probe speaks for this
machine only (the log line says where it measured). See
:mod:`specray.actors.model.weight_plan` for the decision itself.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from specray.actors.drafting.spec import MODEL_KINDS
from specray.actors.model.gguf_source import int4_share
from specray.actors.model.hardware import Choice, probe
from specray.actors.model.weight_plan import WeightPlan, needs_probe, plan_weights
from specray.actors.store.registry import REGISTRY
from specray.actors.store.weights_dir import kept_gguf
from specray.deploy.config import DrafterConfig, RouterSettings, ServeConfig

log = logging.getLogger(__name__)


def choose_plan(
    target: str,
    weights: str,
    tp: int | None,
    verify_rows: int | None,  # k + 1 with a drafter; None: target-only
    home: Path | None = None,
    dtype: str | None = None,  # a configured model dtype, kept
    draft_models: Sequence[str] = (),  # draft models left at weights: auto
) -> WeightPlan:
    """The plan for ``target``, probing this machine when ``weights`` is
    ``auto`` or a draft model's weights are; logged in one line."""
    recommendation = None
    if needs_probe(weights) or draft_models:
        # A configured target still leaves a draft model's format to measure:
        # the probe then speaks for the draft's file.
        source = target if needs_probe(weights) else draft_models[0]
        gguf = kept_gguf(source, home)
        share = int4_share(gguf) if gguf is not None else None
        threads = len(os.sched_getaffinity(0))
        recommendation = probe(share, verify_rows=verify_rows or 1, threads=threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plan = plan_weights(weights, tp, recommendation, device, verify_rows is not None, dtype)
    log.info("%s", plan.log_line())
    return plan


def planned_router(settings: RouterSettings, home: Path | None = None) -> RouterSettings:
    """``settings`` with weights, tp and draft models' weights concrete
    (probing when needed; what was planned before is kept)."""
    draft_models = auto_draft_models(settings, home)
    if settings.planned and not draft_models:
        return planned_drafts(settings, None, home)
    plan = choose_plan(
        settings.target,
        settings.weights,
        settings.tp,
        settings.verify_rows,
        home,
        settings.dtype,
        draft_models,
    )
    return planned_drafts(settings.with_plan(plan), plan.draft, home)


def auto_draft_models(settings: RouterSettings, home: Path | None = None) -> list[str]:
    """The draft models left at ``weights: auto`` that have a GGUF file to
    choose (every registered model is one; a directory must hold its own)."""
    return [
        drafter.model
        for drafter in settings.drafts
        if drafter.weights == "auto" and drafter.model is not None and _has_gguf(drafter, home)
    ]


def _has_gguf(drafter: DrafterConfig, home: Path | None) -> bool:
    return (
        drafter.kind in MODEL_KINDS
        and drafter.model is not None
        and (drafter.model in REGISTRY or kept_gguf(drafter.model, home) is not None)
    )


def planned_drafts(
    settings: RouterSettings, choice: Choice | None, home: Path | None = None
) -> RouterSettings:
    """Draft models left at ``weights: auto`` on their GGUF blocks where the
    probe measured those fastest for one row (a draft step's work) and the
    draft has a GGUF file (every registered model is one; a directory must
    hold its own); dense, in the router's dtype, else.
    On an AVX2-only machine a bf16 0.5B draft model fed 24 prompt tokens a
    second where its GGUF blocks fed 148 (docs/benchmarks.md)."""

    def planned(drafter: DrafterConfig) -> DrafterConfig:
        if drafter.weights != "auto":
            return drafter
        blocks = choice is not None and choice.weights == "gguf" and _has_gguf(drafter, home)
        return drafter.model_copy(update={"weights": "gguf" if blocks else "dense"})

    return settings.model_copy(update={"drafts": [planned(d) for d in settings.drafts]})


def planned_config(config: ServeConfig) -> ServeConfig:
    """The active backend's weights (and the router's tp) planned, and the
    plan logged, once at start-up."""
    if config.backend == "router":
        return config.model_copy(update={"router": planned_router(config.router, config.home)})
    return planned_engine(config)


def planned_engine(config: ServeConfig) -> ServeConfig:
    """The in-process engine's weights (its top-level keys) planned."""
    plan = choose_plan(
        config.target, config.weights, 1, config.verify_rows, config.home, config.dtype
    )
    return config.with_plan(plan)
