"""Sampling helpers the rejection-sampler tests share."""

from __future__ import annotations

import torch


def sample_rows(
    probs: torch.Tensor,  # [n, vocab] float32
    gen: torch.Generator,
) -> torch.Tensor:  # [n] int64
    """Exponential race: argmax(probs / E) with E ~ Exp(1) samples from each row."""
    race = torch.empty(probs.shape, dtype=torch.float64).exponential_(generator=gen)
    return (probs.double() / race).argmax(dim=-1)
