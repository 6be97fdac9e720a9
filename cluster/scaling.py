"""Growing and shrinking the router's replica pools while it serves, and
profiling replicas as they join.

New replicas take new requests and a fair share of the running ones;
removed replicas drain first: each of their requests moves at its next
round boundary (re-prefill on a target, restart on a draft).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from specray.actors.engine.costs import RoundCostModel
from specray.actors.engine.profile import feed_profile_sizes, profile_sizes
from specray.cluster.fleet import Fleet
from specray.cluster.lanes import Lanes
from specray.cluster.ports import PoolDrafting
from specray.cluster.recovery import Recovery
from specray.cluster.router_state import ScaleReport, StartupProfile


@dataclass(frozen=True)
class ProfilePlan:
    """What to time when a replica joins; ``enabled`` False times nothing."""

    enabled: bool
    num_slots: int  # a target replica's batch
    max_gamma: int
    max_len: int
    max_batched_tokens: int | None = None  # a round's prefill budget

    def verify_sizes(self) -> list[int]:
        if not self.enabled:
            return []
        return profile_sizes(self.num_slots, self.max_gamma, self.max_len, self.max_batched_tokens)


@dataclass(eq=False)
class Scaler:
    fleet: Fleet
    drafting: PoolDrafting | None
    recovery: Recovery
    lanes: Lanes
    costs: RoundCostModel
    plan: ProfilePlan
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)

    # -- profiling ----------------------------------------------------------------

    async def profile(self) -> StartupProfile:
        """The cost curves' shapes, timed once every replica is up and one
        after the other: a profile taken while another replica loads or
        profiles reads that one's load too (on shared cores a draft step
        timed during the target's profile came out several times too slow,
        and the scheduler never drafted)."""
        plan = self.plan
        sizes = plan.verify_sizes()
        began = time.perf_counter()
        if sizes:
            self.costs.verify.set_profile(await self.fleet.targets.profile(sizes))
        verified = time.perf_counter()
        draft_s = 0.0
        if plan.enabled and self.fleet.drafts is not None:
            feeds = feed_profile_sizes(self.fleet.drafts.config.spec.max_len)
            points = await self.fleet.drafts.profile(feeds)
            self.costs.draft.set_profile(points)
            draft_s = time.perf_counter() - verified if points else 0.0
        return StartupProfile(tuple(sizes), verified - began, draft_s)

    async def read_hidden_layers(self) -> None:
        """The target layers the drafters read, from the first draft replica up."""
        pool = self.fleet.drafts
        if self.drafting is None or self.drafting.hidden_layers or pool is None:
            return
        if pool.replicas:
            first = next(iter(pool.replicas.values()))
            self.drafting.hidden_layers = tuple(await first.handle.hidden_layers.remote())

    async def add_target(self) -> None:
        self.costs.verify.set_profile(await self.fleet.targets.add(self.plan.verify_sizes()))

    # -- scaling -----------------------------------------------------------------

    async def scale(self, drafts: int | None, targets: int | None) -> ScaleReport:
        """Grow or shrink to ``drafts`` draft and ``targets`` target replicas;
        returns once removed replicas are empty and stopped."""
        if targets is not None and targets < 1:
            raise ValueError(f"targets must be >= 1, got {targets}")
        if drafts is not None and drafts < 0:
            raise ValueError(f"drafts must be >= 0, got {drafts}")
        if drafts and self.fleet.drafts is None:
            raise ValueError("this router has no draft spec to scale")
        began = time.perf_counter()
        moves = self.lanes.moves
        before = (moves.target, moves.draft)
        async with self._lock:
            self.lanes.scaling = True
            try:
                await self._scale(drafts, targets)
            finally:
                self.lanes.scaling = False
                self.fleet.inbox.wake()
        return ScaleReport(
            targets=len(self.fleet.targets.live),
            drafts=len(self.fleet.drafts.live) if self.fleet.drafts is not None else 0,
            target_moves=moves.target - before[0],
            draft_moves=moves.draft - before[1],
            seconds=time.perf_counter() - began,
        )

    async def _scale(self, drafts: int | None, targets: int | None) -> None:
        pool, target_pool = self.fleet.drafts, self.fleet.targets
        table = self.lanes.table
        self.recovery.want(targets, drafts)  # what a lost replica is replaced up to
        # Replicas already (re)starting count: they join without our help.
        add_targets = max(0, (targets or 0) - len(target_pool.live) - target_pool.starting)
        add_drafts = 0
        if pool is not None:
            add_drafts = max(0, (drafts or 0) - len(pool.live) - pool.starting)
        grow: list[Any] = [self.add_target() for _ in range(add_targets)]
        if pool is not None and add_drafts:
            grow.append(pool.add(add_drafts))
        try:
            await asyncio.gather(*grow)
        except BaseException:  # keep what did start; restore no further
            self.recovery.want(len(target_pool.live), len(pool.live) if pool is not None else None)
            raise
        await self.read_hidden_layers()

        draining_targets = []
        if targets is not None and targets < len(target_pool.live):
            draining_targets = target_pool.drain(len(target_pool.live) - targets)
        elif add_targets:
            for request_id in target_pool.rebalance():
                table.tracked[request_id].move_target = True
        draining_drafts = []
        if pool is not None and drafts is not None and drafts < len(pool.live):
            draining_drafts = pool.drain(len(pool.live) - drafts)
        elif pool is not None and add_drafts:
            for request_id in pool.rebalance():
                table.tracked[request_id].move_draft = True
        self.fleet.inbox.wake()

        # Lanes move their requests at round boundaries; requests without a
        # lane (waiting) are in no round, so their drafts move from here.
        while any(r.occupied for r in draining_targets) or any(r.requests for r in draining_drafts):
            for tracked in list(table.tracked.values()):
                if tracked.lane is None:
                    self.lanes.reconcile_draft(tracked)
            await asyncio.sleep(0.005)
        await asyncio.gather(*(target_pool.retire(r) for r in draining_targets))
        if pool is not None:
            await asyncio.gather(*(pool.retire(r) for r in draining_drafts))
