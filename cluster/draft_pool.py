"""A pool of draft replicas, each a :class:`DraftWorker` in its own Ray actor
or, for a drafter that only looks up, in the router's process
(:mod:`specray.cluster.inline_draft`).

Requests are pinned to one replica (their draft state lives there); a new
request goes to a replica that is not draining: where a drafter keeps
state across requests (a suffix drafter's global cache, a draft model's
prefix cache), the one that was sent most of its prefix within a bound on
imbalance (:func:`specray.cluster.affinity.place`), else the least loaded. Starting and
finishing a request are sent without waiting: a replica runs its caller's
calls in submission order, so the next :meth:`DraftPool.propose` to it comes
after them, and awaits their outcome along with its own. A replica that dies,
or shows no progress for ``timeout_s`` while a proposal is pending
(:func:`specray.cluster.liveness.await_progressing`: a long catch-up under
load is computing, not hung), surfaces as a
:class:`DraftReplicaError`; the pool drops (and kills) it, and the caller
re-attaches its requests elsewhere by starting them again with their
committed tokens.

Every method runs on the router's event loop (no locks needed).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import ray
from ray.exceptions import ActorDiedError, RayActorError, RayError, RayTaskError

from specray.actors.drafting.base import DraftProposal, DraftRequest, DraftUpdate
from specray.actors.drafting.spec import MODEL_KINDS
from specray.actors.drafting.suffix.drafter import SuffixConfig
from specray.actors.model.prefix_cache import DEFAULT_BLOCK_SIZE
from specray.actors.sampling.params import SamplingParams
from specray.actors.workers.draft_worker import DraftWorker, DraftWorkerSpec, DraftWorkerStats
from specray.cluster.affinity import PrefixAffinity, block_hashes, place
from specray.cluster.inline_draft import InlineDraftError, InlineDraftHandle, check_inline
from specray.cluster.liveness import StalledError, await_progressing
from specray.cluster.router_state import DraftReplicaState

_MAX_UNSETTLED = 64
DraftPlacement = Literal["actor", "router"]
PLACEMENTS: tuple[str, ...] = get_args(DraftPlacement)


class DraftReplicaError(RuntimeError):
    """A draft replica can no longer serve; the pool has dropped it."""

    def __init__(self, message: str, replica_id: int, reason: str) -> None:
        super().__init__(message)
        self.replica_id = replica_id
        self.reason = reason  # "died" | "timeout" | "failed"


@dataclass(frozen=True)
class DraftPoolConfig:
    spec: DraftWorkerSpec
    num_cpus: float = 1.0  # Ray CPUs per replica; spec.num_threads is what it uses
    timeout_s: float = 30.0  # a pending propose's longest stretch without progress
    start_timeout_s: float = 300.0  # process start and model load
    affinity: bool = True  # place requests where their prefix was drafted (see pick)
    # actor: each replica a Ray actor of its own; router: in the router's
    # process (lookup drafters only: :mod:`specray.cluster.inline_draft`)
    placement: DraftPlacement = "actor"

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.placement == "router":
            check_inline(self.spec.drafter.kind)


@dataclass
class DraftReplica:
    replica_id: int
    handle: Any  # ray ActorHandle of a DraftWorker
    pid: int
    requests: set[str] = field(default_factory=set)
    draining: bool = False
    # start/finish calls sent but not yet awaited; awaited with the next propose
    unsettled: list[Any] = field(default_factory=list)
    affinity: PrefixAffinity = field(default_factory=lambda: PrefixAffinity(0))

    @property
    def occupied(self) -> int:
        return len(self.requests)

    # Placement's name for it: unlike a target slot, a draft slot frees with
    # no release to confirm, so what a replica runs is all it holds.
    load = occupied


def affinity_blocks(spec: DraftWorkerSpec) -> int:
    """Blocks of the state a replica keeps across requests: a suffix
    drafter's global cache, a draft model's prefix cache (0: none, and
    placement goes by load alone)."""
    tokens = spec.prefix_tokens if spec.drafter.kind in MODEL_KINDS else 0
    if spec.drafter.kind in ("suffix", "suffix_hybrid"):
        tokens = max(tokens, SuffixConfig().cache_tokens)
    return tokens // DEFAULT_BLOCK_SIZE


class DraftReplicaActor(DraftWorker):
    """A :class:`DraftWorker` as a Ray actor whose progress is answered in a
    concurrency group of its own, beside a running proposal. (Ray's
    decorator types the method as a remote one: the override is the same
    call.)"""

    @ray.method(concurrency_group="probe")
    def progress(self) -> int:  # type: ignore[override]
        return super().progress()


class DraftPool:
    def __init__(self, config: DraftPoolConfig) -> None:
        self.config = config
        self._affinity_blocks = affinity_blocks(config.spec) if config.affinity else 0
        self.replicas: dict[int, DraftReplica] = {}
        self._ids = itertools.count()
        self._actor: Any = ray.remote(concurrency_groups={"probe": 1})(DraftReplicaActor)  # type: ignore[call-overload]
        self._background: set[asyncio.Task[Any]] = set()
        self.starting = 0  # replicas being started

    # -- membership -----------------------------------------------------------

    @property
    def live(self) -> list[DraftReplica]:
        return [r for r in self.replicas.values() if not r.draining]

    def add(self, count: int) -> asyncio.Task[list[int]]:
        """Start ``count`` replicas; the task returns their ids once they
        answer. They count in :attr:`starting` from this call on."""
        self.starting += count
        return asyncio.get_running_loop().create_task(self._add(count))

    async def _add(self, count: int) -> list[int]:
        try:
            return await self._start(count)
        finally:
            self.starting -= count

    async def _start(self, count: int) -> list[int]:
        if self.config.placement == "router":
            handles: list[Any] = [InlineDraftHandle(self.config.spec) for _ in range(count)]
        else:
            handles = [
                self._actor.options(num_cpus=self.config.num_cpus, max_restarts=0).remote(
                    self.config.spec
                )
                for _ in range(count)
            ]
        try:
            pids = await asyncio.wait_for(
                asyncio.gather(*(h.ping.remote() for h in handles)),
                self.config.start_timeout_s,
            )
        except BaseException:
            for handle in handles:
                _kill(handle)
            raise
        ids = []
        for handle, pid in zip(handles, pids, strict=True):
            replica = DraftReplica(
                next(self._ids), handle, int(pid), affinity=PrefixAffinity(self._affinity_blocks)
            )
            self.replicas[replica.replica_id] = replica
            ids.append(replica.replica_id)
        return ids

    async def profile(self, sizes: Sequence[int]) -> list[tuple[int, float]]:
        """Seconds the first replica's drafter takes to feed each of ``sizes``
        tokens ([] for lookup, or without a replica). Only before it takes
        requests: it borrows a request slot."""
        if not self.replicas or not sizes:
            return []
        replica = next(iter(self.replicas.values()))
        points: list[tuple[int, float]] = await asyncio.wait_for(
            _awaitable(replica.handle.feed_profile.remote(list(sizes))),
            self.config.start_timeout_s,
        )
        return points

    def drain(self, count: int) -> list[DraftReplica]:
        """Mark the ``count`` least loaded live replicas draining: they take no
        new requests, and their requests should move (:meth:`pick` elsewhere)."""
        chosen = sorted(self.live, key=lambda r: (r.occupied, -r.replica_id))[:count]
        for replica in chosen:
            replica.draining = True
        return chosen

    async def retire(self, replica: DraftReplica) -> None:
        """Kill a replica (drained, or given up on) after its last calls settle."""
        self.replicas.pop(replica.replica_id, None)
        if replica.unsettled:
            settle = asyncio.gather(
                *(_awaitable(ref) for ref in replica.unsettled), return_exceptions=True
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(settle, self.config.timeout_s)
        _kill(replica.handle)

    def drop(self, replica_id: int) -> DraftReplica | None:
        """Forget a failed replica at once and kill it; returns it if known."""
        replica = self.replicas.pop(replica_id, None)
        if replica is not None:
            replica.requests.clear()  # their state died with it (a drain waits on none)
            _kill(replica.handle)
        return replica

    def rebalance(self) -> list[str]:
        """Requests to move so no live replica holds more than its fair share."""
        live = self.live
        if not live:
            return []
        total = sum(r.occupied for r in self.replicas.values())
        fair = -(-total // len(live))
        moves: list[str] = []
        for replica in live:
            moves += sorted(replica.requests)[fair:]
        return moves

    # -- requests -------------------------------------------------------------

    def prefix_hashes(self, token_ids: Sequence[int]) -> list[int]:
        """The block hashes placement compares; [] where no replica keeps
        state across requests."""
        return block_hashes(token_ids, DEFAULT_BLOCK_SIZE) if self._affinity_blocks else []

    def pick(self, hashes: Sequence[int] = ()) -> DraftReplica | None:
        """A replica that takes new requests and has room, if any: by
        affinity to ``hashes`` (:meth:`prefix_hashes` of the request's
        tokens) within ``num_slots // 4`` of the least loaded, else the
        least loaded."""
        slots = self.config.spec.num_slots
        room = [r for r in self.live if r.occupied < slots]
        return place(room, hashes, max(1, slots // 4))

    def attach(
        self,
        replica: DraftReplica,
        request_id: str,
        token_ids: Sequence[int],
        sampling: SamplingParams,
        hashes: Sequence[int] = (),
    ) -> None:
        """Start drafting ``request_id`` on ``replica`` from its committed
        tokens (whose :meth:`prefix_hashes` are ``hashes``)."""
        replica.unsettled.append(replica.handle.start.remote(request_id, list(token_ids), sampling))
        replica.requests.add(request_id)
        replica.affinity.record(hashes)
        self._bound_unsettled(replica)

    def detach(
        self, replica_id: int | None, request_ids: Sequence[str], token_ids: Sequence[int] = ()
    ) -> None:
        """Free the requests' draft state; a gone replica has nothing to free.
        ``token_ids``: a finished request's committed tokens, which the
        replica's caches now hold (for placement)."""
        replica = self.replicas.get(replica_id) if replica_id is not None else None
        if replica is None or not request_ids:
            return
        replica.affinity.record(self.prefix_hashes(token_ids))
        replica.requests.difference_update(request_ids)
        replica.unsettled.append(replica.handle.finish.remote(list(request_ids)))
        self._bound_unsettled(replica)

    def _bound_unsettled(self, replica: DraftReplica) -> None:
        """A replica nobody proposes to for long (γ = 0 under load) would
        collect refs without end: settle them in the background. A failure
        among them resurfaces at the next propose, which the replica fails."""
        if len(replica.unsettled) < _MAX_UNSETTLED:
            return
        refs, replica.unsettled = replica.unsettled, []

        async def settle() -> None:
            await asyncio.gather(*(_awaitable(ref) for ref in refs), return_exceptions=True)

        task = asyncio.get_running_loop().create_task(settle())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def propose(
        self,
        replica_id: int,
        requests: Sequence[DraftRequest],
        updates: Sequence[DraftUpdate],
    ) -> list[DraftProposal]:
        """One round on one replica; raises :class:`DraftReplicaError` (after
        dropping the replica) if it died, failed or timed out."""
        replica = self.replicas.get(replica_id)
        if replica is None:
            raise DraftReplicaError(f"draft replica {replica_id} is gone", replica_id, "died")
        unsettled, replica.unsettled = replica.unsettled, []
        refs = [*unsettled, replica.handle.propose.remote(list(requests), list(updates))]
        try:
            results = await await_progressing(
                asyncio.gather(*(_awaitable(ref) for ref in refs)),
                lambda: _awaitable(replica.handle.progress.remote()),
                self.config.timeout_s,
            )
        except StalledError as err:
            self.drop(replica_id)
            raise DraftReplicaError(
                f"draft replica {replica_id} {err}", replica_id, "timeout"
            ) from err
        except RayActorError as err:
            self.drop(replica_id)
            raise DraftReplicaError(
                f"draft replica {replica_id} died: {err}", replica_id, "died"
            ) from err
        except (RayTaskError, InlineDraftError) as err:
            self.drop(replica_id)
            raise DraftReplicaError(
                f"draft replica {replica_id} failed: {err}", replica_id, "failed"
            ) from err
        proposals: list[DraftProposal] = results[-1]
        return proposals

    async def find_dead(self, timeout_s: float) -> list[int]:
        """Replicas whose process is gone (a ping each). A replica still busy
        after ``timeout_s`` counts as alive: proposals have their own deadline."""
        ids = list(self.replicas)
        pings = [
            asyncio.ensure_future(_awaitable(self.replicas[i].handle.ping.remote())) for i in ids
        ]
        if not pings:
            return []
        await asyncio.wait(pings, timeout=timeout_s)
        dead = []
        for replica_id, ping in zip(ids, pings, strict=True):
            if not ping.done():
                ping.cancel()
            elif isinstance(ping.exception(), ActorDiedError):  # not merely unreachable
                dead.append(replica_id)
        return dead

    async def describe(self) -> tuple[DraftReplicaState, ...]:
        """Each replica as the router sees it, with the requests it tracks itself."""
        held = await self.num_requests()
        return tuple(
            DraftReplicaState(
                r.replica_id,
                r.pid,
                r.occupied,
                held.get(r.replica_id, -1),
                r.draining,
                self.config.placement,
            )
            for r in self.replicas.values()
        )

    async def num_requests(self) -> dict[int, int]:
        """Requests each replica actually tracks (one RPC each); -1 if it is gone."""
        ids = list(self.replicas)
        answers = await asyncio.gather(
            *(_awaitable(self.replicas[i].handle.num_requests.remote()) for i in ids),
            return_exceptions=True,
        )
        return {i: a if isinstance(a, int) else -1 for i, a in zip(ids, answers, strict=True)}

    async def prefix_pins(self) -> dict[int, int]:
        """Pins each replica's requests hold on its prefix cache (one RPC each)."""
        ids = list(self.replicas)
        answers = await asyncio.gather(
            *(_awaitable(self.replicas[i].handle.prefix_pins.remote()) for i in ids),
            return_exceptions=True,
        )
        return {i: a if isinstance(a, int) else -1 for i, a in zip(ids, answers, strict=True)}

    async def stats(self, reset: bool = False) -> dict[int, DraftWorkerStats]:
        """Each live replica's own propose time (one RPC each)."""
        ids = list(self.replicas)
        answers = await asyncio.gather(
            *(_awaitable(self.replicas[i].handle.stats.remote(reset)) for i in ids)
        )
        return dict(zip(ids, answers, strict=True))

    async def shutdown(self) -> None:
        for replica in list(self.replicas.values()):
            self.drop(replica.replica_id)


def _kill(handle: Any) -> None:
    """Stop a replica's actor; one in the router's process is just let go."""
    if isinstance(handle, InlineDraftHandle):
        return
    with contextlib.suppress(RayError):  # already gone
        ray.kill(handle, no_restart=True)


async def _awaitable(ref: Any) -> Any:
    """An ObjectRef as a coroutine, so asyncio can wrap and time it."""
    return await ref
