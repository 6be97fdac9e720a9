"""Train a draft head on cached target generations: pure torch, CPU-sized.

Deterministic for a seed: parameters start from ``torch.manual_seed(seed)``
and the target's weights, the sample order of every epoch comes from a
generator seeded with ``seed`` and the epoch, and a fixed share of samples
(chosen by the same generator) is held out for validation.
Matmuls run under bf16 autocast (CPUs with AVX-512 BF16 do them about
2.5 times faster than fp32); the weights and the optimiser stay fp32.

The same loop trains a DSpark drafter (:class:`DSparkModel`) on the same
data: each step draws ``anchors`` blocks per answer and scores them with
DSpark's loss (see :mod:`specray.actors.drafting.dspark.train`); batches
go to the device of the model's weights.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from specray.actors.drafting.dspark.fresh import trainable_parameters
from specray.actors.drafting.dspark.loss import DSparkLossSettings
from specray.actors.drafting.dspark.model import DSparkModel
from specray.actors.drafting.dspark.train import dspark_batch_loss
from specray.actors.drafting.head.data import DraftData, DraftSample
from specray.actors.drafting.head.loss import LossParts, TrainBatch, head_loss
from specray.actors.drafting.head.model import DraftHead

DraftModel = DraftHead | DSparkModel


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 2
    batch_size: int = 8  # samples per optimiser step
    max_rows: int = 256  # rows per sample (longer answers are cut)
    steps: int = 4  # chained draft steps of the training-time test (head only)
    lr: float = 5e-4
    warmup: int = 20  # optimiser steps of linear warm-up, then cosine to 10 %
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    decay: float = 0.8  # loss weight of step k is decay ** (k - 1) (head)
    tv_weight: float = 1.0  # (head)
    anchors: int = 16  # blocks drawn per answer and step (DSpark)
    position_decay: float | None = None  # DSpark weights exp(-(k-1)/d); None: block size
    val_fraction: float = 0.05
    seed: int = 0
    bf16: bool = True
    # Wall-clock cap: stop after the step that crosses it (then validate). The
    # schedule still assumes every epoch, and a capped run is only as
    # deterministic as the machine's speed.
    max_minutes: float | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "max_rows", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


@dataclass
class StepLog:
    """One optimiser step (or, for validation, one pass)."""

    step: int
    epoch: float
    loss: float
    ce: list[float]
    tv: list[float]
    accuracy: list[float]
    lr: float = 0.0


@dataclass
class TrainResult:
    train: list[StepLog] = field(default_factory=list)
    val: list[StepLog] = field(default_factory=list)  # one per epoch, plus one before training


def split_indices(count: int, settings: TrainSettings) -> tuple[list[int], list[int]]:
    """(train, validation) sample indices."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(settings.seed)).tolist()
    held = int(count * settings.val_fraction)
    if count > 1 and settings.val_fraction > 0:
        held = max(held, 1)
    return sorted(order[held:]), sorted(order[:held])


def collate(samples: Sequence[DraftSample], max_rows: int) -> TrainBatch:
    lengths = torch.tensor([min(len(s), max_rows) for s in samples], dtype=torch.int64)
    width = int(lengths.max())
    first = samples[0]
    tokens = torch.zeros(len(samples), width, dtype=torch.int64)
    hidden = torch.zeros(len(samples), width, first.hidden.shape[1])
    top_ids = torch.zeros(len(samples), width, first.top_ids.shape[1], dtype=torch.int64)
    top_probs = torch.zeros(len(samples), width, first.top_probs.shape[1])
    for b, (sample, n) in enumerate(zip(samples, lengths.tolist(), strict=True)):
        tokens[b, :n] = sample.tokens[:n]
        hidden[b, :n] = sample.hidden[:n].float()
        top_ids[b, :n] = sample.top_ids[:n]
        top_probs[b, :n] = sample.top_probs[:n].float()
    return TrainBatch(tokens, hidden, top_ids, top_probs, lengths)


def _loss(
    model: DraftModel, batch: TrainBatch, settings: TrainSettings, generator: torch.Generator
) -> LossParts:
    """``generator`` draws DSpark's anchors; the head uses none."""
    batch = batch.to(next(model.parameters()).device)
    if isinstance(model, DSparkModel):
        decay = DSparkLossSettings(decay=settings.position_decay)
        parts = dspark_batch_loss(model, batch, settings.anchors, generator, decay, settings.bf16)
        return LossParts(parts.total, parts.ce, parts.tv, parts.accuracy, parts.rows)
    with torch.autocast(batch.hidden.device.type, dtype=torch.bfloat16, enabled=settings.bf16):
        logits = model.forward_unrolled(batch.hidden, batch.tokens, settings.steps)
    return head_loss(logits, batch, model.to_draft, settings.decay, settings.tv_weight)


