"""The confidence head on held-out answers: survival labels and the STS fit.

After training, the validation answers (never trained on) give per block
the confidence logits and what verification would have done with each
draft, teacher-forced as in training (a draft is only verified when every
earlier one was accepted, so the true prefix is what it would have seen).
Two kinds of label, one per way the server decodes:

- ``greedy``: draft ``k`` survives when drafts ``1..k`` all equal the
  target's argmax (the top-1 of the stored distribution);
- ``sampled``: the probability it survives, ``Π (1 - TV_i)`` for ``i <= k``
  (temperature 1: the chance that rejection sampling accepts a token drawn
  from the draft), the quantity the confidence loss trains toward.

:func:`fit_held_out` fits sequential temperature scaling
(:mod:`.calibration`) to them and reports the ECE of every survival product
before and after.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from specray.actors.drafting.dspark.calibration import (
    Calibration,
    expected_calibration_error,
    fit_sequential_temperatures,
)
from specray.actors.drafting.dspark.loss import top_k_l1
from specray.actors.drafting.dspark.model import DSparkModel
from specray.actors.drafting.dspark.train import random_blocks
from specray.actors.drafting.head.data import DraftData
from specray.actors.drafting.head.trainer import collate

LabelKind = Literal["greedy", "sampled"]


@dataclass
class HeldOutBlocks:
    """Every held-out block, flattened: one row per block."""

    logits: torch.Tensor  # [n, γ] float32: confidence logits, before the sigmoid
    survived: torch.Tensor  # [n, γ] float64: drafts 1..k all accepted (or its probability)
    reached: torch.Tensor  # [n, γ] bool: position k lies inside the answer


@dataclass
class CalibrationFit:
    """The fitted calibration and what it did to the held-out ECE."""

    calibration: Calibration
    labels: LabelKind
    blocks: int
    ece_before: list[float]  # [γ]: ECE of a_k = c_1 ... c_k with the raw head
    ece_after: list[float]  # [γ]: the same with the fitted temperatures


def held_out_blocks(
    model: DSparkModel,
    data: DraftData,
    indices: Sequence[int],
    labels: LabelKind,
    anchors_per_answer: int = 16,
    max_rows: int = 192,
    batch_size: int = 4,
    seed: int = 0,
    bf16: bool = True,
) -> HeldOutBlocks:
    """Blocks from ``anchors_per_answer`` random anchors of each answer in
    ``indices`` (seeded: the same blocks every call), run as training runs
    them (``bf16``: under bf16 autocast)."""
    if model.confidence_head is None:
        raise ValueError("this DSpark drafter has no confidence head to calibrate")
    generator = torch.Generator().manual_seed(seed + 104729)
    device = next(model.parameters()).device
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            batch = collate([data[i] for i in chunk], max_rows).to(device)
            blocks, out = random_blocks(model, batch, anchors_per_answer, generator, bf16)
            assert out.confidence_logits is not None
            if labels == "greedy":
                per_draft = (out.draft_logits.argmax(-1) == blocks.target.ids[..., 0]).double()
            else:
                draft_probs = torch.softmax(out.draft_logits.float(), dim=-1)
                per_draft = (1.0 - 0.5 * top_k_l1(draft_probs, blocks.target)).clamp(0, 1)
            survived = per_draft.double().cumprod(dim=-1)
            keep_blocks = blocks.valid[..., 0]  # [B, A]: the block's first draft is real
            parts.append(
                (
                    out.confidence_logits[keep_blocks].float().cpu(),
                    survived[keep_blocks].cpu(),
                    blocks.valid[keep_blocks].cpu(),
                )
            )
    if not parts:
        raise ValueError("no held-out answers to calibrate on")
    logits, survived, reached = (torch.cat(column) for column in zip(*parts, strict=True))
    return HeldOutBlocks(logits, survived, reached)


def survival_ece(
    logits: torch.Tensor,  # [n, γ] confidence logits
    survived: torch.Tensor,  # [n, γ] labels (see HeldOutBlocks)
    reached: torch.Tensor,  # [n, γ] bool
    calibration: Calibration,
) -> list[float]:  # [γ]
    """Per position ``k``, the ECE of ``a_k = c_1 ... c_k`` over the rows
    that reach ``k`` (nan where none does)."""
    survival = calibration.confidences(logits).double().cumprod(dim=-1)
    return [
        expected_calibration_error(survival[reached[:, k], k], survived[reached[:, k], k])
        if bool(reached[:, k].any())
        else float("nan")
        for k in range(logits.shape[1])
    ]


def fit_held_out(blocks: HeldOutBlocks, labels: LabelKind) -> CalibrationFit:
    """STS on the held-out blocks, with the ECE before and after."""
    identity = Calibration.identity(blocks.logits.shape[1])
    fitted = fit_sequential_temperatures(blocks.logits, blocks.survived, blocks.reached)
    return CalibrationFit(
        calibration=fitted,
        labels=labels,
        blocks=int(blocks.logits.shape[0]),
        ece_before=survival_ece(blocks.logits, blocks.survived, blocks.reached, identity),
        ece_after=survival_ece(blocks.logits, blocks.survived, blocks.reached, fitted),
    )
