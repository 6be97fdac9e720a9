"""What a drafter's raw confidence has turned out to mean: the acceptance it
was seen to have.

A draft model's confidence in a token is its own probability of it, which
need not be how often the target accepts such a token: fed it raw, a stop
rule (:class:`DraftStop`) weighs each draft by a number the target's
verdicts need not bear out. A scheduler learns the map from verdicts and
ships it with the stop rule.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConfidenceMap:
    """The acceptance shown in each of ``len(values)`` equal-width bins of
    [0, 1], the last closed. A step, not a line between bin centres: a bin
    with evidence next to one without would be pulled halfway to the prior."""

    values: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.values:
            raise ValueError("a confidence map needs at least one bin")

    def __call__(self, confidence: float) -> float:
        return self.values[bin_of(confidence, len(self.values))]


def bin_of(confidence: float, bins: int) -> int:
    """Which of ``bins`` equal-width bins of [0, 1] ``confidence`` falls in."""
    return min(max(int(confidence * bins), 0), bins - 1)
