"""The drafting half of a router round: γ for each request and drafting path,
then one fused update-and-propose call per draft replica, all replicas at
once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from specray.actors.drafting.base import DraftProposal, DraftRequest
from specray.actors.engine.engine import gamma_limit
from specray.actors.engine.gamma import RoundShape, expected_tokens, schedule_gammas
from specray.actors.engine.round import DraftUpdate
from specray.cluster.costs import RoundCostModel
from specray.cluster.draft_pool import DraftPool, DraftReplicaError
from specray.cluster.tracked import Tracked


@dataclass(frozen=True)
class DraftPaths:
    """How a pool's drafter drafts: with a model (priced by the tokens it
    feeds, backlog included), by copying from the context (priced per call:
    next to nothing), or both, as the hybrid does."""

    model: bool
    lookup: bool


def choose_gammas(
    batch: Sequence[Tracked], paths: DraftPaths | None, adaptive: bool, costs: RoundCostModel
) -> None:
    """Set each request's γ for this round, per path: ``run.gamma`` for a
    model's drafts, ``lookup_gamma`` for copies. Per target replica (each
    verifies its own batch), from :func:`schedule_gammas` with the path's
    acceptance and cost when ``adaptive``, else the ceiling; 0 for requests
    without a draft replica or with no drafter (``paths`` None).

    A model's drafts also pay for each request's backlog (:func:`entry_seconds`).
    """
    for tracked in batch:
        tracked.run.gamma = tracked.lookup_gamma = 0
    if paths is None:
        return
    groups: dict[int | None, list[Tracked]] = {}
    for tracked in batch:
        groups.setdefault(tracked.target, []).append(tracked)
    for group in groups.values():
        limits = [max(gamma_limit(t.run), 0) if t.draft is not None else 0 for t in group]
        if not adaptive:
            for tracked, gamma in zip(group, limits, strict=True):
                tracked.run.gamma = gamma if paths.model else 0
                tracked.lookup_gamma = gamma if paths.lookup else 0
            continue
        base = sum(len(t.run.tokens) - t.run.cached_len for t in group)
        if paths.lookup:
            alphas = [t.lookup_acceptance.alpha for t in group]
            copies = schedule_gammas(alphas, limits, costs.lookup_round_seconds, base)
            for tracked, gamma in zip(group, copies, strict=True):
                tracked.lookup_gamma = gamma
        if paths.model:
            _model_gammas(group, limits, base, costs)


def _model_gammas(
    group: Sequence[Tracked], limits: Sequence[int], base: int, costs: RoundCostModel
) -> None:
    alphas = [t.model_acceptance.alpha for t in group]
    entries = [0.0] * len(group)
    if any(t.draft_backlog > 1 for t in group):
        # Would each draft in a plain decode round, were it in step?
        in_step = schedule_gammas(alphas, limits, costs.round_seconds)
        entries = [
            entry_seconds(t, alpha, limit, costs, gamma > 0)
            for t, alpha, limit, gamma in zip(group, alphas, limits, in_step, strict=True)
        ]
    gammas = schedule_gammas(alphas, limits, costs.round_seconds, base, entries)
    for tracked, gamma in zip(group, gammas, strict=True):
        tracked.run.gamma = gamma


def entry_seconds(
    tracked: Tracked, alpha: float, limit: int, costs: RoundCostModel, drafts_in_step: bool
) -> float:
    """What a model drafter's catch-up costs the round in which a request
    drafts again: its first step feeds the request's backlog (the whole
    prompt for a new request) instead of one token.

    Paid once, it lets every later round draft in step. So when the request
    ``drafts_in_step`` (a plain decode round with it in step would draft
    it), the cost is spread over the rounds it has left, counted as if each
    drafted its limit (the fewest rounds, so the largest share). Otherwise
    later rounds would not draft it and the whole feed is this round's: a
    prefill round verifies so many tokens that a few drafts look free, and
    without this a loaded server fed every new prompt to the draft model
    for nothing (TTFT at c = 16 rose from 20 s to 33 s).

    It is paid on the critical path, inside that round's proposal: a
    catch-up sent ahead to run while the target verifies is free only where
    the draft has hardware of its own; on shared cores it slowed every
    target step it overlapped (docs/router.md).
    """
    extra = costs.draft.seconds((tracked.draft_backlog,)) - costs.draft.seconds((1,))
    if extra <= 0.0 or limit <= 0:
        return 0.0
    if not drafts_in_step:
        return extra
    rounds_left = tracked.run.remaining_tokens / expected_tokens(alpha, limit)
    return extra / max(rounds_left, 1.0)


def record_verdict(tracked: Tracked, draft: DraftProposal, num_accepted: int) -> None:
    """Update the acceptance estimate of the path the proposal came by; a
    round without one lets both drift back toward their priors."""
    if len(draft):
        path = tracked.lookup_acceptance if draft.from_lookup else tracked.model_acceptance
        path.update(len(draft), num_accepted)
    else:
        tracked.lookup_acceptance.update(0, 0)
        tracked.model_acceptance.update(0, 0)


def backlog_after(backlog: int, drafted: int, update: DraftUpdate) -> int:
    """Committed tokens a drafter has not fed after a round: drafting, it fed
    its backlog and its first ``drafted - 1`` drafts, and keeps the accepted
    ones; not drafting, it fell further behind."""
    committed = len(update.new_token_ids)
    if drafted == 0:
        return backlog + committed
    return committed - min(update.num_accepted, drafted - 1)


def fed_steps(
    batch: Sequence[Tracked], drafts: Sequence[DraftProposal], lookup: bool = False
) -> tuple[int, ...]:
    """The steps the drafts of one path took: a model's (each fed its
    backlog first), or with ``lookup`` the copies'."""
    lengths = [len(d) if d.from_lookup == lookup else 0 for d in drafts]
    backlogs = [1 if lookup else t.draft_backlog for t in batch]
    return RoundShape.of(0, lengths, backlogs).draft_steps


