"""DSpark's training loss: cross-entropy, distribution matching and the
confidence head's survival target, weighted down along the block.

For draft position ``k`` (1-based) with draft distribution ``q_k`` (Markov
bias included, every earlier draft the true token) and target distribution
``p_k``:

    CE_k   = -log q_k(x*_k)                        # the target's token
    L1_k   = || q_k - p_k ||_1                     # 2 x total variation
    c*_k   = 1 - L1_k / 2                          # P(draft k accepted | 1..k-1 were)
    BCE_k  = BCE(sigmoid(confidence logit_k), c*_k)   # c* is a label: no gradient
    w_k    = exp(-(k - 1) / decay)                 # later drafts matter only if earlier survive

    L = 0.1 * Σ w CE / Σ w  +  0.9 * Σ w L1 / Σ w  +  1.0 * Σ w BCE / Σ w

over every valid position. ``decay`` is the block size in the paper;
DeepSpec's released configs use 4 for blocks of 7.

The target distribution comes as its top-k (ids and probabilities): L1 is
then taken on the coarsening {top-k tokens, everything else}, which is
exact when the top-k holds all of the target's mass (k = vocab size gives
DeepSpec's loss exactly) and otherwise a lower bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class DSparkLossSettings:
    ce_weight: float = 0.1
    l1_weight: float = 0.9
    confidence_weight: float = 1.0
    decay: float | None = None  # position weights exp(-(k-1)/decay); None: the block size


@dataclass
class TargetTopK:
    """The target's distribution at each draft position, as its top-k."""

    ids: torch.Tensor  # [..., γ, K] int64
    probs: torch.Tensor  # [..., γ, K] float32


@dataclass
class DSparkLossParts:
    total: torch.Tensor  # scalar, what is minimised
    ce_mean: float  # the three weighted means
    l1_mean: float
    confidence_mean: float
    ce: list[float]  # per position, unweighted means over valid rows
    tv: list[float]
    accuracy: list[float]  # draft argmax == the target's token
    rows: list[int]


def position_weights(block_size: int, decay: float | None) -> torch.Tensor:
    """``[γ]``: ``exp(-(k - 1) / decay)`` for k = 1..γ."""
    scale = float(block_size) if decay is None else decay
    if scale <= 0:
        raise ValueError(f"decay must be > 0, got {scale}")
    return torch.exp(-torch.arange(block_size, dtype=torch.float32) / scale)


def top_k_l1(
    draft_probs: torch.Tensor,  # [..., V]
    target: TargetTopK,  # [..., K]
) -> torch.Tensor:  # [...]
    """``|| q - p ||_1`` on the coarsening {each top-k token, the rest}."""
    q_top = draft_probs.gather(-1, target.ids)
    rest = (1.0 - target.probs.sum(-1)) - (1.0 - q_top.sum(-1))
    return (target.probs - q_top).abs().sum(-1) + rest.abs()


def dspark_loss(
    draft_logits: torch.Tensor,  # [..., γ, V]: teacher-forced, Markov bias included
    confidence_logits: torch.Tensor | None,  # [..., γ]: before the sigmoid
    labels: torch.Tensor,  # [..., γ] int64: the target's token at each position
    target: TargetTopK,  # [..., γ, K]
    valid: torch.Tensor,  # [..., γ] bool: a contiguous prefix of each block
    settings: DSparkLossSettings,
) -> DSparkLossParts:
    block = draft_logits.shape[-2]
    weights = position_weights(block, settings.decay).to(draft_logits.device) * valid.float()
    weight_sum = weights.sum().clamp_min(1e-12)
    logits = draft_logits.float()
    ce = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="none")
    ce = ce.view(labels.shape)
    l1 = top_k_l1(torch.softmax(logits, dim=-1), target)
    acceptance = (1.0 - 0.5 * l1).clamp(0.0, 1.0).detach()
    ce_mean = (ce * weights).sum() / weight_sum
    l1_mean = (l1 * weights).sum() / weight_sum
    total = settings.ce_weight * ce_mean + settings.l1_weight * l1_mean
    confidence_mean = torch.zeros(())
    if confidence_logits is not None:
        bce = F.binary_cross_entropy_with_logits(
            confidence_logits.float(), acceptance, reduction="none"
        )
        confidence_mean = (bce * weights).sum() / weight_sum
        total = total + settings.confidence_weight * confidence_mean
    with torch.no_grad():
        counts = valid.flatten(0, -2).float().sum(0)  # [γ]
        per = valid.flatten(0, -2).float()

        def mean(values: torch.Tensor) -> list[float]:
            sums = (values.flatten(0, -2).float() * per).sum(0)
            return [float(s / c) if c > 0 else math.nan for s, c in zip(sums, counts, strict=True)]

        hits = (logits.argmax(-1) == labels).float()
        return DSparkLossParts(
            total=total,
            ce_mean=float(ce_mean),
            l1_mean=float(l1_mean),
            confidence_mean=float(confidence_mean),
            ce=mean(ce),
            tv=mean(0.5 * l1),
            accuracy=mean(hits),
            rows=[int(c) for c in counts],
        )
