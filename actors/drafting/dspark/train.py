"""DSpark on the draft head's training data: blocks from random anchors.

A :class:`TrainBatch` row ``t`` of an answer holds the target's hidden
states at the position whose output is ``tokens[t]`` (row 0: the prompt's
last position), and the target's top-k there. In those terms a block
anchored at row ``a >= 1`` is what the drafter sees at serving time:

    context   rows 0 .. a-1 (their hidden states; positions are row indices,
              rotary attention only sees differences)
    anchor    tokens[a-1], the token sitting at row a's position
    draft k   (0-based) predicts tokens[a+k], against the top-k of row a+k,
              after the true token tokens[a+k-1] (teacher forcing: a draft is
              only verified when every earlier one was accepted)

Several anchors per answer are drawn without replacement each step
(DeepSpec draws 512 per 4096-token sequence); the loss is
:func:`.loss.dspark_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specray.actors.drafting.dspark.loss import (
    DSparkLossParts,
    DSparkLossSettings,
    TargetTopK,
    dspark_loss,
)
from specray.actors.drafting.dspark.model import DSparkModel, TeacherForced
from specray.actors.drafting.head.loss import TrainBatch


@dataclass
class Blocks:
    """The blocks of one batch, gathered from its rows."""

    anchors: torch.Tensor  # [B, A] int64: anchor rows (>= 1)
    anchor_ids: torch.Tensor  # [B, A] int64
    previous: torch.Tensor  # [B, A, γ] int64: the true token before each draft
    labels: torch.Tensor  # [B, A, γ] int64
    target: TargetTopK  # [B, A, γ, K]
    valid: torch.Tensor  # [B, A, γ] bool


def sample_anchors(
    lengths: torch.Tensor,  # [B] int64: rows per answer
    count: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:  # anchors [B, count] int64, keep [B, count] bool
    """Up to ``count`` distinct anchor rows in ``[1, length - 1]`` per answer,
    ascending; short answers pad with row 1 and ``keep`` False."""
    anchors = torch.ones(len(lengths), count, dtype=torch.int64)
    keep = torch.zeros(len(lengths), count, dtype=torch.bool)
    for b, length in enumerate(lengths.tolist()):
        candidates = length - 1
        if candidates < 1:
            continue
        take = min(count, candidates)
        drawn = torch.randperm(candidates, generator=generator)[:take].sort().values + 1
        anchors[b, :take], keep[b, :take] = drawn, True
    return anchors, keep


def gather_blocks(
    batch: TrainBatch, anchors: torch.Tensor, keep: torch.Tensor, block: int
) -> Blocks:
    device = batch.tokens.device
    anchors, keep = anchors.to(device), keep.to(device)
    bsz, width = batch.tokens.shape
    offsets = torch.arange(block, device=device)
    rows = anchors.unsqueeze(-1) + offsets  # [B, A, γ]: the row each draft predicts
    valid = keep.unsqueeze(-1) & (rows < batch.lengths.to(device).view(bsz, 1, 1))
    safe = rows.clamp(max=width - 1).flatten(1)  # [B, A*γ]
    before = (rows - 1).clamp(max=width - 1).flatten(1)
    shape = rows.shape
    k = batch.top_ids.shape[-1]

    def take(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if values.dim() == 2:
            return values.gather(1, index).view(shape)
        expanded = index.unsqueeze(-1).expand(-1, -1, k)
        return values.gather(1, expanded).view(*shape, k)

    return Blocks(
        anchors=anchors,
        anchor_ids=batch.tokens.gather(1, anchors - 1),
        previous=take(batch.tokens, before),
        labels=take(batch.tokens, safe),
        target=TargetTopK(take(batch.top_ids, safe), take(batch.top_probs, safe)),
        valid=valid,
    )


def block_forward(model: DSparkModel, batch: TrainBatch, blocks: Blocks) -> TeacherForced:
    return model.teacher_forced(batch.hidden, blocks.anchor_ids, blocks.anchors, blocks.previous)


def random_blocks(
    model: DSparkModel,
    batch: TrainBatch,
    anchors_per_answer: int,
    generator: torch.Generator,
    bf16: bool = False,
) -> tuple[Blocks, TeacherForced]:
    """Up to ``anchors_per_answer`` random blocks of each answer, all run in
    one forward (under bf16 autocast if asked)."""
    anchors, keep = sample_anchors(batch.lengths, anchors_per_answer, generator)
    blocks = gather_blocks(batch, anchors, keep, model.block_size)
    with torch.autocast(batch.hidden.device.type, dtype=torch.bfloat16, enabled=bf16):
        return blocks, block_forward(model, batch, blocks)


def dspark_batch_loss(
    model: DSparkModel,
    batch: TrainBatch,
    anchors_per_answer: int,
    generator: torch.Generator,
    settings: DSparkLossSettings,
    bf16: bool = False,
) -> DSparkLossParts:
    """Draw anchors, run every block in one forward and score it (the loss
    itself is float32)."""
    blocks, out = random_blocks(model, batch, anchors_per_answer, generator, bf16)
    return dspark_loss(
        out.draft_logits,
        out.confidence_logits,
        blocks.labels,
        blocks.target,
        blocks.valid,
        settings,
    )
