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


def total_variation(counts: torch.Tensor, expected: torch.Tensor) -> float:
    return 0.5 * float((counts.double() / counts.sum() - expected.double()).abs().sum())


def chi_square_p_value(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; cells expecting < 5 are pooled."""
    counts, expected = counts.double().flatten(), expected.double().flatten() * counts.sum()
    big = expected >= 5.0
    observed = torch.cat([counts[big], counts[~big].sum().reshape(1)])
    wanted = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    if wanted[-1] < 5.0:  # pool too small to be its own cell: fold into the smallest
        observed, wanted = observed[:-1], wanted[:-1]
        observed[wanted.argmin()] += counts[~big].sum()
        wanted[wanted.argmin()] += expected[~big].sum()
    statistic = ((observed - wanted) ** 2 / wanted).sum()
    dof = observed.numel() - 1
    # Survival function of chi2(dof) = regularised upper incomplete gamma.
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0).double(), statistic / 2.0))
