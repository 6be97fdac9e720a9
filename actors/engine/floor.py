"""The verify budget's floor: how far admitted drafts may slow the other
requests of a batch, judged over each request's decode so far
(:class:`Pace`). :func:`~specray.actors.engine.budget.budget_tokens` admits
no prefix a :class:`Floor` forbids; off by default
(:mod:`specray.actors.engine.verify_budget`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class Pace:
    """A request's decode so far as the verify cost prices it: the
    ``rounds`` it took part in, the ``tokens`` they committed, their
    ``seconds``, and ``plain_seconds``, what the same rounds would have
    taken with no ranked draft admitted. Its rate without speculation is a
    token per plain round, ``rounds / plain_seconds``; with it,
    ``tokens / seconds``."""

    rounds: int = 0
    tokens: float = 0.0
    seconds: float = 0.0
    plain_seconds: float = 0.0

    def advance(self, tokens: int, seconds: float, plain_seconds: float) -> None:
        """One more round: ``tokens`` in ``seconds`` (``plain_seconds`` without drafts)."""
        self.rounds += 1
        self.tokens += tokens
        self.seconds += seconds
        self.plain_seconds += plain_seconds

    def longest_round(self, expected: float, plain_seconds: float, rate: float) -> float:
        """The longest next round, expected to commit ``expected`` tokens
        (``plain_seconds`` without drafts), that keeps the request at
        ``rate`` or more of its rate without speculation, rounds so far
        included."""
        return (self.tokens + expected) * (self.plain_seconds + plain_seconds) / (
            rate * (self.rounds + 1)
        ) - self.seconds


@dataclass(frozen=True)
class Floor:
    """The least share ``rate`` of its rate without the ranked drafts that
    the budget leaves any request of the batch over its decode so far, in
    expected tokens per second: a prefix whose verification would slow some
    request below it is not admitted.

    Admitted tokens lengthen the round for every request in it, and those
    whose own drafts gain nothing pay for the others'. Throughput alone
    does not see them: on a compute-bound CPU at concurrency 16 the batch
    verified its sure copies, the requests it drafted for finished early,
    and the one with nothing to copy waited through every longer round and
    finished last, so sixteen requests took longer with speculation than
    without (docs/drafting.md, "The floor"). Over the decode so far
    (:class:`Pace`), not per round: a request its own copies put ahead can
    carry the others' for a while, and held to the floor in every round, a
    batch where one request had nothing to copy verified no drafts at all
    and paid for drafting anyway (a request alone in its batch pays only
    for its own drafts, and the budget sets it no floor).

    ``paces``: the ranked requests', in the order of their survivals;
    ``bystanders``: those of requests no ranked token speeds up
    (prefilling, drafting nothing, or verifying a chained model's draft
    whole), each expected to commit one token. ``sunk_seconds``: the
    round's seconds that the baseline's ``verify_seconds`` leaves out (a
    prefill's share), which every request of the round waits for too.
    """

    rate: float
    paces: Sequence[Pace] = ()
    bystanders: Sequence[Pace] = ()
    sunk_seconds: float = 0.0

    def limits(self, plain: float, requests: int) -> tuple[float, list[float]]:
        """The longest round the bystanders allow, and each of the
        ``requests`` ranked ones with nothing admitted, in the seconds the
        budget's verify cost counts (the sunk share left out); ``plain``:
        the whole round's seconds with no ranked draft admitted."""
        by = [p.longest_round(1.0, plain, self.rate) for p in self.bystanders]
        return min(by, default=float("inf")) - self.sunk_seconds, [
            self.ranked_limit(plain, q, 0.0) for q in range(requests)
        ]

    def ranked_limit(self, plain: float, q: int, gain: float) -> float:
        """The longest round ranked request ``q`` allows, gaining ``gain`` tokens."""
        pace = self.paces[q] if q < len(self.paces) else Pace()
        return pace.longest_round(1.0 + gain, plain, self.rate) - self.sunk_seconds
