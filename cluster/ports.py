"""The round's two ports over Ray: draft replicas (:class:`PoolDrafting`)
and tensor-parallel target groups (:class:`PoolVerifying`).

:func:`specray.actors.engine.round.speculative_round` is the same round the
in-process engine runs; these ports are where the router's version differs.
Each call crosses Ray, and each deals with its replica failing: the replica
is handed to :class:`~specray.cluster.recovery.Recovery` (which replaces it
and posts the loss to the lanes), and the requests of the failed call are
left out of, or go target-only for, this round.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from specray.actors.drafting.base import DraftProposal, DraftRequest, DraftUpdate
from specray.actors.engine.target import VerifyInput, VerifyOutput
from specray.cluster.draft_pool import DraftPool, DraftReplicaError
from specray.cluster.errors import TargetGroupError
from specray.cluster.recovery import Recovery
from specray.cluster.request_table import RequestTable
from specray.cluster.target_pool import TargetPool


@dataclass(eq=False)
class PoolDrafting:
    """Proposals from the draft pool's replicas, one fused update-and-propose
    call each."""

    pool: DraftPool
    recovery: Recovery
    hidden_layers: tuple[int, ...] = field(default=(), init=False)  # read from the first replica up

    async def propose(
        self, replica: int, asks: list[DraftRequest], updates: list[DraftUpdate]
    ) -> list[DraftProposal] | None:
        try:
            return await self.pool.propose(replica, asks, updates)
        except DraftReplicaError as err:
            # Dropped by the pool; replaced, and its requests moved at the
            # lanes' next boundary (a no-op if another lane saw it first).
            self.recovery.draft_failed(replica, err)
            return None


@dataclass(eq=False)
class PoolVerifying:
    """One verify call per target replica (a whole TP group), in a worker
    thread: a :class:`ShardedTarget` call blocks."""

    targets: TargetPool
    recovery: Recovery
    table: RequestTable
    max_replays: int

    @property
    def verifies_trees(self) -> bool:
        """Every target replica verifies token trees (no V4 target)."""
        return all(r.target.verifies_trees for r in self.targets.replicas.values())

    async def verify(
        self, replica: int | None, inputs: list[VerifyInput], hidden_layers: tuple[int, ...]
    ) -> list[VerifyOutput] | None:
        request_ids = [item.request_id for item in inputs]
        group = self.targets.replicas.get(replica) if replica is not None else None
        if group is None:  # broke while this round was drafting
            self._lost(replica, request_ids)
            return None
        try:
            return await asyncio.to_thread(group.target.verify, inputs, hidden_layers)
        except TargetGroupError as err:
            self.recovery.target_failed(group.replica_id, err)  # gang restart
            self._lost(replica, request_ids)
            for request_id in request_ids:  # replayed, unless it keeps breaking groups
                tracked = self.table.tracked.get(request_id)
                if tracked is None:
                    continue
                tracked.replays += 1
                if tracked.replays > self.max_replays:
                    self.table.fail(tracked, err)
            return None
        except Exception as err:  # every shard refused it alike: the requests' fault
            for request_id in request_ids:
                tracked = self.table.tracked.get(request_id)
                if tracked is not None:
                    self.table.fail(tracked, err)
            return None

    def _lost(self, replica: int | None, request_ids: list[str]) -> None:
        """Requests of a broken target replica re-prefill elsewhere; the ones
        in this round also restart their drafts, which drafted without a
        verdict."""
        unpin_target(self.table, replica)
        for request_id in request_ids:
            tracked = self.table.tracked.get(request_id)
            if tracked is not None:
                tracked.move_draft = True


def unpin_target(table: RequestTable, replica: int | None) -> None:
    """Every request pinned to target ``replica`` re-prefills wherever it lands next."""
    for tracked in table.tracked.values():
        if replica is not None and tracked.run.target == replica:
            tracked.run.target = None
            tracked.run.cached_len = 0
