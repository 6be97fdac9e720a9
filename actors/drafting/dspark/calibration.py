"""Sequential temperature scaling (STS) of the confidence head.

A scheduler sums survival probabilities ``a_j = c_1 ... c_j`` into expected
accepted tokens, so it needs their absolute values right, not only their
order. STS fits one temperature per position on held-out proposals, left to
right: at position ``k`` the temperatures of ``1..k-1`` are already fixed,
and a 1-D grid search picks the ``T_k`` in ``c_k = sigmoid(z_k / T_k)`` that
minimises the expected calibration error of ``a_k`` against the observed
label "drafts 1..k were all accepted". Temperature scaling keeps each
position's ranking, so it changes no decision that only compares drafts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

CALIBRATION_NAME = "calibration.json"
DEFAULT_GRID = tuple(float(t) for t in torch.logspace(-2, 3, 61, base=2.0))  # 0.25 .. 8


@dataclass(frozen=True)
class Calibration:
    """Per-position temperatures of the confidence logits (1.0: as trained)."""

    temperatures: tuple[float, ...]

    @classmethod
    def identity(cls, block_size: int) -> Calibration:
        return cls((1.0,) * block_size)

    def confidences(self, logits: torch.Tensor) -> torch.Tensor:
        """``[..., n]`` logits of positions ``1..n`` to calibrated ``c_k`` in (0, 1)."""
        n = logits.shape[-1]
        if n > len(self.temperatures):
            raise ValueError(f"{n} positions, but temperatures for {len(self.temperatures)}")
        temps = torch.tensor(self.temperatures[:n], dtype=torch.float32, device=logits.device)
        return torch.sigmoid(logits.float() / temps)

    def save(self, directory: Path) -> Path:
        path = Path(directory) / CALIBRATION_NAME
        path.write_text(json.dumps({"temperatures": list(self.temperatures)}, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, directory: Path, block_size: int) -> Calibration:
        """The saved calibration, or the identity when there is none."""
        path = Path(directory) / CALIBRATION_NAME
        if not path.is_file():
            return cls.identity(block_size)
        temps = tuple(float(t) for t in json.loads(path.read_text())["temperatures"])
        if len(temps) != block_size:
            raise ValueError(f"{path}: {len(temps)} temperatures for a block of {block_size}")
        return cls(temps)


def expected_calibration_error(
    predicted: torch.Tensor,  # [n] probabilities
    observed: torch.Tensor,  # [n] labels in {0, 1} (or soft labels in [0, 1])
    num_bins: int = 20,
) -> float:
    """Equal-width-bin ECE: the sample-weighted mean of |mean prediction -
    mean label| over bins of the prediction."""
    if predicted.numel() == 0:
        return 0.0
    predicted, observed = predicted.double().flatten(), observed.double().flatten()
    bins = (predicted * num_bins).long().clamp(0, num_bins - 1)
    count = torch.bincount(bins, minlength=num_bins).double()
    pred_sum = torch.bincount(bins, predicted, minlength=num_bins)
    label_sum = torch.bincount(bins, observed, minlength=num_bins)
    return float((pred_sum - label_sum).abs().sum() / count.sum())


def outcome_labels(
    verified: torch.Tensor,  # [n] int: positions of each proposal that were verified
    accepted: torch.Tensor,  # [n] int: drafts accepted (a prefix of the verified ones)
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # survived [n, γ] float64, reached [n, γ] bool
    """Observed labels of verified proposals: whether drafts ``1..k`` all
    survived, and whether position ``k`` was verified at all."""
    positions = torch.arange(1, block_size + 1)
    reached = verified.unsqueeze(1) >= positions
    return (accepted.unsqueeze(1) >= positions).double(), reached


def fit_sequential_temperatures(
    logits: torch.Tensor,  # [n, γ] confidence logits of held-out proposals
    survived: torch.Tensor,  # [n, γ] in [0, 1]: drafts 1..k all accepted (or its probability)
    reached: torch.Tensor,  # [n, γ] bool: position k counts for this proposal
    grid: Sequence[float] = DEFAULT_GRID,
    num_bins: int = 20,
) -> Calibration:
    """STS: one temperature per position, fitted left to right (see module
    docstring). ``survived`` may be observed outcomes (:func:`outcome_labels`)
    or their probabilities (the product of analytic acceptance rates on
    held-out training data). A position no proposal reached keeps 1."""
    block = logits.shape[1]
    survived = survived.double()
    prefix = torch.ones(logits.shape[0], dtype=torch.float64)  # a_{k-1}, calibrated
    temps: list[float] = []
    for k in range(block):
        rows = reached[:, k]
        if not bool(rows.any()):
            temps.append(1.0)
            continue
        z, before, label = logits[rows, k].double(), prefix[rows], survived[rows, k]
        errors = [
            expected_calibration_error(before * torch.sigmoid(z / temp), label, num_bins)
            for temp in grid
        ]
        best = grid[errors.index(min(errors))]
        temps.append(best)
        prefix = prefix * torch.sigmoid(logits[:, k].double() / best)
    return Calibration(tuple(temps))
