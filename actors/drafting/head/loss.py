"""The head's loss: cross-entropy to the target's token plus total variation
to the target's distribution, weighted down by draft position.

Under greedy verification a draft survives iff it is the target's argmax,
hence the cross-entropy to that token. Under sampling a draft survives with
probability ``1 - TV(p, q)``, hence TV itself (on the target's top-k plus
one bin for the rest: a lower bound that is exact on that coarsening).
Later draft steps matter only when the earlier ones survived, so step ``k``
weighs ``decay ** (k - 1)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class TrainBatch:
    """Padded rows of a few samples (see :class:`DraftSample`)."""

    tokens: torch.Tensor  # [B, T] int64
    hidden: torch.Tensor  # [B, T, fused] float32
    top_ids: torch.Tensor  # [B, T, K] int64
    top_probs: torch.Tensor  # [B, T, K] float32
    lengths: torch.Tensor  # [B] int64: real rows per sample

    def to(self, device: torch.device) -> TrainBatch:
        return TrainBatch(
            self.tokens.to(device),
            self.hidden.to(device),
            self.top_ids.to(device),
            self.top_probs.to(device),
            self.lengths.to(device),
        )


@dataclass
class LossParts:
    total: torch.Tensor  # scalar, what is minimised
    ce: list[float]  # per step
    tv: list[float]  # per step
    accuracy: list[float]  # per step: head argmax == target argmax
    rows: list[int]  # per step: rows counted


def head_loss(
    step_logits: Sequence[torch.Tensor],  # each [B, T, draft vocab]
    batch: TrainBatch,
    to_draft: torch.Tensor,  # [target vocab] int64, -1 outside the draft vocabulary
    decay: float = 0.8,
    tv_weight: float = 1.0,
) -> LossParts:
    """Step ``k`` (1-based) at anchor ``a`` is scored against row ``a + k``."""
    length = batch.tokens.shape[1]
    positions = torch.arange(length)
    total = torch.zeros(())
    weights = 0.0
    parts = LossParts(total, [], [], [], [])
    for k, logits in enumerate(step_logits, start=1):
        valid = positions.unsqueeze(0) + k < batch.lengths.unsqueeze(1)  # [B, T]
        if not bool(valid.any()):
            break
        ids = batch.top_ids[:, k:][valid[:, : length - k]]  # [N, K]
        probs = batch.top_probs[:, k:][valid[:, : length - k]]
        rows = logits[:, : length - k][valid[:, : length - k]].float()  # [N, draft vocab]
        target = to_draft[ids[:, 0]]
        ce = F.cross_entropy(rows, target, ignore_index=-1)
        tv = _top_k_tv(torch.softmax(rows, dim=-1), to_draft[ids], probs)
        weight = decay ** (k - 1)
        total = total + weight * (torch.nan_to_num(ce) + tv_weight * tv)
        weights += weight
        with torch.no_grad():
            hits = (rows.argmax(-1) == target).float().mean()
        parts.ce.append(float(ce.detach()))
        parts.tv.append(float(tv.detach()))
        parts.accuracy.append(float(hits))
        parts.rows.append(int(rows.shape[0]))
    parts.total = total / max(weights, 1e-9)
    return parts


def _top_k_tv(
    draft_probs: torch.Tensor,  # [N, draft vocab]
    draft_index: torch.Tensor,  # [N, K]: the target's top-k in draft indices, -1 if absent
    target_probs: torch.Tensor,  # [N, K]
) -> torch.Tensor:
    present = draft_index >= 0
    q = draft_probs.gather(1, draft_index.clamp(min=0)) * present
    rest = (1.0 - target_probs.sum(-1)) - (1.0 - q.sum(-1))
    return 0.5 * ((target_probs - q).abs().sum(-1) + rest.abs()).mean()
