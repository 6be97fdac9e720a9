"""The router's target replicas: each a whole tensor-parallel group
(:class:`ShardedTarget`), holding the KV cache of the requests pinned to it.

A slot counts as taken from the moment a request is pinned until its
replica confirms the release, so a new request never finds the shards'
cache full. New requests go where their prefix most likely is cached
(:mod:`specray.cluster.affinity`), within a bound on imbalance. A broken
replica is dropped at once and torn down (every shard and its placement
group) before the next replica starts, so a gang restart can take the
broken group's resources. Blocking calls of a
:class:`ShardedTarget` run in worker threads; everything else runs on the
router's event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from specray.actors.engine.profile import profile_verify
from specray.actors.model.prefix_cache import DEFAULT_BLOCK_SIZE
from specray.cluster.affinity import PrefixAffinity, block_hashes, place
from specray.cluster.events import Inbox
from specray.cluster.router_state import TargetReplicaState
from specray.cluster.target_group import ShardedTarget
from specray.cluster.target_group_config import ShardedTargetConfig

log = logging.getLogger(__name__)


@dataclass
class TargetReplica:
    replica_id: int
    target: ShardedTarget
    requests: set[str] = field(default_factory=set)
    releasing: set[str] = field(default_factory=set)  # released, not yet confirmed
    draining: bool = False
    affinity: PrefixAffinity = field(default_factory=lambda: PrefixAffinity(0))

    @property
    def occupied(self) -> int:
        """Slots taken, including those whose release is in flight."""
        return len(self.requests) + len(self.releasing)

    @property
    def load(self) -> int:
        """Requests running here (what placement balances)."""
        return len(self.requests)


class TargetPool:
    def __init__(
        self, config: ShardedTargetConfig, inbox: Inbox, prefix_affinity: bool = True
    ) -> None:
        """``inbox`` is woken when a slot frees up or a replica joins.
        ``prefix_affinity``: place requests by their prefix (replicas with a
        prefix cache only), else on the least occupied replica."""
        self.config = config
        # Blocks of the replicas' prefix caches: what affinity remembers of each.
        self._affinity_blocks = (
            config.model.prefix_tokens // DEFAULT_BLOCK_SIZE if prefix_affinity else 0
        )
        self.replicas: dict[int, TargetReplica] = {}
        self._inbox = inbox
        self._ids = itertools.count()
        self._background: set[asyncio.Task[Any]] = set()
        self._teardowns: set[asyncio.Task[Any]] = set()
        self.starting = 0  # replicas being started
        self._closed = False

    @property
    def live(self) -> list[TargetReplica]:
        return [r for r in self.replicas.values() if not r.draining]

    def add(self, profile_sizes: Sequence[int] = ()) -> asyncio.Task[list[tuple[int, float]]]:
        """Start one replica; the task returns its verify timings at
        ``profile_sizes``. It counts in :attr:`starting` from this call on."""
        self.starting += 1
        return asyncio.get_running_loop().create_task(self._add(profile_sizes))

    async def _add(self, profile_sizes: Sequence[int]) -> list[tuple[int, float]]:
        try:
            if self._teardowns:  # broken groups free their resources first
                await asyncio.gather(*self._teardowns, return_exceptions=True)
            target = await asyncio.to_thread(self._start_group)
            points = []
            if profile_sizes:
                try:
                    points = await asyncio.to_thread(profile_verify, target, profile_sizes)
                except BaseException:
                    await asyncio.to_thread(target.shutdown)
                    raise
            if self._closed:
                await asyncio.to_thread(target.shutdown)
                raise RuntimeError("the target pool shut down while a replica started")
            replica = TargetReplica(
                next(self._ids), target, affinity=PrefixAffinity(self._affinity_blocks)
            )
            self.replicas[replica.replica_id] = replica
        finally:
            self.starting -= 1
        self._inbox.wake()
        return points

    async def profile(self, sizes: Sequence[int]) -> list[tuple[int, float]]:
        """Verify timings of the first live replica at ``sizes``, back to
        back; [] without one. Only before it takes requests."""
        live = self.live
        if not live or not sizes:
            return []
        return await asyncio.to_thread(profile_verify, live[0].target, sizes)

    def _start_group(self) -> ShardedTarget:
        target = ShardedTarget(self.config)
        if self._closed:  # checked here too: a cancelled caller never sees it
            target.shutdown()
            raise RuntimeError("the target pool shut down while a replica started")
        return target

    def prefix_hashes(self, token_ids: Sequence[int]) -> list[int]:
        """The block hashes placement compares; [] without affinity."""
        return block_hashes(token_ids, DEFAULT_BLOCK_SIZE) if self._affinity_blocks else []

    def pick(self, hashes: Sequence[int] = ()) -> TargetReplica | None:
        """A live replica with a free slot, if any: among those at most
        ``num_slots // 4`` (at least 1) requests above the least loaded,
        the one that was sent the most leading blocks of ``hashes``
        (:meth:`prefix_hashes` of the request's tokens), else the least
        loaded. The bound keeps a hot shared prefix (a system prompt)
        from piling every request onto one replica."""
        room = [r for r in self.live if r.occupied < self.config.model.num_slots]
        return place(room, hashes, max(1, self.config.model.num_slots // 4))

    def pin(self, replica: TargetReplica, request_id: str, hashes: Sequence[int] = ()) -> None:
        replica.requests.add(request_id)
        replica.affinity.record(hashes)

    def release(
        self, replica_id: int | None, request_id: str, token_ids: Sequence[int] = ()
    ) -> None:
        """Free a request's slot on its replica's shards (in the background).
        ``token_ids``: its committed tokens, which the replica's prefix cache
        now holds (for placement)."""
        replica = self.replicas.get(replica_id) if replica_id is not None else None
        if replica is None or request_id not in replica.requests:
            return
        replica.affinity.record(self.prefix_hashes(token_ids))
        replica.requests.discard(request_id)
        replica.releasing.add(request_id)

        # Sent now, so that a next turn placed here reaches every shard after
        # it and finds the blocks; only the wait runs in the background.
        try:
            wait = replica.target.submit_release(request_id)
        except Exception as err:  # a broken group frees everything anyway
            log.warning("release of %r failed: %s", request_id, err)
            wait = None

        async def release() -> None:
            try:
                if wait is not None:
                    await asyncio.to_thread(wait)
            except Exception as err:  # a broken group frees everything anyway
                log.warning("release of %r failed: %s", request_id, err)
            replica.releasing.discard(request_id)
            self._inbox.wake()

        self._spawn(release())

    def describe(self) -> tuple[TargetReplicaState, ...]:
        return tuple(
            TargetReplicaState(
                r.replica_id,
                tuple(sorted(r.requests)),
                len(r.releasing),
                r.draining,
                tuple(p.pid for p in r.target.placements),
            )
            for r in self.replicas.values()
        )

    def drain(self, count: int) -> list[TargetReplica]:
        """Mark the ``count`` least occupied live replicas draining."""
        chosen = sorted(self.live, key=lambda r: (r.occupied, -r.replica_id))[:count]
        for replica in chosen:
            replica.draining = True
        return chosen

    def rebalance(self) -> list[str]:
        """Requests to move so no live replica holds more than its fair share."""
        live = self.live
        if not live:
            return []
        fair = -(-sum(len(r.requests) for r in live) // len(live))
        return [rid for r in live for rid in sorted(r.requests)[fair:]]

    async def retire(self, replica: TargetReplica) -> None:
        """Stop a drained replica."""
        self.replicas.pop(replica.replica_id, None)
        await asyncio.to_thread(replica.target.shutdown)

    def drop(self, replica_id: int) -> TargetReplica | None:
        """Forget a broken replica at once (returns it if it was known); its
        shards and placement group are torn down in the background."""
        replica = self.replicas.pop(replica_id, None)
        if replica is not None:
            # Its slots died with it; nothing waits on them any more.
            replica.requests.clear()
            replica.releasing.clear()
            task = asyncio.get_running_loop().create_task(
                asyncio.to_thread(replica.target.shutdown)
            )
            self._teardowns.add(task)
            task.add_done_callback(self._teardowns.discard)
        return replica

    async def find_dead(self, timeout_s: float) -> list[int]:
        """Replicas with a shard whose process is gone (a probe of every shard)."""
        replicas = list(self.replicas.values())
        answers = await asyncio.gather(
            *(asyncio.to_thread(r.target.dead_ranks, timeout_s) for r in replicas),
            return_exceptions=True,
        )
        found = []
        for replica, dead in zip(replicas, answers, strict=True):
            if isinstance(dead, BaseException):  # an unanswered probe proves nothing
                log.warning("probing target replica %d failed: %r", replica.replica_id, dead)
            elif dead:
                found.append(replica.replica_id)
        return found

    async def active_slots(self) -> dict[int, tuple[int, ...]]:
        """KV slots in use on each replica, per shard, as the shards report them."""
        replicas = list(self.replicas.values())
        answers = await asyncio.gather(
            *(asyncio.to_thread(r.target.active_slots) for r in replicas)
        )
        return {r.replica_id: tuple(a) for r, a in zip(replicas, answers, strict=True)}

    async def prefix_pins(self) -> dict[int, tuple[int, ...]]:
        """Pins on prefix-cache blocks on each replica, per shard."""
        replicas = list(self.replicas.values())
        answers = await asyncio.gather(*(asyncio.to_thread(r.target.prefix_pins) for r in replicas))
        return {r.replica_id: tuple(a) for r, a in zip(replicas, answers, strict=True)}

    def close(self) -> None:
        """Start no replica from now on; one still starting is stopped once up."""
        self._closed = True

    async def shutdown(self) -> None:
        self.close()
        replicas = list(self.replicas.values())
        self.replicas.clear()
        await asyncio.gather(*(asyncio.to_thread(r.target.shutdown) for r in replicas))
        await asyncio.gather(*self._teardowns, return_exceptions=True)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
