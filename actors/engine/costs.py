"""Measured round costs, for load-aware γ scheduling.

DSpark profiles its engine's steps-per-second curve once and looks it up per
round. Here the verify time of a target replica against the tokens in its
batch is ``level × shape(tokens)``: the *shape* (cost relative to the
smallest size) comes from a back-to-back profile when a replica starts, the
*level* from every round since. On a shared machine the absolute time of a
forward swings with other people's load by several times within minutes, so
a table of absolute times collected at different moments has no meaningful
shape; a ratio measured back to back does, and it is the ratio that decides
whether one more token pays. Drafting is modelled the same way, per step
of a propose call: its shape from the drafter's own profile of feeding n
tokens (a catch-up after rounds without drafting is a long feed), its level
from every call.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any

from specray.actors.engine.gamma import RoundShape


@dataclass
class CostCurve:
    """Seconds as a function of a size: an exponential average per observed
    size, linear in between, extrapolated along the last segment and never
    decreasing with size (a bigger batch never costs less)."""

    decay: float = 0.7  # weight of the old average on each new observation
    _points: dict[int, float] = field(default_factory=dict)
    # sizes and their running maximum, rebuilt after an observation: the
    # scheduler asks for hundreds of estimates a round
    _table: tuple[list[int], list[float]] | None = None

    def observe(self, size: int, seconds: float) -> None:
        old = self._points.get(size)
        new = seconds if old is None else self.decay * old + (1 - self.decay) * seconds
        self._points[size] = new
        self._table = None

    @property
    def empty(self) -> bool:
        return not self._points

    def seconds(self, size: int) -> float:
        """The estimate at ``size``; 0 while nothing was observed."""
        if not self._points:
            return 0.0
        if self._table is None:
            sizes = sorted(self._points)
            values: list[float] = []
            for s in sizes:  # running maximum: monotone in size
                values.append(max(self._points[s], values[-1] if values else 0.0))
            self._table = (sizes, values)
        sizes, values = self._table
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


def relative_shape(points: list[tuple[int, float]]) -> tuple[CostCurve, float]:
    """A profile's seconds relative to its smallest size's, and those seconds."""
    smallest = max(min(points)[1], 1e-9)
    shape = CostCurve(decay=0.0)
    for size, seconds in points:
        shape.observe(size, seconds / smallest)
    return shape, smallest


@dataclass
class _ShapeAndLevel:
    """A profiled shape (cost relative to the profile's smallest size) times
    a level that follows the load: an exponential average of observed
    seconds over the shape's prediction."""

    decay: float = 0.8
    _shape: CostCurve | None = None
    _level: float | None = None

    def set_profile(self, points: list[tuple[int, float]]) -> None:
        """Seconds at several sizes, measured back to back."""
        if points:
            self._shape, smallest = relative_shape(points)
            self._level = smallest if self._level is None else self._level

    def _learn(self, seconds: float, relative: float) -> None:
        level = seconds / max(relative, 1e-9)
        old = self._level
        self._level = level if old is None else self.decay * old + (1 - self.decay) * level

    def as_dict(self) -> dict[str, Any]:
        shape = self._shape.as_dict() if self._shape is not None else {}
        return {"level_s": self._level, "shape": shape}


@dataclass
class LineFit:
    """``y ≈ intercept + slope × x`` over exponentially weighted points: the
    part of a round's seconds that does not grow with its size."""

    decay: float = 0.97
    # The relative sizes must spread this much (their weighted variance)
    # before an intercept is read from them: rounds all of one size say
    # nothing about what a round costs whatever its size.
    min_spread: float = 0.05
    _sums: tuple[float, float, float, float, float] = (0.0, 0.0, 0.0, 0.0, 0.0)

    def add(self, x: float, y: float) -> None:
        w, sx, sy, sxx, sxy = (self.decay * v for v in self._sums)
        self._sums = (w + 1.0, sx + x, sy + y, sxx + x * x, sxy + x * y)

    def intercept(self) -> float | None:
        """The fit's intercept, kept within ``[0, 0.8 × mean y]``; None while
        the sizes hardly vary or the fit slopes down."""
        w, sx, sy, sxx, sxy = self._sums
        if w < 2.0:
            return None
        mean_x, mean_y = sx / w, sy / w
        spread = sxx / w - mean_x * mean_x
        if spread < self.min_spread:
            return None
        slope = (sxy / w - mean_x * mean_y) / spread
        if slope <= 0.0:
            return None
        return min(max(mean_y - slope * mean_x, 0.0), 0.8 * mean_y)


@dataclass
class ShapeCorrection:
    """Per knot of a profiled shape (a size it was timed at), the factor
    rounds have shown its relative cost to be off by.

    The profile times each size once or a few times, back to back, when a
    replica starts; on a shared machine one slow forward at a knot bends the
    whole curve for as long as the replica lives. On an AVX2-only machine
    (1.5B, n-gram, concurrency 16) two servers started minutes apart
    profiled 32 tokens at 2.14x and 1.63x the cost of 16; for its whole
    level the second priced each token from 16 to 32 at 39.6 ms where it
    cost 47.9 ms, so copies that break even at 0.89 acceptance looked paid
    for at 0.69 (docs/router.md). The level follows the rounds but only
    scales the curve; this bends it back.

    A round of ``n`` tokens between knots ``lo`` and ``hi`` teaches both in
    proportion to how near it lies, in log space, toward what it waited
    over what the curve priced. The knot most rounds land near (most
    decayed weight) is the reference and stays 1: the level carries the
    scale there, so a round at the reference moves the level alone and the
    corrections only ever say how other sizes compare with it.
    """

    rate: float = 0.3  # log step per round wholly at one knot
    decay: float = 0.99  # of each knot's weight, per round
    limit: float = 3.0  # a factor stays within [1 / limit, limit]
    factors: dict[int, float] = field(default_factory=dict)
    weights: dict[int, float] = field(default_factory=dict)

    def learn(self, knots: list[int], size: int, ratio: float) -> bool:
        """A round of ``size`` waited ``ratio`` times its price; whether a
        factor moved."""
        shares = _knot_shares(knots, size)
        self.weights = {k: w * self.decay for k, w in self.weights.items()}
        for knot, share in shares:
            self.weights[knot] = self.weights.get(knot, 0.0) + share
        reference = max(self.weights, key=lambda k: self.weights[k])
        step = math.log(max(ratio, 1e-9)) * self.rate
        bound = math.log(self.limit)
        moved = False
        for knot, share in shares:
            if knot == reference or share <= 0.0:
                continue
            old = math.log(self.factors.get(knot, 1.0))
            self.factors[knot] = math.exp(min(max(old + step * share, -bound), bound))
            moved = True
        return moved


def _knot_shares(knots: list[int], size: int) -> list[tuple[int, float]]:
    """The knots a size lies between and its nearness to each (summing to
    1); the nearest end knot alone outside them."""
    if size <= knots[0]:
        return [(knots[0], 1.0)]
    if size >= knots[-1]:
        return [(knots[-1], 1.0)]
    hi = bisect.bisect_left(knots, size)
    lo = hi - 1
    frac = (size - knots[lo]) / (knots[hi] - knots[lo])
    return [(knots[lo], 1.0 - frac), (knots[hi], frac)]


@dataclass
class ProfiledCurve(_ShapeAndLevel):
    """``fixed + level × shape(size)``: shape from a profile, bent by what
    rounds showed (:class:`ShapeCorrection`), level and fixed part from
    observations. Until a profile is set it is a plain :class:`CostCurve`.

    The fixed part is what a verify costs whatever its size beyond the
    profiled forward: the round trip to a remote target, and the work other
    processes on the same cores do once per round while it computes (each
    request's chunk streamed through the router and the front door). The
    profile, timed back to back in the target's process, has none of it.
    Folded into the level it would scale with the tokens, and a draft token
    would look as dear as ever beside a round that costs more than the
    forward; so it is fit apart (:class:`LineFit`, against the profile's
    own shape, so that the correction bends only what the fixed part and
    the level leave unexplained) once rounds of different sizes were seen,
    which is what lets speculation pay for it.

    Only rounds like the profile's teach the level, the fixed part and the
    correction: every token fed with its logit row, as drafts are. A
    prompt's tokens are fed without one (only its last row is read), so a
    prefill costs less per token than the profile's shape says, and
    hundreds of tokens of it lie far out along the line fit. On a curve
    modelled on the 1.5B GGUF on an AVX2-only machine, one 500-token prefill
    per request read as a fixed part of over 50 ms a round where there is
    none: a one-token verify priced dear and each further token cheap, so
    the budget verified long n-gram guesses it should have cut
    (``tests/test_costs.py::test_prefill_rounds_leave_the_fixed_part_alone``).
    """

    fallback: CostCurve = field(default_factory=CostCurve)
    fixed: float = 0.0
    correction: ShapeCorrection = field(default_factory=ShapeCorrection)
    _fit: LineFit = field(default_factory=LineFit)
    _bent: CostCurve | None = None  # the shape times the correction, per knot

    def set_profile(self, points: list[tuple[int, float]]) -> None:
        super().set_profile(points)
        self.correction = ShapeCorrection()
        self._bent = None

    def observe(self, size: int, seconds: float, logits: int | None = None) -> None:
        """A round of ``size`` tokens took ``seconds``; ``logits``: the rows
        it returned (all ``size`` when None)."""
        self.fallback.observe(size, seconds)
        if self._shape is None or (logits is not None and logits < size):
            return
        self._fit.add(self._shape.seconds(size), seconds)
        fixed = self._fit.intercept()
        if fixed is not None:
            self.fixed = fixed
        beyond = max(seconds - self.fixed, 1e-9)
        if self._level is not None:
            priced = self._level * self._relative(size)
            if self.correction.learn(self._knots(), size, beyond / max(priced, 1e-12)):
                self._bent = None
        self._learn(beyond, self._relative(size))

    def seconds(self, size: int) -> float:
        if self._shape is None or self._level is None:
            return self.fallback.seconds(size)
        return self.fixed + self._level * self._relative(size)

    def _knots(self) -> list[int]:
        assert self._shape is not None
        return sorted(self._shape.as_dict())

    def _relative(self, size: int) -> float:
        """The profiled shape at ``size``, bent by the correction (monotone)."""
        if self._bent is None:
            assert self._shape is not None
            self._bent = CostCurve(decay=0.0)
            for knot, relative in self._shape.as_dict().items():
                self._bent.observe(knot, relative * self.correction.factors.get(knot, 1.0))
        return self._bent.seconds(size)

    def as_dict(self) -> dict[str, Any]:
        bent = {k: round(v, 3) for k, v in sorted(self.correction.factors.items())}
        return {**super().as_dict(), "fixed_s": self.fixed, "correction": bent}


@dataclass
class StepCost(_ShapeAndLevel):
    """Seconds of one propose call: ``level × Σ_s shape(tokens_s)`` over its
    sequential steps, ``tokens_s`` the tokens fed at step ``s``.

    The shape (cost of feeding n tokens relative to one) comes from the
    drafter's profile; a drafter without one (lookup) costs the same per step
    whatever it feeds. The level is learned from every call, so the round
    trip to the draft replicas is in it. Calls to several replicas run side
    by side and are timed as one, against the whole batch's steps: the level
    then reads low by the same factor the batch's steps read high, and their
    product stays what a round costs.
    """

    def relative(self, steps: tuple[int, ...]) -> float:
        if self._shape is None:
            return float(len(steps))
        return sum(self._shape.seconds(tokens) for tokens in steps)

    def observe(self, steps: tuple[int, ...], seconds: float) -> None:
        if steps:
            self._learn(seconds, self.relative(steps))

    def seconds(self, steps: tuple[int, ...]) -> float:
        """0 until a call was timed or a profile set: an unmeasured drafter
        is assumed free, so it gets tried and measured."""
        if not steps or self._level is None:
            return 0.0
        return self._level * self.relative(steps)


@dataclass
class RoundCostModel:
    """Seconds of one round of a given :class:`RoundShape`, drafting with a
    model (``draft``) or by lookup (``lookup``: one call, whatever it copies).

    Without overlap drafting and verifying run one after the other; with two
    micro-batches the drafts of one run while the other verifies, so the
    slower one counts.
    """

    verify: ProfiledCurve = field(default_factory=ProfiledCurve)
    draft: StepCost = field(default_factory=StepCost)
    lookup: StepCost = field(default_factory=StepCost)
    overlap: bool = False

    def round_seconds(self, shape: RoundShape) -> float:
        return self._total(shape, self.draft)

    def lookup_round_seconds(self, shape: RoundShape) -> float:
        return self._total(shape, self.lookup)

    def _total(self, shape: RoundShape, drafter: StepCost) -> float:
        verify = self.verify.seconds(shape.verify_tokens)
        draft = drafter.seconds(shape.draft_steps)
        total = max(verify, draft) if self.overlap else verify + draft
        return max(total, 1e-9)  # the scheduler divides by it
