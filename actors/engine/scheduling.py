"""The one γ policy: how many tokens each request drafts in a round, by
each way of drafting, from measured costs and per-request acceptance.

Used alike by the in-process engine and the router; it sees requests
(:class:`RunningRequest`), a :class:`RoundCostModel` and what the drafter
can do (``DraftPaths``), never a transport.
"""

from __future__ import annotations

from collections.abc import Sequence

from specray.actors.drafting.base import DraftPaths, DraftProposal, DraftStop, DraftUpdate
from specray.actors.engine.backlog import backlog_after, fed_steps
from specray.actors.engine.calibration import ConfidenceCalibration
from specray.actors.engine.costs import RoundCostModel
from specray.actors.engine.feeds import assign_feeds
from specray.actors.engine.gamma import (
    RoundShape,
    SurvivalEstimate,
    block_steps,
    expected_tokens,
    schedule_gammas,
)
from specray.actors.engine.lifecycle import gamma_limit
from specray.actors.engine.probe import ModelProbe
from specray.actors.engine.request import DraftState, RunningRequest
from specray.actors.engine.verify_budget import DEFAULT_FLOOR, BudgetSizing, VerifyBudget


def waits_for_first_token(run: RunningRequest) -> bool:
    """Whether a model drafter would make the request's first token wait for
    its catch-up: before that token, a drafter that reads the prompt has all
    of it to feed (on the critical path, in the round's proposal) before the
    target can verify anything, so the first token would wait for a prefill
    by the draft model. A model drafts from the second token on, the first
    coming from the target's prefill as without speculation; copies cost
    nothing and are drafted at once."""
    return not run.output_ids and run.draft.backlog > 1


