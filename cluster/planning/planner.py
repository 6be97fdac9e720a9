"""Choose a layout: fit the weights, hold the batch's KV, reach the context,
then the fastest decode step; place the drafts; predict the speedup."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from specray.actors.engine.gamma import speedup
from specray.cluster.planning.hardware import GpuSpec
from specray.cluster.planning.layouts import (
    ClusterShape,
    Layout,
    Memory,
    MemoryBudget,
    Precision,
    candidate_layouts,
    layout_memory,
)
from specray.cluster.planning.model_specs import ModelSpec
from specray.cluster.planning.step_time import StepTime, step_time


@dataclass(frozen=True)
class SpecSettings:
    """Speculative decoding's inputs: α per-token acceptance, γ drafts per
    round, c = one draft token's cost / one target step."""

    alpha: float = 0.7
    gamma: int = 3
    draft_cost: float = 0.0  # n-gram drafts on CPUs cost the target nothing

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"--alpha must be in [0, 1], got {self.alpha}")
        if self.gamma < 1:
            raise ValueError(f"--gamma must be >= 1, got {self.gamma}")
        if self.draft_cost < 0:
            raise ValueError(f"--draft-cost must be >= 0, got {self.draft_cost}")


def spec_speedup(spec: SpecSettings, verify_cost: float) -> float:
    """The analytic speedup (:func:`specray.actors.engine.gamma.speedup`) of
    ``spec``; ``verify_cost`` is cost(γ+1)/cost(1)."""
    return speedup(spec.alpha, spec.gamma, spec.draft_cost, verify_cost)


