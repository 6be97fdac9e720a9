"""The router's round loops ("lanes"): one, or two micro-batches with
``overlap``, each alternating a round boundary and a round.

At a boundary a lane applies what happened meanwhile (replicas lost, posted
to the :class:`Inbox`), frees cancelled requests, moves requests off
draining or lost replicas, re-attaches drafts and admits waiting requests.
A round is :func:`speculative_round` over the lane's requests, through the
Ray ports of :mod:`specray.cluster.ports`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from specray.actors.engine.round import Drafting, RoundResult, Verifying, speculative_round
from specray.actors.engine.scheduling import GammaScheduler
from specray.cluster.events import DraftLost, Event, TargetLost
from specray.cluster.fleet import Fleet
from specray.cluster.ports import unpin_target
from specray.cluster.recovery import Recovery
from specray.cluster.request_table import RequestTable
from specray.cluster.router_state import RoundTimings
from specray.cluster.tracked import Tracked

log = logging.getLogger(__name__)


@dataclass
class Moves:
    target: int = 0  # requests re-prefilled on another target replica
    draft: int = 0  # requests restarted on another draft replica


class Lanes:
    """Runs the lanes over one request table and the replica pools."""

    def __init__(
        self,
        table: RequestTable,
        fleet: Fleet,
        recovery: Recovery,
        scheduler: GammaScheduler,
        ports: tuple[Drafting | None, Verifying],
        reattach_drafts: bool,
    ) -> None:
        self.table = table
        self.fleet = fleet
        self.recovery = recovery
        self.scheduler = scheduler
        self.drafting, self.verifying = ports
        self.reattach_drafts = reattach_drafts
        self.scaling = False  # while a scale runs, waiting requests wait for it
        self.moves = Moves()
        self.timings = RoundTimings()
        self.closed = False

    async def run(self, lane: int) -> None:
        while not self.closed:
            self.fleet.inbox.clear()
            self.boundary(lane)
            batch = [self.table.tracked[rid] for rid in self.table.lanes[lane]]
            if not batch:
                await self.fleet.inbox.wait()
                continue
            try:
                await self.round(batch)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # a bug must not take the other requests down
                log.exception("round failed")
                for tracked in batch:
                    if tracked.request_id in self.table.tracked:
                        self.table.fail(tracked, err)

    # -- the round --------------------------------------------------------------

    async def round(self, batch: list[Tracked]) -> None:
        began = time.perf_counter()
        result = await speculative_round(
            [t.run for t in batch], self.drafting, self.verifying, self.scheduler
        )
        self.apply(self.fleet.inbox.take())  # losses seen in the round, before its chunks go out
        if result.rejection is not None:
            self.fleet.metrics.observe_round(result.rejection)
        self.fleet.metrics.observe_prefix_cache(result.prefix_queries, result.prefix_hits)
        for run, output in zip(result.requests, result.outputs, strict=True):
            tracked = self.table.tracked.get(run.request_id)
            if tracked is not None:
                self.table.emit(tracked, output)
        self._time(result, time.perf_counter() - began)

    def _time(self, result: RoundResult, seconds: float) -> None:
        if not result.requests:
            return
        timings = self.timings
        timings.rounds += 1
        timings.request_rounds += len(result.requests)
        timings.round_s += seconds
        timings.propose_s += result.times.propose_s
        timings.verify_s += result.times.verify_s
        timings.local_s += result.times.local_s
        if result.times.verified_tokens:
            timings.add_verify(
                result.times.verified_tokens, result.times.priced_verify_s, result.times.verify_s
            )

    # -- the boundary -----------------------------------------------------------

    def boundary(self, lane: int) -> None:
        """Between two rounds of a lane: apply losses, cancels, moves and admissions."""
        self.apply(self.fleet.inbox.take())
        table = self.table
        for request_id in list(table.lanes[lane]):
            tracked = table.tracked[request_id]
            if tracked.cancelled:
                table.free(tracked)
                continue
            self.reconcile_target(tracked)
            self.reconcile_draft(tracked)
        self.admit(lane)
        down = None
        if table.waiting and not self.scaling:
            down = self.recovery.targets_down_error()
        if down is not None:  # None: a target replica is up, or worth waiting for
            for request_id in list(table.waiting):
                table.fail(table.tracked[request_id], down)
        table.update_gauges()

    def apply(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, TargetLost):
                unpin_target(self.table, event.replica_id)
            elif isinstance(event, DraftLost):
                self.unpin_draft(event.replica_id)

    def unpin_draft(self, replica_id: int) -> None:
        """A draft replica is lost: its requests go target-only until they
        re-attach elsewhere at their next boundary."""
        fallbacks = 0
        for tracked in self.table.tracked.values():
            run = tracked.run
            if run.draft.replica == replica_id:
                run.draft.detach()
                fallbacks += not run.stats.fallback
                run.stats.fallback = True
        if fallbacks:
            self.recovery.count_fallbacks(fallbacks)

    def reconcile_target(self, tracked: Tracked) -> None:
        pool, run = self.fleet.targets, tracked.run
        replica = pool.replicas.get(run.target) if run.target is not None else None
        if replica is not None and not replica.draining and not tracked.move_target:
            return
        tracked.move_target = False
        pool.release(run.target, tracked.request_id, run.tokens)
        run.cached_len = 0  # re-prefill wherever it lands
        run.prefix_hint = 0  # and ask that replica what it has cached
        hashes = pool.prefix_hashes(run.tokens)
        new = pool.pick(hashes)
        if new is None:  # no room: back to the queue's front, state kept
            run.target = None
            assert tracked.lane is not None
            self.table.lanes[tracked.lane].pop(tracked.request_id, None)
            tracked.lane = None
            self.table.waiting.appendleft(tracked.request_id)
        else:
            run.target = new.replica_id
            pool.pin(new, tracked.request_id, hashes)
        self.moves.target += 1

    def reconcile_draft(self, tracked: Tracked) -> None:
        pool, run = self.fleet.drafts, tracked.run
        if pool is None or not run.wants_draft:
            return
        draft = run.draft
        replica = pool.replicas.get(draft.replica) if draft.replica is not None else None
        if draft.replica is not None and replica is None:
            draft.detach()  # its replica failed; already counted as a fallback
        moving = replica is not None and (replica.draining or tracked.move_draft)
        if moving:
            pool.detach(draft.replica, [tracked.request_id])
            draft.detach()
        tracked.move_draft = False
        if draft.replica is not None:
            return
        if run.stats.fallback and not self.reattach_drafts:
            return
        hashes = pool.prefix_hashes(run.tokens)
        new = pool.pick(hashes)
        if new is None:
            return
        pool.attach(new, tracked.request_id, run.tokens, run.sampling, hashes)
        draft.attach(new.replica_id, self.scheduler.start_backlog(len(run.tokens)))
        if moving:
            self.moves.draft += 1

    def admit(self, lane: int) -> None:
        table, pool = self.table, self.fleet.targets
        others = [len(table.lanes[i]) for i in range(len(table.lanes)) if i != lane]
        while table.waiting and (not others or len(table.lanes[lane]) <= min(others)):
            hashes = pool.prefix_hashes(table.tracked[table.waiting[0]].run.tokens)
            replica = pool.pick(hashes)
            if replica is None:
                return
            tracked = table.tracked[table.waiting.popleft()]
            tracked.run.target = replica.replica_id
            pool.pin(replica, tracked.request_id, hashes)
            tracked.lane = lane
            table.lanes[lane][tracked.request_id] = None
            self.reconcile_draft(tracked)
