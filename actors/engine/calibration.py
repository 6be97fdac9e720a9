"""Learning what estimates are worth from their verdicts: a chained
drafter's confidences
(:class:`~specray.actors.drafting.confidence_map.ConfidenceMap`) and the
verify budget's survivals of copies."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from specray.actors.drafting.confidence_map import ConfidenceMap, bin_of


class ConfidenceCalibration:
    """Per bin of raw confidence, the drafts tested and how many were accepted.

    A round tests its drafts in order up to the first rejection: the
    accepted ones and the one rejected are tested, those after it say
    nothing (as :class:`~specray.actors.engine.gamma.SurvivalEstimate`
    counts). Each bin starts with ``prior`` pseudo-drafts at its own centre,
    so a bin without evidence maps as the identity and one with little moves
    little. Pooling adjacent violators keeps the map monotone: a more
    confident draft is never priced below a less confident one.

    Only kept drafts are tested, so a bin the stop rule always cuts would
    stay at its prior; a request's first draft is always kept
    (:meth:`DraftStop.keeps`), which gives every bin evidence.

    The counts decay by ``decay`` per tested draft, so the map follows the
    text being served: what a draft model's confidence is worth depends on
    the text. A stretch a draft model cannot follow (a bench client's
    warm-up of random tokens) would otherwise price every later draft.
    """

    def __init__(self, bins: int = 20, prior: float = 2.0, decay: float = 0.995) -> None:
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        if prior <= 0:
            raise ValueError(f"prior must be > 0, got {prior}")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.prior = prior
        self.decay = decay
        self.tested = [0.0] * bins
        self.accepted = [0.0] * bins

    def observe(self, confidences: Sequence[float], num_accepted: int) -> None:
        """One verified chain: the raw ``confidences`` of its drafts in order
        and how many of them the target accepted."""
        tested = confidences[: num_accepted + 1]
        fade = self.decay ** len(tested)
        self.tested = [count * fade for count in self.tested]
        self.accepted = [count * fade for count in self.accepted]
        for depth, confidence in enumerate(tested):
            b = bin_of(confidence, len(self.tested))
            self.tested[b] += 1.0
            self.accepted[b] += float(depth < num_accepted)

    def map(self) -> ConfidenceMap | None:
        """The monotone map of the evidence so far; None before any draft was tested."""
        if not any(self.tested):
            return None
        return ConfidenceMap(monotone_rates(self.tested, self.accepted, self.prior))


class SurvivalCalibration:
    """What the verify budget's estimated survival of a copied token has
    turned out to mean: per bin of the estimate, the tokens proposed and
    how many survived (the token and its ancestors matched what the request
    went on to commit), mapped monotonically as
    :class:`ConfidenceCalibration` maps confidences.

    The estimate multiplies per-depth rates learned from one tracked copy at
    a time with the drafter's own confidence, and it was far off: on an
    AVX2-only machine (1.5B, held-out verbatim edits, in process) suffix
    copies estimated at 0.30-0.35 survived 0.72 of the time, n-gram copies
    at 0.85-0.90 only 0.75 (docs/drafting.md, "Calibrated survivals"), and
    under that steep verify curve the budget cut copies that would have paid.
    Every proposed copy is judged in hindsight, verified or not
    (:class:`~specray.actors.engine.budget.ProposedCopy`), so what the
    budget cuts still teaches the map. The counts decay by
    ``decay`` per judged token, so the map follows the text being served.
    """

    def __init__(self, bins: int = 20, prior: float = 2.0, decay: float = 0.998) -> None:
        if bins < 1 or prior <= 0 or not 0.0 < decay <= 1.0:
            raise ValueError(f"bad survival calibration: {bins=} {prior=} {decay=}")
        self.prior = prior
        self.decay = decay
        self.tested = [0.0] * bins
        self.survived = [0.0] * bins
        self._rates: tuple[float, ...] | None = None
        # Per bin, undecayed: tokens judged, their estimates' sum, survivors (:meth:`report`).
        self._totals = [[0, 0.0, 0] for _ in range(bins)]

    def observe(self, estimates: Sequence[float], survived: Sequence[bool]) -> None:
        """One judged copy: each token's estimated survival and whether it survived."""
        fade = self.decay ** len(estimates)
        self.tested = [count * fade for count in self.tested]
        self.survived = [count * fade for count in self.survived]
        for estimate, right in zip(estimates, survived, strict=True):
            b = bin_of(estimate, len(self.tested))
            self.tested[b] += 1.0
            self.survived[b] += float(right)
            total = self._totals[b]
            total[0] += 1
            total[1] += estimate
            total[2] += int(right)
        self._rates = None

    def report(self) -> list[dict[str, float]]:
        """Per bin with evidence, over every token ever judged: the bin's
        edges, tokens judged, their mean estimate, the share that
        survived, and what the map now gives the bin."""
        width = 1.0 / len(self._totals)
        return [
            {
                "low": b * width,
                "high": (b + 1) * width,
                "judged": judged,
                "estimate": estimates / judged,
                "survived": survived / judged,
                "calibrated": self((b + 0.5) * width),
            }
            for b, (judged, estimates, survived) in enumerate(self._totals)
            if judged
        ]

    def __call__(self, estimate: float) -> float:
        """The survival an ``estimate`` has meant; the estimate itself where
        there is no evidence."""
        if self._rates is None:
            self._rates = monotone_rates(self.tested, self.survived, self.prior)
        return self._rates[bin_of(estimate, len(self._rates))]


