"""Keeping the router's replica pools at their wanted sizes.

A replica that dies is replaced: a draft replica by a fresh ``DraftWorker``
actor, a target replica by a whole fresh tensor-parallel group (gang
restart: :meth:`TargetPool.drop` tears down every shard of the broken group
and its placement group, and the next group starts once they are gone).
Deaths surface two ways: a call to the replica fails (the router reports it
here), or the watch loop's liveness probe finds a dead process among
replicas nobody is calling. A failed restart is retried with exponential
backoff until the pool is back to size.

While no target replica is up, requests wait for the restart: the router
keeps their committed tokens and re-prefills them on the new group. A request
whose rounds broke ``max_replays + 1`` groups fails instead of being replayed
again. They
wait at most ``target_restart_timeout_s`` from the moment the last replica
was lost; past it, waiting requests (and new ones, until a replica is back)
fail with :class:`TargetGroupError`, which the front door maps to
UNAVAILABLE.

Everything here runs on the router's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal

from specray.cluster.errors import TargetGroupError
from specray.cluster.events import DraftLost, TargetLost
from specray.cluster.fleet import Fleet
from specray.cluster.router_state import RecoveryState, RouterHealth

log = logging.getLogger(__name__)

Kind = Literal["draft", "target"]
_KEPT_TIMINGS = 32


@dataclass(frozen=True)
class RecoveryConfig:
    target_restart_timeout_s: float = 120.0  # requests wait this long for a target group
    watch_interval_s: float | None = 1.0  # liveness probes of idle replicas; None: off
    backoff_s: float = 1.0  # first wait after a failed restart, doubling
    max_backoff_s: float = 30.0
    # A request in the round that broke a group is replayed on the next one,
    # at most this often: a round that breaks every group it meets (a batch
    # slower than the shards' deadline looks like a hang) must not loop.
    max_replays: int = 2

    def __post_init__(self) -> None:
        if self.target_restart_timeout_s < 0:
            raise ValueError(
                f"target_restart_timeout_s must be >= 0, got {self.target_restart_timeout_s}"
            )
        if self.max_replays < 0:
            raise ValueError(f"max_replays must be >= 0, got {self.max_replays}")
        if self.watch_interval_s is not None and self.watch_interval_s <= 0:
            raise ValueError(f"watch_interval_s must be > 0 or None, got {self.watch_interval_s}")
        if not 0 < self.backoff_s <= self.max_backoff_s:
            raise ValueError(
                f"need 0 < backoff_s <= max_backoff_s, got {self.backoff_s}, {self.max_backoff_s}"
            )


class Backoff:
    """Waits between failed attempts: ``first``, doubling, capped at ``cap``."""

    def __init__(self, first: float, cap: float) -> None:
        self._first = first
        self._cap = cap
        self._next = first

    def next(self) -> float:
        wait = self._next
        self._next = min(self._next * 2, self._cap)
        return wait

    def reset(self) -> None:
        self._next = self._first


class OutageClock:
    """How long no target replica has been up (``now`` comes from the caller)."""

    def __init__(self) -> None:
        self.since: float | None = None

    def update(self, up: bool, now: float) -> None:
        if up:
            self.since = None
        elif self.since is None:
            self.since = now

    def seconds(self, now: float) -> float | None:
        return None if self.since is None else now - self.since

    def expired(self, now: float, bound_s: float) -> bool:
        return self.since is not None and now - self.since >= bound_s


class Recovery:
    """Replaces lost replicas, watches idle ones, and decides how long
    requests wait while no target replica is up."""

    def __init__(self, config: RecoveryConfig, fleet: Fleet) -> None:
        self.config = config
        self._fleet = fleet
        self._wanted: dict[Kind, int] = {"target": 0, "draft": 0}
        self._failures: dict[Kind, int] = {"target": 0, "draft": 0}
        self._restarts: dict[Kind, deque[float]] = {
            "target": deque(maxlen=_KEPT_TIMINGS),
            "draft": deque(maxlen=_KEPT_TIMINGS),
        }
        self._restart_counts: dict[Kind, int] = {"target": 0, "draft": 0}
        self._lost_drafts: set[int] = set()  # ids are never reused
        self._restoring: dict[Kind, asyncio.Task[None]] = {}
        self._watch: asyncio.Task[None] | None = None
        self._clock = OutageClock()
        self._fallbacks = 0
        self._failed_restarts = 0
        self._closed = False

    # -- lifecycle -----------------------------------------------------------

    def start(self, targets: int, drafts: int) -> None:
        """Keep ``targets`` and ``drafts`` replicas from now on; start watching."""
        self.want(targets, drafts)
        self._note_targets()
        interval = self.config.watch_interval_s
        if interval is not None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_loop(interval))

    def want(self, targets: int | None = None, drafts: int | None = None) -> None:
        """The pool sizes to restore after a loss (``scale`` changes them)."""
        if targets is not None:
            self._wanted["target"] = targets
        if drafts is not None:
            self._wanted["draft"] = drafts

    async def close(self) -> None:
        self._closed = True
        tasks = [t for t in (self._watch, *self._restoring.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- failures --------------------------------------------------------------

    def target_failed(self, replica_id: int, why: object) -> bool:
        """A target replica broke: drop it (its group is torn down) and start a
        fresh group in its place. False if it was already handled."""
        if self._fleet.targets.drop(replica_id) is None:
            return False
        self._fleet.inbox.post(TargetLost(replica_id))
        log.warning("target replica %d lost (%s); restarting its group", replica_id, _brief(why))
        self._failures["target"] += 1
        self._fleet.metrics.observe_failure("target")
        self._note_targets()
        self._restore("target")
        return True

    def draft_failed(self, replica_id: int, why: object) -> bool:
        """A draft replica broke: drop (kill) it and start another in its
        place. False if it was already handled."""
        pool = self._fleet.drafts
        if pool is None or replica_id in self._lost_drafts:
            return False
        self._lost_drafts.add(replica_id)
        pool.drop(replica_id)
        self._fleet.inbox.post(DraftLost(replica_id))
        log.warning("draft replica %d lost (%s); starting another", replica_id, _brief(why))
        self._failures["draft"] += 1
        self._fleet.metrics.observe_failure("draft")
        self._restore("draft")
        return True

    def count_fallbacks(self, count: int) -> None:
        """Requests that lost their draft replica mid-request."""
        self._fallbacks += count
        self._fleet.metrics.observe_fallbacks(count)

    # -- waiting for targets ---------------------------------------------------------

    def targets_down_error(self) -> TargetGroupError | None:
        """Why requests waiting for a target replica must fail now; None while
        they should go on waiting (one is up, or being restarted within the bound)."""
        if self._fleet.targets.live:
            return None
        self._note_targets()
        now = time.monotonic()
        bound = self.config.target_restart_timeout_s
        restarting = self._fleet.targets.starting > 0 or "target" in self._restoring
        if not restarting:
            return TargetGroupError("no target replica is left", "closed")
        if self._clock.expired(now, bound):
            return TargetGroupError(
                f"no target replica is up: a restart has not finished within {bound:g} s",
                "timeout",
            )
        # Check again at the bound. The wake-up the outage clock scheduled can
        # fire a hair early (asyncio rounds to its clock resolution); with
        # nothing else waking the lanes, the waiting requests would then sit
        # there past the bound (seen in CI: a 120 s client deadline instead
        # of UNAVAILABLE).
        remaining = bound - (self._clock.seconds(now) or 0.0)
        asyncio.get_running_loop().call_later(max(remaining, 0.0) + 1e-3, self._fleet.inbox.wake)
        return None

    # -- reporting -------------------------------------------------------------

    def health(self) -> RouterHealth:
        self._note_targets()
        return RouterHealth(
            targets_up=len(self._fleet.targets.live),
            targets_starting=self._fleet.targets.starting,
            drafts_up=len(self._fleet.drafts.live) if self._fleet.drafts is not None else 0,
            outage_s=self._clock.seconds(time.monotonic()),
        )

    def state(self) -> RecoveryState:
        self._note_targets()
        return RecoveryState(
            draft_failures=self._failures["draft"],
            target_failures=self._failures["target"],
            draft_restarts=self._restart_counts["draft"],
            target_restarts=self._restart_counts["target"],
            failed_restarts=self._failed_restarts,
            fallbacks=self._fallbacks,
            draft_restart_s=tuple(self._restarts["draft"]),
            target_restart_s=tuple(self._restarts["target"]),
            outage_s=self._clock.seconds(time.monotonic()),
        )

    # -- internals -------------------------------------------------------------

    def _note_targets(self) -> None:
        """Update the outage clock and gauge. Whoever sees an outage first
        (a failed call, a lane waiting for a replica, a health probe) starts
        the clock, and with it the wake-up at the bound, so waiting requests
        fail even if nothing else happens meanwhile."""
        live = len(self._fleet.targets.live)
        was_down = self._clock.since is not None
        self._clock.update(live > 0, time.monotonic())
        self._fleet.metrics.set_targets_up(live)
        if not was_down and self._clock.since is not None:
            bound = self.config.target_restart_timeout_s
            asyncio.get_running_loop().call_later(bound, self._fleet.inbox.wake)

    def _deficit(self, kind: Kind) -> int:
        pool = self._fleet.targets if kind == "target" else self._fleet.drafts
        if pool is None:
            return 0
        return self._wanted[kind] - len(pool.live) - pool.starting

    def _restore(self, kind: Kind) -> None:
        if self._closed or kind in self._restoring:
            return
        self._restoring[kind] = asyncio.get_running_loop().create_task(self._restore_loop(kind))

    async def _restore_loop(self, kind: Kind) -> None:
        try:
            await self._restore_until_full(kind)
        finally:
            # Right after the last deficit check, with no await in between: a
            # loss reported later finds no loop and starts a new one.
            self._restoring.pop(kind, None)

    async def _restore_until_full(self, kind: Kind) -> None:
        backoff = Backoff(self.config.backoff_s, self.config.max_backoff_s)
        # Checked and started with no await in between, so a concurrent
        # scale (which counts starting replicas) never double-fills the pool.
        while not self._closed and self._deficit(kind) > 0:
            began = time.perf_counter()
            try:
                if kind == "target":
                    await self._fleet.targets.add()
                else:
                    assert self._fleet.drafts is not None
                    await self._fleet.drafts.add(1)
            except Exception as err:
                self._failed_restarts += 1
                wait = backoff.next()
                log.warning("restarting a %s replica failed: %r; retry in %g s", kind, err, wait)
                await asyncio.sleep(wait)
                continue
            seconds = time.perf_counter() - began
            log.info("%s replica restarted in %.2f s", kind, seconds)
            self._restarts[kind].append(seconds)
            self._restart_counts[kind] += 1
            self._fleet.metrics.observe_restart(kind)
            backoff.reset()
            self._note_targets()
            self._fleet.inbox.wake()

    async def _watch_loop(self, interval: float) -> None:
        while not self._closed:
            await asyncio.sleep(interval)
            try:
                await self._probe(interval)
            except Exception:  # a probe must never stop the watching
                log.exception("probing replicas failed")

    async def _probe(self, timeout_s: float) -> None:
        for replica_id in await self._fleet.targets.find_dead(timeout_s):
            self.target_failed(replica_id, "a shard's process is gone")
        if self._fleet.drafts is not None:
            for replica_id in await self._fleet.drafts.find_dead(timeout_s):
                self.draft_failed(replica_id, "its process is gone")


def _brief(why: object) -> str:
    """The first line of a reason: Ray's actor errors run to a dozen lines."""
    return str(why).split("\n", 1)[0]
