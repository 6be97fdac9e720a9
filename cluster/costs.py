"""Measured round costs, for load-aware γ scheduling.

DSpark profiles its engine's steps-per-second curve once and looks it up per
round. Here the verify time of a target replica against the tokens in its
batch is ``level × shape(tokens)``: the *shape* (cost relative to the
smallest size) comes from a back-to-back profile when a replica starts, the
*level* from every round since. On a shared machine the absolute time of a
forward swings with other people's load by several times within minutes, so
a table of absolute times collected at different moments has no meaningful
shape; a ratio measured back to back does, and it is the ratio that decides
whether one more token pays. Drafting time is learned per depth.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any


@dataclass
class CostCurve:
    """Seconds as a function of a size: an exponential average per observed
    size, linear in between, extrapolated along the last segment and never
    decreasing with size (a bigger batch never costs less)."""

    decay: float = 0.7  # weight of the old average on each new observation
    _points: dict[int, float] = field(default_factory=dict)

    def observe(self, size: int, seconds: float) -> None:
        old = self._points.get(size)
        new = seconds if old is None else self.decay * old + (1 - self.decay) * seconds
        self._points[size] = new

    @property
    def empty(self) -> bool:
        return not self._points

    def seconds(self, size: int) -> float:
        """The estimate at ``size``; 0 while nothing was observed."""
        if not self._points:
            return 0.0
        sizes = sorted(self._points)
        values: list[float] = []
        for s in sizes:  # running maximum: monotone in size
            values.append(max(self._points[s], values[-1] if values else 0.0))
        if size <= sizes[0]:
            # Below what was seen, assume proportional: optimistic, so smaller
            # sizes get tried and measured rather than ruled out unseen.
            return values[0] * max(size, 0) / sizes[0]
        if size >= sizes[-1]:
            if len(sizes) == 1:
                return values[0] * size / sizes[0]
            slope = (values[-1] - values[-2]) / (sizes[-1] - sizes[-2])
            return values[-1] + slope * (size - sizes[-1])
        hi = bisect.bisect_left(sizes, size)
        lo = hi - 1
        frac = (size - sizes[lo]) / (sizes[hi] - sizes[lo])
        return values[lo] + frac * (values[hi] - values[lo])

    def as_dict(self) -> dict[int, float]:
        return dict(sorted(self._points.items()))


@dataclass
class ProfiledCurve:
    """``level × shape(size)``: shape from a profile, level from observations.

    Until a profile is set it is a plain :class:`CostCurve`.
    """

    decay: float = 0.8
    fallback: CostCurve = field(default_factory=CostCurve)
    _shape: CostCurve | None = None
    _level: float | None = None

    def set_profile(self, points: list[tuple[int, float]]) -> None:
        """Seconds at several sizes, measured back to back."""
        if not points:
            return
        smallest = min(points)[1]
        shape = CostCurve(decay=0.0)
        for size, seconds in points:
            shape.observe(size, seconds / smallest)
        self._shape = shape
        self._level = smallest if self._level is None else self._level

    def observe(self, size: int, seconds: float) -> None:
        self.fallback.observe(size, seconds)
        if self._shape is None:
            return
        level = seconds / max(self._shape.seconds(size), 1e-9)
        old = self._level
        self._level = level if old is None else self.decay * old + (1 - self.decay) * level

    def seconds(self, size: int) -> float:
        if self._shape is None or self._level is None:
            return self.fallback.seconds(size)
        return self._level * self._shape.seconds(size)

    def as_dict(self) -> dict[str, Any]:
        shape = self._shape.as_dict() if self._shape is not None else {}
        return {"level_s": self._level, "shape": shape}


@dataclass
class RoundCostModel:
    """Seconds of one round: verifying ``num_tokens`` and drafting ``max_gamma`` deep.

    Without overlap the two run one after the other; with two micro-batches
    the drafts of one run while the other verifies, so the slower one counts.
    """

    verify: ProfiledCurve = field(default_factory=ProfiledCurve)
    draft: CostCurve = field(default_factory=CostCurve)
    overlap: bool = False

    def round_seconds(self, num_tokens: int, max_gamma: int) -> float:
        verify = self.verify.seconds(num_tokens)
        draft = self.draft.seconds(max_gamma) if max_gamma > 0 else 0.0
        total = max(verify, draft) if self.overlap else verify + draft
        return max(total, 1e-9)  # the scheduler divides by it