@dataclass
class OwnRecord:
    """How one request's copies fared against the survival the shared
    calibration promised them: a ratio that scales its copies' survivals.

    The calibration pools every request, and requests differ. Through the
    server at concurrency 4 (1.5B, n-gram, an AVX2-only machine, the budget's
    predictions logged round by round in one instrumented run), the rounds
    where two or three requests were left, the ones whose copies kept
    failing, verified tokens that survived well below what they were
    promised, while the full batch's survived above it: the small batches
    paid for tokens that did not come. Scaled by each request's own record,
    promise and survival agreed in every batch size
    (``bench/results/serve/qwen1.5b_gguf_ngram_sameserver_own_adaptive_1_avx2.md``
    is the served result). The counts decay by ``decay`` per judged copy, and
    ``prior`` tokens that kept their promise start it at 1.
    """

    prior: float = 4.0
    decay: float = 0.97
    promised: float = 0.0
    survived: float = 0.0

    def observe(self, promised: Sequence[float], survived: Sequence[bool]) -> None:
        """One judged copy: per token, its calibrated survival and the verdict."""
        self.promised = self.promised * self.decay + sum(promised)
        self.survived = self.survived * self.decay + sum(survived)

    @property
    def ratio(self) -> float:
        return (self.survived + self.prior) / (self.promised + self.prior)

    def __call__(self, survival: float) -> float:
        return min(1.0, survival * self.ratio)


def monotone_rates(
    tested: Sequence[float], passed: Sequence[float], prior: float
) -> tuple[float, ...]:
    """Per equal-width bin of [0, 1], the share of its tests that passed,
    each bin starting from ``prior`` pseudo-tests at its own centre (a bin
    without evidence maps as the identity, one with little moves little);
    pooling adjacent violators keeps the rates non-decreasing, so a higher
    estimate is never priced below a lower one."""
    bins = len(tested)
    # Pools of adjacent bins: [weight, weighted passes, bins pooled].
    pools: list[list[float]] = []
    for b, (count, passes) in enumerate(zip(tested, passed, strict=True)):
        pools.append([count + prior, passes + prior * (b + 0.5) / bins, 1.0])
        while len(pools) > 1 and pools[-2][1] / pools[-2][0] > pools[-1][1] / pools[-1][0]:
            weight, value, pooled = pools.pop()
            pools[-1] = [pools[-1][0] + weight, pools[-1][1] + value, pools[-1][2] + pooled]
    rates: list[float] = []
    for weight, value, pooled in pools:
        rates.extend([value / weight] * int(pooled))
    return tuple(rates)
