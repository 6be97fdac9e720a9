"""Learning what a chained drafter's confidences are worth from its verdicts
(:class:`~specray.actors.drafting.confidence_map.ConfidenceMap`)."""

from __future__ import annotations

from collections.abc import Sequence

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
        bins = len(self.tested)
        # Pools of adjacent bins: [weight, weighted acceptance, bins pooled].
        pools: list[list[float]] = []
        for b, (tested, accepted) in enumerate(zip(self.tested, self.accepted, strict=True)):
            weight = tested + self.prior
            pools.append([weight, accepted + self.prior * (b + 0.5) / bins, 1.0])
            while len(pools) > 1 and pools[-2][1] / pools[-2][0] > pools[-1][1] / pools[-1][0]:
                weight, value, count = pools.pop()
                pools[-1] = [pools[-1][0] + weight, pools[-1][1] + value, pools[-1][2] + count]
        values: list[float] = []
        for weight, value, count in pools:
            values.extend([value / weight] * int(count))
        return ConfidenceMap(tuple(values))
