"""When a draft model the schedule has stopped using is tried again, and
when the schedule need not even be worked out.

The model path's acceptance is learnt only from its drafts, and starts
from a prior (2/3): a draft model that pays only above that (a slow
drafter that is almost always right) would never be tried, and its
estimate never corrected. So when the schedule has drafted nothing with
the model for long enough while some request could, one round drafts the
ceiling for the request least behind (the cheapest catch-up): at the first
chance, then after :data:`FIRST_REPROBE_ROUNDS` such rounds, the wait
doubling each time (a probe spent on a warm-up's random prompt is retried;
a drafter that never pays costs a vanishing share of rounds).

A probe only asks whether the acceptance is higher than believed. While
even a drafter that is always right would not pay for its verify and
catch-up (a loaded batch on compute-bound verification), a probe could not
change the schedule and would only cost a catch-up and a verify; nor can
any acceptance make drafting pay, so the schedule itself is not worked out
(with a few requests far behind it walks its candidates once per catch-up
cost, every round). That verdict holds while the batch and its limits stay
the same (its requests, their limits, what each feeds), for at most
:data:`PROBE_RECHECK_ROUNDS` rounds (the costs move).

Every choice depends on past rounds only, never on the drafts: lossless.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from specray.actors.engine.request import RunningRequest

# Rounds without a model draft before the model path is tried a second time
# (the wait doubles after each try).
FIRST_REPROBE_ROUNDS = 256

# Rounds a verdict on whether an always-right drafter would pay is kept.
PROBE_RECHECK_ROUNDS = 32


@dataclass
class _Verdict:
    """Whether an always-right drafter would pay for one replica's batch."""

    batch: tuple[tuple[str, ...], tuple[int, ...], tuple[int, ...]]  # ids, limits, feeds
    pays: bool
    rounds_left: int


class ModelProbe:
    """γ for the model path from a schedule, with probes, per target replica's batch."""

    def __init__(self) -> None:
        self._rounds_since_probe = 0
        self._probe_interval = 0  # the first chance; then FIRST_REPROBE_ROUNDS, doubling
        self._verdicts: dict[int | None, _Verdict] = {}

    def gammas(
        self,
        group: Sequence[RunningRequest],
        limits: list[int],
        schedule: Callable[[], list[int]],
        best_case: Callable[[], list[int]],
    ) -> list[int]:
        """``schedule()`` for ``group`` (one target replica's batch,
        ``limits`` their γ ceilings), or a probe, or all 0 without working
        the schedule out where no acceptance could make drafting pay:
        ``best_case()`` is the schedule were the drafts always accepted."""
        none = [0] * len(group)
        if not any(limits):
            return none
        replica = group[0].target
        batch = (
            tuple(r.request_id for r in group),
            tuple(limits),
            tuple(r.feed for r in group),
        )
        verdict = self._verdicts.get(replica)
        if verdict is not None and (verdict.batch != batch or verdict.rounds_left <= 0):
            verdict = None  # another batch, or kept long enough
        if verdict is not None:
            verdict.rounds_left -= 1
            if not verdict.pays:
                self._rounds_since_probe += 1
                return none
        gammas = schedule()
        if any(gammas):
            self._rounds_since_probe = 0
            self._verdicts.pop(replica, None)
            return gammas
        if verdict is None:
            verdict = _Verdict(batch, any(best_case()), PROBE_RECHECK_ROUNDS - 1)
            self._verdicts[replica] = verdict
        self._rounds_since_probe += 1
        if not verdict.pays or self._rounds_since_probe <= self._probe_interval:
            return gammas
        self._rounds_since_probe = 0
        self._probe_interval = max(2 * self._probe_interval, FIRST_REPROBE_ROUNDS)
        able = [i for i, limit in enumerate(limits) if limit > 0]
        chosen = min(able, key=lambda i: group[i].draft.backlog)
        return [limits[i] if i == chosen else 0 for i in range(len(group))]
