"""The drafting half of a router round: γ for each request, catch-ups for
requests whose drafter fell behind, then one fused update-and-propose call
per draft replica, all replicas at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from specray.actors.drafting.base import DraftProposal, DraftRequest
from specray.actors.engine.engine import gamma_limit
from specray.actors.engine.gamma import RoundShape, schedule_gammas
from specray.actors.engine.round import DraftUpdate
from specray.cluster.costs import RoundCostModel
from specray.cluster.draft_pool import DraftPool, DraftReplicaError
from specray.cluster.tracked import Tracked

# A request whose drafter is more than this many committed tokens behind
# has missed rounds (in step, it is one or two behind: the bonus token and
# an accepted last draft).
IN_STEP = 2


def choose_gammas(
    batch: Sequence[Tracked],
    drafting: bool,
    adaptive: bool,
    costs: RoundCostModel,
    catches_up: bool = False,
) -> list[Tracked]:
    """Set each request's γ for this round: per target replica (each verifies
    its own batch), from :func:`schedule_gammas` when ``adaptive``, else the
    ceiling; 0 for requests without a draft replica or when not ``drafting``.

    When the drafter ``catches_up`` (keeps a cache, see :class:`CatchesUp`),
    adaptive schedules price each request's draft backlog (its first step
    feeds every committed token its drafter has not seen) and the requests
    to catch up off the critical path are returned: behind, so not drafting
    now, but drafting if they were in step, i.e. as soon as they are.
    """
    for tracked in batch:
        tracked.run.gamma = 0
    if not drafting:
        return []
    groups: dict[int | None, list[Tracked]] = {}
    for tracked in batch:
        groups.setdefault(tracked.target, []).append(tracked)
    behind: list[Tracked] = []
    for group in groups.values():
        limits = [max(gamma_limit(t.run), 0) if t.draft is not None else 0 for t in group]
        if not adaptive:
            for tracked, gamma in zip(group, limits, strict=True):
                tracked.run.gamma = gamma
            continue
        base = sum(len(t.run.tokens) - t.run.cached_len for t in group)
        alphas = [t.run.acceptance.alpha for t in group]
        backlogs = [t.draft_backlog for t in group] if catches_up else None
        gammas = schedule_gammas(alphas, limits, costs.round_seconds, base, backlogs)
        for tracked, gamma in zip(group, gammas, strict=True):
            tracked.run.gamma = gamma
        if backlogs is None:
            continue
        lagging = [q for q in range(len(group)) if gammas[q] == 0 and backlogs[q] > IN_STEP]
        if lagging:
            in_step = schedule_gammas(alphas, limits, costs.round_seconds)
            behind += [group[q] for q in lagging if in_step[q] > 0]
    return behind


def backlog_after(backlog: int, drafted: int, update: DraftUpdate) -> int:
    """Committed tokens a drafter has not fed after a round: drafting, it fed
    its backlog and its first ``drafted - 1`` drafts, and keeps the accepted
    ones; not drafting, it fell further behind."""
    committed = len(update.new_token_ids)
    if drafted == 0:
        return backlog + committed
    return committed - min(update.num_accepted, drafted - 1)


def draft_shape(
    batch: Sequence[Tracked], drafts: Sequence[DraftProposal] | None = None
) -> tuple[int, ...]:
    """The draft steps of this round's γs (see :class:`RoundShape`); given
    the ``drafts``, of the ones a model made (lookups feed nothing)."""
    gammas = [t.run.gamma for t in batch]
    if drafts is not None:
        gammas = [
            0 if d.from_lookup or not len(d) else g for g, d in zip(gammas, drafts, strict=True)
        ]
    return RoundShape.of(0, gammas, [t.draft_backlog for t in batch]).draft_steps


def catch_up(
    pool: DraftPool | None, behind: Sequence[Tracked], everyone: Iterable[Tracked]
) -> None:
    """Have each request's draft replica feed its backlog now, with the
    verdicts it has not heard yet (of every request pinned there, in order)."""
    if pool is None or not behind:
        return
    by_replica: dict[int, list[str]] = {}
    for tracked in behind:
        if tracked.draft is not None:
            by_replica.setdefault(tracked.draft, []).append(tracked.request_id)
            tracked.draft_backlog = 1
    updates: dict[int, list[DraftUpdate]] = {r: [] for r in by_replica}
    for tracked in everyone:
        if tracked.draft in updates and tracked.updates:
            updates[tracked.draft] += tracked.updates
            tracked.updates = []
    for replica_id, request_ids in by_replica.items():
        pool.catch_up(replica_id, request_ids, updates[replica_id])


@dataclass
class Proposals:
    """One round's drafts, in batch order (empty where none was asked or its
    replica failed)."""

    drafts: list[DraftProposal]
    failures: dict[int, DraftReplicaError] = field(default_factory=dict)  # by replica
    elapsed_s: float | None = None  # None: no replica was asked
    # a replica asked was still catching up: the time is not the drafts' alone
    waited_on_catch_up: bool = False


async def propose(pool: DraftPool | None, batch: Sequence[Tracked]) -> Proposals:
    """Ask every draft replica for its requests' proposals, sending along the
    verdicts of their previous rounds. A failed replica leaves its requests
    with empty proposals (target-only this round) and is reported, not raised."""
    proposals = Proposals([DraftProposal([]) for _ in batch])
    by_replica: dict[int, list[int]] = {}
    for i, tracked in enumerate(batch):
        if tracked.draft is not None and tracked.run.gamma > 0:
            by_replica.setdefault(tracked.draft, []).append(i)
    if pool is None or not by_replica:
        return proposals

    async def one(replica_id: int, idx: list[int]) -> list[DraftProposal]:
        asks = [DraftRequest(batch[i].request_id, batch[i].run.gamma) for i in idx]
        updates: list[DraftUpdate] = []
        for tracked in batch:
            if tracked.draft == replica_id:
                updates += tracked.updates
                tracked.updates = []
        return await pool.propose(replica_id, asks, updates)

    proposals.waited_on_catch_up = any(
        pool.replicas[r].catching_up for r in by_replica if r in pool.replicas
    )
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