@dataclass(frozen=True)
class PlanSettings:
    """Everything a plan assumes beyond the model, the GPU and the cluster's shape."""

    precision: Precision
    budget: MemoryBudget = field(default_factory=MemoryBudget)
    spec: SpecSettings = field(default_factory=SpecSettings)
    requests: int = 32  # requests the whole cluster decodes at once, split over replicas
    context: int = 32768  # tokens each of them attends to, on average
    min_request_context: int | None = None  # one request's reach; default the model's max
    hbm_efficiency: float = 0.8  # share of peak HBM bandwidth decode kernels reach
    draft: str = "ngram"  # "ngram" or a draft model's name
    draft_slots: int = 16  # requests one draft replica serves
    draft_cpus: float = 2.0

    def __post_init__(self) -> None:
        for name in ("requests", "context", "draft_slots"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        if self.min_request_context is not None and self.min_request_context < 1:
            raise ValueError(f"--min-request-context must be >= 1, got {self.min_request_context}")
        if not 0 < self.hbm_efficiency <= 1:
            raise ValueError(f"--hbm-efficiency must be in (0, 1], got {self.hbm_efficiency}")


@dataclass(frozen=True)
class Candidate:
    """One layout as the planner judged it."""

    layout: Layout
    replicas: int
    memory: Memory
    decode: StepTime
    verify: StepTime  # γ + 1 tokens per request
    speedup: float  # at the configured γ
    best_gamma: int  # the γ ≤ configured γ with the highest speedup; 0: none beats plain decoding
    best_speedup: float
    batch: int  # requests per replica (``decode`` times one micro-batch of batch/pp)
    rejected: str | None  # why it is not eligible; None if it is

    @property
    def verify_cost(self) -> float:
        return self.verify.total_s / self.decode.total_s

    @property
    def tokens_per_s(self) -> float:
        """Whole cluster, plain decoding: replicas × batch / step (one trip)."""
        return self.replicas * self.batch / self.decode.total_s


@dataclass(frozen=True)
class DraftPlacement:
    """Where the draft replicas go and how many."""

    kind: str  # "ngram" | "model"
    model: str | None
    replicas: int
    cpus_each: float
    slots_each: int
    where: str


@dataclass(frozen=True)
class Plan:
    """Every candidate layout, the chosen one and the reasons."""

    model: ModelSpec
    gpu: GpuSpec
    shape: ClusterShape
    settings: PlanSettings
    candidates: tuple[Candidate, ...]  # eligible first, fastest first
    best: Candidate | None
    why: tuple[str, ...]
    drafts: DraftPlacement | None
    min_gpus: int  # GPUs the weights alone need


def make_plan(model: ModelSpec, gpu: GpuSpec, shape: ClusterShape, settings: PlanSettings) -> Plan:
    required = settings.min_request_context or model.max_context
    candidates = []
    for layout in candidate_layouts(model, shape):
        replicas = shape.gpus // layout.gpus
        # The same load on every layout, so a faster step is also more tokens/s.
        batch = math.ceil(settings.requests / replicas)
        memory = layout_memory(layout, model, gpu, settings.precision, settings.budget)
        # PP keeps pp micro-batches in flight, one per stage: a request gets a
        # token per trip of its micro-batch through every stage.
        micro = math.ceil(batch / layout.pp)
        decode = _step(layout, model, gpu, shape, settings, micro, 1)
        verify = _step(layout, model, gpu, shape, settings, micro, settings.spec.gamma + 1)
        speedup = spec_speedup(settings.spec, verify.total_s / decode.total_s)
        best_gamma, best_speedup = _best_gamma(layout, model, gpu, shape, settings, micro, decode)
        candidates.append(
            Candidate(
                layout=layout,
                replicas=replicas,
                memory=memory,
                decode=decode,
                verify=verify,
                speedup=speedup,
                best_gamma=best_gamma,
                best_speedup=best_speedup,
                batch=batch,
                rejected=_rejection(memory, batch, settings.context, required),
            )
        )
    candidates.sort(key=_rank)
    eligible = [c for c in candidates if c.rejected is None]
    # Without a layout reaching the context, the next best holds the batch.
    short = [c for c in candidates if c.rejected and c.rejected.startswith("context")]
    best = eligible[0] if eligible else (short[0] if short else None)
    usable = settings.budget.usable_bytes(gpu)
    weights = model.total_params * settings.precision.weight_bytes
    min_gpus = math.ceil(weights / usable) if usable > 0 else 0
    plan_drafts = _drafts(best, settings) if best else None
    why = _explain(best, candidates, model, gpu, shape, settings, required, min_gpus)
    return Plan(model, gpu, shape, settings, tuple(candidates), best, why, plan_drafts, min_gpus)


def _step(
    layout: Layout,
    model: ModelSpec,
    gpu: GpuSpec,
    shape: ClusterShape,
    settings: PlanSettings,
    batch: int,
    tokens_per_request: int,
) -> StepTime:
    return step_time(
        layout,
        model,
        gpu,
        shape,
        settings.precision,
        batch,
        settings.context,
        tokens_per_request,
        settings.hbm_efficiency,
    )


def _best_gamma(
    layout: Layout,
    model: ModelSpec,
    gpu: GpuSpec,
    shape: ClusterShape,
    settings: PlanSettings,
    micro: int,
    decode: StepTime,
) -> tuple[int, float]:
    """What adaptive γ would settle on: the most profitable γ up to the configured one."""
    best_gamma, best = 0, 1.0
    for gamma in range(1, settings.spec.gamma + 1):
        verify = _step(layout, model, gpu, shape, settings, micro, gamma + 1)
        gain = spec_speedup(replace(settings.spec, gamma=gamma), verify.total_s / decode.total_s)
        if gain > best:
            best_gamma, best = gamma, gain
    return best_gamma, best


def _rejection(memory: Memory, batch: int, context: int, required: int) -> str | None:
    if not memory.fits:
        return (
            f"weights {memory.weight_bytes_per_gpu / 1e9:.1f} GB/GPU exceed the usable "
            f"{memory.usable_bytes_per_gpu / 1e9:.1f} GB"
        )
    if memory.kv_tokens_per_replica < batch * context:
        return f"KV holds {memory.kv_tokens_per_replica} tokens < batch {batch} x context {context}"
    if memory.max_request_context < required:
        return f"context: one request reaches {memory.max_request_context} tokens < {required}"
    return None


def _rank(candidate: Candidate) -> tuple[int, float, int, int]:
    """Eligible first; then the fastest step (under the same cluster load, also
    the most tokens/s); then more replicas; then fewer stages."""
    order = (
        0 if candidate.rejected is None else 1 if candidate.rejected.startswith("context") else 2
    )
    return (order, round(candidate.decode.total_s, 9), -candidate.replicas, candidate.layout.pp)


def _drafts(best: Candidate, settings: PlanSettings) -> DraftPlacement:
    requests = best.replicas * best.batch
    kind = "ngram" if settings.draft == "ngram" else "model"
    return DraftPlacement(
        kind=kind,
        model=None if kind == "ngram" else settings.draft,
        replicas=math.ceil(requests / settings.draft_slots),
        cpus_each=settings.draft_cpus,
        slots_each=settings.draft_slots,
        where=(
            "CPU worker group, off the GPU nodes: decode is HBM-bound and the GPU "
            "nodes' CPUs feed the shards; specray's draft replicas are CPU actors"
        ),
    )


def _explain(
    best: Candidate | None,
    candidates: list[Candidate],
    model: ModelSpec,
    gpu: GpuSpec,
    shape: ClusterShape,
    settings: PlanSettings,
    required: int,
    min_gpus: int,
) -> tuple[str, ...]:
    weights_gb = model.total_params * settings.precision.weight_bytes / 1e9
    if best is None:
        return (
            f"nothing fits: {weights_gb:.0f} GB of {settings.precision.weights} weights need at "
            f"least {min_gpus} {gpu.name} GPUs at {settings.budget.usable_bytes(gpu) / 1e9:.1f} "
            f"usable GB each; this cluster has {shape.gpus}",
        )
    why = [
        f"{best.layout.label}: {best.memory.weight_bytes_per_gpu / 1e9:.1f} GB of weights per GPU "
        f"leaves {best.memory.free_bytes_per_gpu / 1e9:.1f} GB for KV "
        f"({best.memory.kv_tokens_per_replica} tokens per replica)",
        f"decode step {best.decode.total_s * 1e3:.2f} ms with {_count(best.batch, 'request')} "
        f"per replica ({settings.requests} in the cluster): HBM "
        f"{best.decode.hbm_s * 1e3:.2f} ms + collectives {best.decode.comm_s * 1e3:.2f} ms "
        f"({best.decode.collectives} per step)",
    ]
    if best.rejected:
        why.append(f"no layout reaches {required} tokens for one request; closest: {best.rejected}")
    # Layouts whose weights do not fit are no alternative worth naming.
    faster = [
        c
        for c in candidates
        if c.decode.total_s < best.decode.total_s and c.rejected and c.memory.fits
    ]
    if faster:
        top = faster[0]
        why.append(f"faster but rejected: {top.layout.label} ({top.rejected})")
    rivals = [c for c in candidates if c.rejected is None and c is not best]
    if rivals:
        nxt = rivals[0]
        why.append(
            f"runner-up {nxt.layout.label}: {nxt.decode.total_s * 1e3:.2f} ms "
            f"(HBM {nxt.decode.hbm_s * 1e3:.2f} + comm {nxt.decode.comm_s * 1e3:.2f})"
        )
    if best.layout.spans_nodes(shape):
        why.append("a stage spans nodes: its collectives run over the inter-node link")
    if best.layout.pp > 1:
        micro = math.ceil(best.batch / best.layout.pp)
        flying = math.ceil(best.batch / micro)
        why.append(
            f"PP{best.layout.pp} splits the layers (and so each request's KV) over "
            f"{best.layout.pp} stages; {_count(flying, 'micro-batch')} of "
            f"{_count(micro, 'request')} in flight, one per stage"
        )
    if best.best_gamma == 0:
        why.append(
            f"speculation does not pay at this load: verifying γ+1 tokens per request "
            f"touches more experts (v = {best.verify_cost:.2f} at γ={settings.spec.gamma}); "
            "adaptive γ would decode plainly; fewer requests per replica or a higher α help"
        )
    elif best.best_gamma != settings.spec.gamma:
        why.append(
            f"adaptive γ would settle on γ={best.best_gamma} "
            f"(speedup {best.best_speedup:.2f}x vs {best.speedup:.2f}x at γ={settings.spec.gamma})"
        )
    return tuple(why)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "es" if noun.endswith("ch") else "s")