class GammaScheduler:
    """γ per request and drafting path for every round, and what it learns
    from each: per-request acceptance, the pool's acceptance (the prior of
    new requests) and the measured costs.

    ``adaptive`` False drafts the ceiling every round; ``paths`` None means
    there is no drafter and every request decodes target-only.
    ``max_batched_tokens`` bounds the tokens one target replica feeds per
    round (vLLM's ``max_num_batched_tokens``): prompts prefill in chunks
    that ride alongside the requests that decode (see :meth:`assign_feeds`);
    None feeds every prompt whole. ``budget_sizing``: how the verify
    budget sizes a batch, and ``budget_floor`` the least share of its
    rate without speculation it leaves any request of one
    (:mod:`specray.actors.engine.verify_budget`).
    """

    def __init__(
        self,
        paths: DraftPaths | None,
        adaptive: bool = True,
        costs: RoundCostModel | None = None,
        max_batched_tokens: int | None = None,
        budget_sizing: BudgetSizing = "fresh",
        budget_floor: float = DEFAULT_FLOOR,
    ) -> None:
        if max_batched_tokens is not None and max_batched_tokens < 1:
            raise ValueError(f"max_batched_tokens must be >= 1, got {max_batched_tokens}")
        self.paths = paths
        self.adaptive = adaptive
        self.costs = costs or RoundCostModel()
        self.max_batched_tokens = max_batched_tokens
        # Per drafting path, the prior of new requests.
        self._pool = {"lookup": SurvivalEstimate(decay=0.98), "model": SurvivalEstimate(decay=0.98)}
        self.budget = VerifyBudget(self.costs, self.block, budget_sizing, budget_floor)
        self._probe = ModelProbe()
        # What a chained model's confidences are worth, for its stop rule.
        self.calibration = ConfidenceCalibration()

    def start_backlog(self, num_committed: int) -> int:
        """What a drafter taking a request over has to feed: every committed
        token, or for a drafter of the target's hidden states the one row
        the target ships next (:attr:`DraftPaths.reads_prompt`)."""
        if self.paths is not None and not self.paths.reads_prompt:
            return min(num_committed, 1)
        return num_committed

    @property
    def block(self) -> int:
        """Drafts one model step yields (1 without a model drafter)."""
        return 1 if self.paths is None else self.paths.block

    def new_draft_state(self) -> DraftState:
        """A new request's drafting state, its estimates starting at the pool's α."""
        return DraftState(
            lookup_acceptance=SurvivalEstimate.with_prior(self._pool["lookup"].alpha),
            model_acceptance=SurvivalEstimate.with_prior(self._pool["model"].alpha),
        )

    # -- before the round -------------------------------------------------------

    def choose(self, batch: Sequence[RunningRequest]) -> None:
        """Set what each request does this round, per target replica (each
        verifies its own batch): ``feed``, the uncached tokens it feeds
        (:meth:`assign_feeds`), ``draft.gamma`` (a model's drafts) from
        :func:`schedule_gammas` with the model's acceptance (optimistic:
        :attr:`SurvivalEstimate.optimistic`) and cost, and
        ``draft.lookup_gamma`` (copies) at the ceiling: copying costs nothing,
        and :meth:`trim` cuts the copies once their confidence is known. Not
        adaptive, or for a request with fixed speculation, both are the
        ceiling, and nothing is cut; 0 for requests no drafter holds and
        for prefill chunks, and a model's 0 until a request's first token
        (:func:`waits_for_first_token`).

        A model's drafts also pay for each request's backlog (:meth:`entry_seconds`).
        """
        groups: dict[int | None, list[RunningRequest]] = {}
        for run in batch:
            run.draft.gamma = run.draft.lookup_gamma = 0
            run.draft.stop = None
            groups.setdefault(run.target, []).append(run)
        for group in groups.values():
            self.assign_feeds(group)
        paths = self.paths
        if paths is None:
            return
        for group in groups.values():
            limits = [
                gamma_limit(r) if r.draft.replica is not None and not r.prefilling else 0
                for r in group
            ]
            model_limits = [
                0 if waits_for_first_token(r) else limit
                for r, limit in zip(group, limits, strict=True)
            ]
            if paths.lookup:  # copies cost nothing to propose: :meth:`trim` decides
                for run, gamma in zip(group, limits, strict=True):
                    run.draft.lookup_gamma = gamma
            if not paths.model:
                continue
            fixed = [not self.adaptive or r.fixed for r in group]
            whole = [m if f else 0 for m, f in zip(model_limits, fixed, strict=True)]
            budgeted = [0 if f else m for m, f in zip(model_limits, fixed, strict=True)]
            if any(budgeted):
                # Fixed requests' drafts are verified whatever the others draft.
                base = sum(r.feed_cost for r in group) + sum(whole)
                self._model_gammas(group, budgeted, base)
            for run, gamma in zip(group, whole, strict=True):
                if gamma:
                    run.draft.gamma = gamma

    def trim(
        self, batch: Sequence[RunningRequest], drafts: Sequence[DraftProposal]
    ) -> list[DraftProposal]:
        """The drafts worth verifying (:class:`VerifyBudget`): copies and
        blocks ranked jointly per target replica's batch; a chained model's
        drafts, each already paid for by a model step, stay whole."""
        return self.budget.trim(batch, drafts) if self.adaptive else list(drafts)

    def assign_feeds(self, group: Sequence[RunningRequest]) -> None:
        """Each request's ``feed`` this round, within the round budget
        (:func:`~specray.actors.engine.feeds.assign_feeds`)."""
        assign_feeds(group, self.max_batched_tokens)

    def _model_gammas(self, group: Sequence[RunningRequest], limits: list[int], base: int) -> None:
        alphas = [r.draft.model_acceptance.optimistic for r in group]
        gammas = self._probe.gammas(
            group,
            limits,
            lambda: self._schedule(group, alphas, limits, base),
            lambda: self._best_case(group, alphas, limits, base),
        )
        if self.block > 1:
            # A forward drafts a whole block: a request that drafts asks for
            # every draft of the steps it pays for, and :meth:`trim` ranks
            # every block's drafts jointly.
            for run, gamma, limit in zip(group, gammas, limits, strict=True):
                run.draft.gamma = min(limit, block_steps(gamma, self.block) * self.block)
            return
        for run, gamma in zip(group, gammas, strict=True):
            run.draft.gamma = gamma
        self._stops(group, alphas, gammas, limits, base)

    def _schedule(
        self,
        group: Sequence[RunningRequest],
        alphas: list[float],
        limits: list[int],
        base: int,
    ) -> list[int]:
        """:func:`schedule_gammas` at ``alphas``, each request charged its
        drafter's catch-up (:meth:`entry_seconds`)."""
        round_seconds = self.costs.round_seconds
        entries = [0.0] * len(group)
        if any(r.draft.backlog > 1 for r in group):
            # Would each draft in a plain decode round, were it in step?
            in_step = schedule_gammas(alphas, limits, round_seconds, block=self.block)
            entries = [
                self.entry_seconds(r, alpha, limit, gamma > 0)
                for r, alpha, limit, gamma in zip(group, alphas, limits, in_step, strict=True)
            ]
        return schedule_gammas(alphas, limits, round_seconds, base, entries, block=self.block)

    def _best_case(
        self, group: Sequence[RunningRequest], alphas: list[float], limits: list[int], base: int
    ) -> list[int]:
        """The schedule were every draft accepted and each catch-up spread
        over as many rounds as a request drafting at its believed
        acceptance or better could have left: where it drafts nothing, no
        acceptance above the believed one would draft either."""
        entries = [
            self.entry_seconds(r, alpha, limit, drafts_in_step=True) if r.draft.backlog > 1 else 0.0
            for r, alpha, limit in zip(group, alphas, limits, strict=True)
        ]
        ones = [1.0] * len(group)
        return schedule_gammas(ones, limits, self.costs.round_seconds, base, entries, self.block)

    def _stops(
        self,
        group: Sequence[RunningRequest],
        alphas: Sequence[float],
        gammas: Sequence[int],
        limits: Sequence[int],
        base: int,
    ) -> None:
        """Each request that drafts is asked for its ceiling with a stop
        rule (each draft paying for itself, :class:`DraftStop`): the round's
        seconds with each number of its drafts, the others drafting as
        scheduled, less the prefill share verified whatever is drafted."""
        sunk = self.budget.sunk_seconds(base, sum(not r.prefilling for r in group))
        calibration = self.calibration.map()
        backlogs = [r.draft.backlog for r in group]
        expected = [
            0.0 if r.prefilling else expected_tokens(alpha, gamma)
            for r, alpha, gamma in zip(group, alphas, gammas, strict=True)
        ]
        for q, run in enumerate(group):
            if gammas[q] == 0:
                continue
            shape_gammas = list(gammas)
            seconds, drafting = [], []
            for drafts in range(limits[q] + 1):
                shape_gammas[q] = drafts
                shape = RoundShape.of(base + sum(shape_gammas), shape_gammas, backlogs, self.block)
                seconds.append(max(self.costs.round_seconds(shape) - sunk, 1e-9))
                drafting.append(self.costs.draft.seconds(shape.draft_steps))
            run.draft.gamma = limits[q]
            run.draft.stop = DraftStop(
                tuple(seconds), sum(expected) - expected[q], tuple(drafting), calibration
            )

    def entry_seconds(
        self, run: RunningRequest, alpha: float, limit: int, drafts_in_step: bool
    ) -> float:
        """What a model drafter's catch-up costs the round in which a request
        drafts again: its first step feeds the request's backlog (the whole
        prompt for a new request) instead of one token.

        Paid once, it lets every later round draft in step. So when the
        request ``drafts_in_step`` (a plain decode round with it in step
        would draft it), the cost is spread over the rounds it has left,
        counted as if each drafted its limit (the fewest rounds, so the
        largest share). Otherwise later rounds would not draft it and the
        whole feed is this round's: a prefill round verifies so many tokens
        that a few drafts look free, and without this a loaded server fed
        every new prompt to the draft model for nothing (TTFT at c = 16 rose
        from 20 s to 33 s).

        It is paid on the critical path, inside that round's proposal: a
        catch-up sent ahead to run while the target verifies is free only
        where the draft has hardware of its own; on shared cores it slowed
        every target step it overlapped (docs/router.md).

        With a round budget, a drafter feeds at most that many tokens per
        call, so a long backlog is caught up over several rounds, drafting
        nothing until its last chunk. Each of those rounds is charged every
        chunk still to feed: charged only its own, a prompt of n chunks
        was weighed against a per-round gain at 1/n of its cost, and each
        chunk looked worth feeding when the whole catch-up was not.
        """
        costs = self.costs
        one = costs.draft.seconds((1,))
        chunks = self.catch_up_chunks(run.draft.backlog)
        extra = sum(costs.draft.seconds((chunk,)) - one for chunk in chunks)
        if extra <= 0.0 or limit <= 0:
            return 0.0
        if not drafts_in_step:
            return extra
        # The rounds that feed a chunk commit one token each and draft nothing.
        drafting_left = run.remaining_tokens - (len(chunks) - 1)
        rounds_left = drafting_left / expected_tokens(alpha, limit)
        return extra / max(rounds_left, 1.0)

    def catch_up_chunks(self, backlog: int) -> list[int]:
        """The feeds a drafter ``backlog`` committed tokens behind makes
        before it drafts again: chunks of at most the round budget, the
        last fed with its drafts."""
        cap = self.max_batched_tokens
        if cap is None or backlog <= cap:
            return [backlog]
        full, rest = divmod(backlog, cap)
        return [cap] * full + ([rest] if rest else [])

    def catch_up_feed(self, backlog: int) -> int:
        """What a drafter that is ``backlog`` committed tokens behind feeds
        in one call (``DraftRequest.max_feed``): its first chunk."""
        return self.catch_up_chunks(backlog)[0]

    def _catching_up(self, run: RunningRequest, draft: DraftProposal) -> bool:
        """The model was asked to draft but only fed a chunk of its backlog."""
        state = run.draft
        return (
            state.gamma > 0
            and not draft.from_lookup
            and not len(draft)
            and self.catch_up_feed(state.backlog) < state.backlog
        )

    # -- after the round ----------------------------------------------------------

    def observe_propose(
        self, batch: Sequence[RunningRequest], drafts: Sequence[DraftProposal], seconds: float
    ) -> None:
        """Learn the draft cost from one propose phase, timed as the model's
        call when a model drafted (a hybrid's copies in the same call cost
        next to nothing), else the copies'."""
        late = [self._catching_up(run, draft) for run, draft in zip(batch, drafts, strict=True)]
        model_steps = fed_steps(
            batch, drafts, late=late, cap=self.max_batched_tokens, block=self.block
        )
        if model_steps:
            self.costs.draft.observe(model_steps, seconds)
        else:
            self.costs.lookup.observe(fed_steps(batch, drafts, lookup=True), seconds)

    def observe_verify(self, num_tokens: int, seconds: float, logits: int | None = None) -> None:
        """A verify of ``num_tokens`` fed tokens, ``logits`` rows returned."""
        self.costs.verify.observe(num_tokens, seconds, logits)

    def record(self, run: RunningRequest, draft: DraftProposal, update: DraftUpdate) -> None:
        """One request's verdict: the acceptance of the path its proposal
        came by (a round without one lets both drift back toward their
        priors), what a chained model's confidences were worth, and how far
        its drafter now lags."""
        state = run.draft
        self.budget.settle(run, len(update.new_token_ids))
        if draft.confidence is not None and not draft.from_lookup and self.block == 1:
            self.calibration.observe(draft.confidence, update.num_accepted)
        if len(draft):
            self._pool["lookup" if draft.from_lookup else "model"].update(
                len(draft), update.num_accepted
            )
        self._judge_copy(run)
        if state.replica is None:
            return
        if len(draft):
            estimate = state.lookup_acceptance if draft.from_lookup else state.model_acceptance
            estimate.update(len(draft), update.num_accepted)
        else:
            state.lookup_acceptance.update(0, 0)
            state.model_acceptance.update(0, 0)
        state.updates.append(update)
        if self._catching_up(run, draft):
            state.backlog += len(update.new_token_ids) - self.catch_up_feed(state.backlog)
            return
        fed = 0 if draft.from_lookup else draft.model_steps
        state.backlog = backlog_after(state.backlog, fed, update)

    def _judge_copy(self, run: RunningRequest) -> None:
        """The per-depth acceptance of copies learns from the request's
        pending copy, a depth at a time as its committed tokens settle it
        (:class:`~specray.actors.engine.budget.Hindsight`); the budget's
        calibration from every proposed copy they settle."""
        self.budget.judge(run)
        hindsight = run.draft.hindsight
        if hindsight is None:
            return
        first = hindsight.judged + 1
        for depth, accepted in enumerate(hindsight.judge(run.tokens), first):
            self.budget.copies.record(run.draft.lookup_depths, hindsight.evidence, depth, accepted)
        if hindsight.settled:
            run.draft.hindsight = None