@dataclass
class Proposals:
    """One round's drafts, in batch order (empty where none was asked or its
    replica failed)."""

    drafts: list[DraftProposal]
    failures: dict[int, DraftReplicaError] = field(default_factory=dict)  # by replica
    elapsed_s: float | None = None  # None: no replica was asked


async def propose(pool: DraftPool | None, batch: Sequence[Tracked]) -> Proposals:
    """Ask every draft replica for its requests' proposals, sending along the
    verdicts of their previous rounds. A failed replica leaves its requests
    with empty proposals (target-only this round) and is reported, not raised."""
    proposals = Proposals([DraftProposal([]) for _ in batch])
    by_replica: dict[int, list[int]] = {}
    for i, tracked in enumerate(batch):
        if tracked.draft is not None and max(tracked.run.gamma, tracked.lookup_gamma) > 0:
            by_replica.setdefault(tracked.draft, []).append(i)
    if pool is None or not by_replica:
        return proposals

    async def one(replica_id: int, idx: list[int]) -> list[DraftProposal]:
        asks = [
            DraftRequest(batch[i].request_id, batch[i].run.gamma, batch[i].lookup_gamma)
            for i in idx
        ]
        updates: list[DraftUpdate] = []
        for tracked in batch:
            if tracked.draft == replica_id:
                updates += tracked.updates
                tracked.updates = []
        return await pool.propose(replica_id, asks, updates)

    began = time.perf_counter()
    results = await asyncio.gather(
        *(one(r, idx) for r, idx in by_replica.items()), return_exceptions=True
    )
    proposals.elapsed_s = time.perf_counter() - began
    for (replica_id, idx), result in zip(by_replica.items(), results, strict=True):
        if isinstance(result, DraftReplicaError):
            proposals.failures[replica_id] = result
        elif isinstance(result, BaseException):
            raise result
        else:
            for i, proposal in zip(idx, result, strict=True):
                proposals.drafts[i] = proposal
    return proposals
