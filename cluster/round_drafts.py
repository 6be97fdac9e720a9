"""The drafting half of a router round: γ for each request, then one fused
update-and-propose call per draft replica, all replicas at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from specray.actors.drafting.base import DraftProposal, DraftRequest
from specray.actors.engine.engine import gamma_limit
from specray.actors.engine.gamma import schedule_gammas
from specray.actors.engine.round import DraftUpdate
from specray.cluster.costs import RoundCostModel
from specray.cluster.draft_pool import DraftPool, DraftReplicaError
from specray.cluster.tracked import Tracked


def choose_gammas(
    batch: Sequence[Tracked], drafting: bool, adaptive: bool, costs: RoundCostModel
) -> None:
    """Set each request's γ for this round: per target replica (each verifies
    its own batch), from :func:`schedule_gammas` when ``adaptive``, else the
    ceiling; 0 for requests without a draft replica or when not ``drafting``."""
    for tracked in batch:
        tracked.run.gamma = 0
    if not drafting:
        return
    groups: dict[int | None, list[Tracked]] = {}
    for tracked in batch:
        groups.setdefault(tracked.target, []).append(tracked)
    for group in groups.values():
        limits = [max(gamma_limit(t.run), 0) if t.draft is not None else 0 for t in group]
        if adaptive:
            base = sum(len(t.run.tokens) - t.run.cached_len for t in group)
            alphas = [t.run.acceptance.alpha for t in group]
            gammas = schedule_gammas(alphas, limits, costs.round_seconds, base)
        else:
            gammas = limits
        for tracked, gamma in zip(group, gammas, strict=True):
            tracked.run.gamma = gamma


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
