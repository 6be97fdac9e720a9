"""Which drafted tokens a round verifies: DSpark's Algorithm 1 across each
target replica's batch.

Two kinds of proposal are ranked jointly, every (request, position) in
descending survival (:func:`~specray.actors.engine.budget.budget_tokens`):
copies from a lookup drafter, which cost nothing to propose, and the blocks
of a block drafter (DSpark), whose one forward paid for the whole block.
Either way only verification is left to pay for, so the batch admits the
tokens most likely to survive until one more no longer raises expected
tokens per second under the measured verify cost. A chained model's drafts
are not ranked here: each cost a model step, so they are cut while drafting
(:class:`~specray.actors.drafting.base.DraftStop`) and stay whole.

Survival of a block draft is the product of its confidences along the block
(DSpark's calibrated ``c_k``, or the draft probabilities where the drafter
has no confidence head); of a copy, the per-depth acceptance measured in
hindsight times its confidence (:func:`~specray.actors.engine.budget.survivals`),
mapped to what such estimates turned out to mean
(:class:`~specray.actors.engine.calibration.SurvivalCalibration`, taught by
every proposed copy as the request commits tokens) and scaled by how the
request's own copies kept that promise
(:class:`~specray.actors.engine.calibration.OwnRecord`).

Sizing. ``fresh`` sizes and ranks with this round's survivals. ``stale``
sizes the batch from each request's survivals one round old and ranks the
fresh ones into it (DSpark §5.2: the verify shape is then known before the
drafts come back, which a GPU target uses to launch a captured graph of that
size). A request's first ranked round has no older survivals and sizes with
its fresh ones.

Call. Where only copies are drafted, the call that fetched them is part
of what a drafted round costs (:meth:`VerifyBudget.call_seconds`): a
batch verifies copies only when they win back the call as well as their
rows. Through the router on an AVX2-only machine the call to an n-gram
draft replica took 7.5-15.2 ms a round around a lookup of 0.2-1.5 ms
(docs/router.md, "Where a served round's time goes"), and copies the verify
cost priced as an even trade made rounds slower than rounds without them.

Floor. Admitted tokens lengthen the round for every request of the batch,
so the budget admits no prefix that would leave a request (one with nothing
ranked, or a prefill) below ``floor`` of its rate without them, over its
decode so far as the verify cost prices each round
(:class:`~specray.actors.engine.floor.Floor`, :class:`~specray.actors.engine.floor.Pace`);
a request alone in its batch has no floor, and 0 turns it off.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import Any, Literal, get_args

from specray.actors.drafting.base import DraftProposal
from specray.actors.engine.budget import (
    Baseline,
    CopyDepths,
    Hindsight,
    ProposedCopy,
    budget_size,
    budget_tokens,
    survivals,
)
from specray.actors.engine.calibration import SurvivalCalibration
from specray.actors.engine.costs import RoundCostModel
from specray.actors.engine.floor import Floor
from specray.actors.engine.gamma import expected_tokens
from specray.actors.engine.request import RunningRequest

BudgetSizing = Literal["fresh", "stale"]
SIZINGS: tuple[str, ...] = get_args(BudgetSizing)
# Off by default. At 0.95 on the AVX2-only CPU through the server (n-gram,
# code edits and agentic sessions) concurrency 16 read 0.87-1.12x
# target-only and concurrency 4 0.92-1.01x (1.04-1.05x without): the rounds
# it let through were dearer than the verify cost priced them, and where it
# cut the drafts the speculative path's own cost remained
# (docs/drafting.md, "The floor").
DEFAULT_FLOOR = 0.0


class VerifyBudget:
    """Trims a round's proposals to what is worth verifying."""

    def __init__(
        self,
        costs: RoundCostModel,
        block: int = 1,
        sizing: BudgetSizing = "fresh",
        floor: float = DEFAULT_FLOOR,
    ) -> None:
        """``block``: drafts one model step yields."""
        if sizing not in SIZINGS:
            raise ValueError(f"budget sizing must be one of {', '.join(SIZINGS)}, got {sizing!r}")
        if not 0.0 <= floor <= 1.0:
            raise ValueError(f"budget floor must be in [0, 1] (0: off), got {floor}")
        self.costs = costs
        self.block = block
        self.sizing = sizing
        self.floor = floor
        self.copies = CopyDepths()  # how copies fared, judged in hindsight
        self.calibration = SurvivalCalibration()  # what the copies' survivals meant

    def describe(self) -> dict[str, Any]:
        """The copy estimates shared across requests, for a look from
        outside: per kind of evidence the pooled acceptance at some depths
        given the parent's (``overall``: every kind's), and what the survival
        calibration maps some estimates to. A request starts from these."""
        depths = (1, 2, 4, 8, 16)
        pool = {"overall": self.copies.overall, **self.copies.pool}
        return {
            "depths": list(depths),
            "pool": {kind: [est.conditional(d) for d in depths] for kind, est in pool.items()},
            "calibration": {str(x): self.calibration(x) for x in (0.1, 0.3, 0.5, 0.7, 0.9)},
        }

    def ranks(self, draft: DraftProposal) -> bool:
        """Whether ``draft`` is cut by the joint ranking (a copy or a block)."""
        return len(draft) > 0 and (draft.from_lookup or self.block > 1)

    def trim(
        self, batch: Sequence[RunningRequest], drafts: Sequence[DraftProposal]
    ) -> list[DraftProposal]:
        """``drafts`` cut per target replica's batch; chained drafts, and
        those of requests with fixed speculation, stay whole."""
        kept = list(drafts)
        copies = [self._await_verdict(run, draft) for run, draft in zip(batch, drafts, strict=True)]
        groups: dict[int | None, list[int]] = {}
        for i, run in enumerate(batch):
            if run.feed > 0:
                groups.setdefault(run.target, []).append(i)
        for idx in groups.values():
            ranked = [i for i in idx if self.ranks(drafts[i]) and not batch[i].fixed]
            decoding = sum(not batch[i].prefilling for i in idx)
            feeds = sum(batch[i].feed_cost for i in idx)
            verified = feeds + sum(len(drafts[i]) for i in idx if i not in ranked)
            sunk = self.sunk_seconds(feeds, decoding)
            plain = self.costs.verify.seconds(verified)  # the whole round, sunk share included
            if not ranked:
                self._price(batch, idx, plain, plain)
                continue
            expected = float(decoding) + sum(
                self.expected_whole(batch[i], drafts[i], copies[i])
                for i in idx
                if i not in ranked and len(drafts[i])
            )
            # A prefill's tokens are verified whatever is drafted (see schedule_gammas).
            base = Baseline(
                verified,
                expected,
                self.verify_beyond(feeds, decoding),
                self.call_seconds([batch[i] for i in idx]),
            )
            floor = None
            if self.floor > 0 and len(idx) > 1:  # alone, it pays only for its own drafts
                floor = Floor(
                    self.floor,
                    [batch[i].draft.pace for i in ranked],
                    [batch[i].draft.pace for i in idx if i not in ranked],
                    sunk,
                )
            fresh = [self.survivals(batch[i], drafts[i], copies[i]) for i in ranked]
            size = None
            if self.sizing == "stale":
                older = [
                    batch[i].draft.last_survivals or now
                    for i, now in zip(ranked, fresh, strict=True)
                ]
                size = budget_size(older, base, floor)
            counts = budget_tokens(fresh, base, size, floor)
            for i, now, count in zip(ranked, fresh, counts, strict=True):
                kept[i] = drafts[i].clipped(count)
                batch[i].draft.last_survivals = now
            admitted = sum(counts)
            call = base.call_seconds if admitted else 0.0
            self._price(batch, idx, base.verify_seconds(verified + admitted) + sunk + call, plain)
        return kept

    @staticmethod
    def _price(
        batch: Sequence[RunningRequest], idx: Sequence[int], seconds: float, plain: float
    ) -> None:
        """Each request of a target replica's batch waits ``seconds`` this
        round, ``plain`` without the ranked drafts: what its pace adds once
        its tokens are committed (:meth:`settle`)."""
        for i in idx:
            batch[i].draft.round_seconds = (seconds, plain)

    @staticmethod
    def settle(run: RunningRequest, tokens: int) -> None:
        """The round's ``tokens`` committed: the request's pace moves on."""
        if run.draft.round_seconds is not None:
            run.draft.pace.advance(tokens, *run.draft.round_seconds)
            run.draft.round_seconds = None

    def expected_whole(
        self, run: RunningRequest, draft: DraftProposal, copy: ProposedCopy | None
    ) -> float:
        """Tokens ``draft``, verified whole, is expected to add: a chained
        model's (at its measured acceptance) and a fixed request's copy."""
        if copy is not None:
            return sum(self.survivals(run, draft, copy))
        return expected_tokens(run.draft.model_acceptance.alpha, len(draft)) - 1.0

    def survivals(
        self, run: RunningRequest, draft: DraftProposal, copy: ProposedCopy | None
    ) -> list[float]:
        """Per token of ``draft``, the estimate that it and its ancestors are
        accepted; ``copy``: the draft as a proposed copy, whose estimates
        are calibrated (None for a model's draft)."""
        if copy is not None:
            return [run.draft.own(self.calibration(s)) for s in copy.estimates]
        if draft.confidence is None:
            alpha = run.draft.model_acceptance.alpha
            return [alpha ** (k + 1) for k in range(len(draft))]
        clamped = [min(max(c, 0.0), 1.0) for c in draft.confidence]
        return list(accumulate(clamped, lambda survival, c: survival * c))

    def copy_estimates(self, run: RunningRequest, draft: DraftProposal) -> list[float]:
        """Per token of a copy, survival as the per-depth acceptance and the
        drafter's confidence estimate it, before calibration."""
        hindsight = run.draft.hindsight
        offset, evidence = 0, draft.evidence
        if hindsight is not None:
            offset = hindsight.continued(run.tokens, draft.main_chain().token_ids)
            # A copy carried on is priced by what its first proposal rested on.
            evidence = hindsight.evidence if offset else evidence
        return survivals(draft, self.copies.of(run.draft.lookup_depths, evidence), offset)

    def call_seconds(self, group: Sequence[RunningRequest]) -> float:
        """What asking the lookup drafter for copies costs a round (the
        measured call: through the router, a Ray round trip to the draft
        replica of 6-9 ms against a 0.2 ms lookup on an AVX2-only machine);
        nothing where a model drafts in the same call anyway."""
        if any(run.draft.gamma for run in group):
            return 0.0
        return self.costs.lookup.seconds((1,))

    def verify_beyond(self, feeds: int, decoding: int) -> Callable[[int], float]:
        """Verify seconds of a batch, less a prefill's share."""
        verify = self.costs.verify.seconds
        sunk = self.sunk_seconds(feeds, decoding)
        return lambda tokens: verify(tokens) - sunk

    def sunk_seconds(self, feeds: int, decoding: int) -> float:
        """The verify seconds of a batch's prefill tokens beyond one token
        per decoding request: verified whatever is drafted."""
        verify = self.costs.verify.seconds
        return max(verify(feeds) - verify(decoding), 0.0) if feeds > decoding else 0.0

    def _await_verdict(self, run: RunningRequest, draft: DraftProposal) -> ProposedCopy | None:
        """A copy is judged in hindsight as the request commits tokens: a
        new one depth by depth, and every one for calibration. The copy
        with its estimates, which price it this round; None for a model's
        draft or an empty one."""
        if not draft.from_lookup or not len(draft):
            return None
        if run.draft.hindsight is None:
            chain = draft.main_chain().token_ids
            run.draft.hindsight = Hindsight(len(run.tokens), list(chain), draft.evidence)
        estimates = self.copy_estimates(run, draft)
        copy = ProposedCopy(
            len(run.tokens), list(draft.token_ids), list(draft.node_parents), estimates
        )
        run.draft.proposed.append(copy)
        return copy

    def judge(self, run: RunningRequest) -> None:
        """Calibrates with the request's proposed copies its committed tokens now settle."""
        waiting = []
        for copy in run.draft.proposed:
            verdicts = copy.verdicts(run.tokens)
            if verdicts is None:
                waiting.append(copy)
            else:
                promised = [self.calibration(e) for e in copy.estimates]
                run.draft.own.observe(promised, verdicts)
                self.calibration.observe(copy.estimates, verdicts)
        run.draft.proposed = waiting