class _Totals:
    """Row-weighted sums of loss parts over several batches."""

    def __init__(self) -> None:
        self.loss = 0.0
        self.sums: dict[str, list[float]] = {key: [] for key in ("ce", "tv", "accuracy")}
        self.rows: list[int] = []

    def add(self, parts: LossParts) -> None:
        if not parts.rows:
            return
        self.loss += float(parts.total) * parts.rows[0]
        grow = len(parts.rows) - len(self.rows)
        if grow > 0:
            self.rows += [0] * grow
            for sums in self.sums.values():
                sums += [0.0] * grow
        for k, count in enumerate(parts.rows):
            if not count:  # a position no block reached (its means are nan)
                continue
            self.rows[k] += count
            for key, sums in self.sums.items():
                sums[k] += getattr(parts, key)[k] * count

    def mean(self) -> StepLog:
        def per_step(key: str) -> list[float]:
            return [
                v / r if r else math.nan for v, r in zip(self.sums[key], self.rows, strict=True)
            ]

        loss = self.loss / self.rows[0] if self.rows and self.rows[0] else math.nan
        return StepLog(0, 0.0, loss, per_step("ce"), per_step("tv"), per_step("accuracy"))


def evaluate(
    head: DraftModel, data: DraftData, indices: Sequence[int], settings: TrainSettings
) -> StepLog:
    """Row-weighted mean loss parts over ``indices``, without gradients (the
    same DSpark anchors every time, so validations compare)."""
    totals = _Totals()
    generator = torch.Generator().manual_seed(settings.seed + 7919)
    with torch.no_grad():
        for start in range(0, len(indices), settings.batch_size):
            chunk = indices[start : start + settings.batch_size]
            batch = collate([data[i] for i in chunk], settings.max_rows)
            totals.add(_loss(head, batch, settings, generator))
    return totals.mean()


def train_head(
    head: DraftModel,
    data: DraftData,
    settings: TrainSettings,
    on_step: Callable[[StepLog], None] | None = None,
    on_epoch: Callable[[StepLog], None] | None = None,
) -> TrainResult:
    """Train ``head`` (a draft head or a DSpark drafter) in place; logs every
    optimiser step and each epoch's validation."""
    train_ids, val_ids = split_indices(len(data), settings)
    if isinstance(head, DSparkModel):
        params = trainable_parameters(head)  # all but the frozen embedding and LM head
    else:
        params = [p for p in head.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    per_epoch = math.ceil(len(train_ids) / settings.batch_size)
    total = per_epoch * settings.epochs
    began = time.monotonic()
    budget = None if settings.max_minutes is None else 60 * settings.max_minutes

    def lr_scale(step: int) -> float:
        # A run its time budget stops still anneals: progress is the larger
        # of steps and seconds spent (so the schedule then depends on speed).
        spent = None if budget is None else (time.monotonic() - began) / budget
        return _lr_scale(step, settings.warmup, total, spent)

    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lr_scale)
    result = TrainResult()
    if val_ids:
        result.val.append(evaluate(head, data, val_ids, settings))
    step = 0
    began = time.monotonic()  # the budget counts from here (the schedule reads it too)
    deadline = None if budget is None else began + budget
    for epoch in range(settings.epochs):
        if deadline is not None and time.monotonic() > deadline:
            break
        generator = torch.Generator().manual_seed(settings.seed * 1000 + epoch)
        order = [train_ids[i] for i in torch.randperm(len(train_ids), generator=generator)]
        anchors = torch.Generator().manual_seed(settings.seed * 1000 + epoch + 500)
        head.train()
        for start in range(0, len(order), settings.batch_size):
            batch = collate(
                [data[i] for i in order[start : start + settings.batch_size]], settings.max_rows
            )
            parts = _loss(head, batch, settings, anchors)
            optimiser.zero_grad(set_to_none=True)
            parts.total.backward()
            torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
            optimiser.step()
            schedule.step()
            step += 1
            log = StepLog(
                step,
                epoch + (start + len(batch.lengths)) / len(order),
                float(parts.total.detach()),
                parts.ce,
                parts.tv,
                parts.accuracy,
                float(schedule.get_last_lr()[0]),
            )
            result.train.append(log)
            if on_step is not None:
                on_step(log)
            if deadline is not None and time.monotonic() > deadline:
                break
        head.eval()
        if val_ids:
            val = evaluate(head, data, val_ids, settings)
            val.step, val.epoch = step, result.train[-1].epoch if result.train else epoch + 1.0
            result.val.append(val)
            if on_epoch is not None:
                on_epoch(val)
    return result


def _lr_scale(step: int, warmup: int, total: int, spent: float | None = None) -> float:
    """Linear warm-up, then cosine from 1 to 0.1 over the steps, or over
    the time budget when ``spent`` (its fraction used) is further along."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if spent is not None:
        progress = max(progress, spent)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
