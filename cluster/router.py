"""The router: an async Ray actor that runs propose → verify → accept rounds
over draft replicas and tensor-parallel target replicas.

It owns the request queue and every request's state (committed tokens,
sampling parameters and seed, the target and draft replica it is pinned to,
stats). Each lane (one, or two micro-batches with ``overlap``) loops:

1. at the round boundary: free cancelled requests, move requests off
   draining or broken replicas, re-attach drafts, admit waiting requests;
2. choose γ per request (load-aware) and
3. ask the draft replicas for proposals, all replicas at once, each call
   carrying the previous rounds' verdicts (how far to roll back): both in
   :mod:`specray.cluster.round_drafts`;
4. verify each target replica's share of the batch in one forward;
5. accept (lossless rejection sampling) and commit, both from
   :mod:`specray.actors.engine.round`;
6. stream each request's tokens to its caller.

The round's pure steps are the single-process engine's; only the transport
differs. A request moves between target replicas by re-prefilling its
committed tokens (verify from position 0) and between draft replicas by
starting again from them, so neither moves nor draft failures change greedy
output. Lost replicas are replaced by :mod:`specray.cluster.recovery` (a
target replica as a whole TP group); while none is up, requests wait for it
in the queue, with their committed tokens, within a bound.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ray
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from specray.actors.drafting.base import DraftProposal
from specray.actors.engine.engine import start_request, stream_round
from specray.actors.engine.gamma import SurvivalEstimate
from specray.actors.engine.request import GenerationRequest, RequestOutput
from specray.actors.engine.round import accept_drafts, commit, verify_inputs
from specray.actors.engine.target import VerifyOutput
from specray.actors.model.config import ModelConfig
from specray.cluster.costs import RoundCostModel
from specray.cluster.draft_pool import DraftPool, DraftPoolConfig, feed_profile_sizes
from specray.cluster.errors import TargetGroupError
from specray.cluster.metrics import RouterMetrics
from specray.cluster.recovery import Recovery, RecoveryConfig, RecoveryHooks
from specray.cluster.round_drafts import (
    DraftPaths,
    backlog_after,
    choose_gammas,
    fed_steps,
    propose,
    record_verdict,
)
from specray.cluster.router_state import (
    Footprint,
    RoundTimings,
    RouterHealth,
    RouterState,
    RouterTimings,
    ScaleReport,
)
from specray.cluster.target_group import ShardedTargetConfig
from specray.cluster.target_pool import TargetPool, profile_sizes
from specray.cluster.tracked import Tracked

log = logging.getLogger(__name__)


__all__ = [
    "RequestCancelledError",
    "Router",
    "RouterConfig",
    "RouterState",
    "RouterTimings",
    "ScaleReport",
    "launch_router",
    "open_stream",
]


class RequestCancelledError(RuntimeError):
    """The request was cancelled before it finished."""


@dataclass(frozen=True)
class RouterConfig:
    target: ShardedTargetConfig  # one target replica: a whole TP group
    draft: DraftPoolConfig | None = None  # None: target-only decoding
    num_targets: int = 1
    num_drafts: int = 1
    num_speculative_tokens: int = 4  # γ ceiling
    adaptive: bool = True  # False: always draft the ceiling
    overlap: bool = False  # two micro-batches: one drafts while the other verifies
    tokenizer_dir: str | None = None  # streams text when set
    eos_token_ids: tuple[int, ...] | None = None  # None: the target's config
    model_name: str = ""  # the metrics' model_name label; default: the target's folder
    metrics_port: int | None = None  # None: no endpoint; 0: any free port on 127.0.0.1
    profile: bool = True  # time verify sizes and draft feeds once the replicas are up
    reattach_drafts: bool = True  # after a draft replica dies; False: go on target-only
    num_threads: int | None = 1  # torch threads of the router's own process
    # Restarts of lost replicas, and how long requests wait for a target group.
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)

    def __post_init__(self) -> None:
        if self.num_targets < 1:
            raise ValueError(f"num_targets must be >= 1, got {self.num_targets}")
        if self.num_drafts < 0 or self.num_speculative_tokens < 0:
            raise ValueError("num_drafts and num_speculative_tokens must be >= 0")


class Router:
    """The router actor's body; :func:`launch_router` is where Ray wraps it."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self._tracked: dict[str, Tracked] = {}
        self._waiting: deque[str] = deque()
        self._targets = TargetPool(config.target, self._wake)
        self._pool: DraftPool | None = None
        self._lanes: list[dict[str, None]] = []  # ordered sets of request ids
        self._tasks: list[asyncio.Task[None]] = []
        self._costs = RoundCostModel(overlap=config.overlap)
        # per drafting path, the prior of new requests
        self._pool_alpha = {path: SurvivalEstimate(decay=0.98) for path in ("lookup", "model")}
        self._paths: DraftPaths | None = None  # set when a draft pool starts
        self._hidden_layers: tuple[int, ...] = ()
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._eos: tuple[int, ...] = ()
        self._metrics: RouterMetrics | None = None
        self._metrics_port: int | None = None
        self._work: asyncio.Event | None = None
        self._scale_lock: asyncio.Lock | None = None
        self._scaling = False
        self._started = False
        self._closed = False
        self._target_moves = 0
        self._draft_moves = 0
        self._recovery: Recovery | None = None  # made in start(), with the metrics
        self._timings = RoundTimings()

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> RouterState:
        """Start the replicas, the metrics endpoint and the round loops."""
        if self._started:
            return await self.state()
        config = self.config
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)  # the router's own process
        self._work = asyncio.Event()
        self._scale_lock = asyncio.Lock()
        # Blocking replica calls (verify, release, start-up) run in threads;
        # the default pool (cores + 4) is small enough to queue releases
        # behind verifies when several replicas and lanes are busy.
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=32, thread_name_prefix="router")
        )
        model_dir = Path(config.target.model_dir)
        if config.tokenizer_dir is not None:
            self._tokenizer = await asyncio.to_thread(
                AutoTokenizer.from_pretrained, config.tokenizer_dir
            )
        eos = config.eos_token_ids
        if eos is None:
            eos = tuple(ModelConfig.from_pretrained(model_dir).eos_token_ids)
            tok_eos = self._tokenizer.eos_token_id if self._tokenizer is not None else None
            if tok_eos is not None and tok_eos not in eos:
                eos += (int(tok_eos),)
        self._eos = eos
        self._metrics = RouterMetrics(
            config.model_name or model_dir.name, config.num_speculative_tokens
        )
        if config.metrics_port is not None:
            self._metrics_port = self._metrics.serve(config.metrics_port)
        starts: list[Any] = [self._targets.add() for _ in range(config.num_targets)]
        if config.draft is not None and config.num_speculative_tokens > 0:
            self._pool = DraftPool(config.draft)
            spec = config.draft.spec
            self._paths = DraftPaths(model=spec.catches_up, lookup=spec.looks_up)
            if config.num_drafts:
                starts.append(self._pool.add(config.num_drafts))
        await asyncio.gather(*starts)
        if config.profile:
            await self._profile()
        if self._pool is not None and self._pool.replicas:
            first = next(iter(self._pool.replicas.values()))
            self._hidden_layers = tuple(await first.handle.hidden_layers.remote())
        hooks = RecoveryHooks(self._unpin_draft, self._unpin_target, self._wake)
        self._recovery = Recovery(config.recovery, self._targets, self._pool, self._metrics, hooks)
        self._recovery.start(config.num_targets, config.num_drafts if self._pool else 0)
        lanes = 2 if config.overlap else 1
        self._lanes = [{} for _ in range(lanes)]
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._lane_loop(lane)) for lane in range(lanes)]
        self._started = True
        return await self.state()

    async def shutdown(self) -> None:
        """Fail what is left, stop the loops and every replica."""
        self._closed = True
        self._targets.close()  # before the restarts stop: a group starting is stopped
        if self._recovery is not None:
            await self._recovery.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for tracked in list(self._tracked.values()):
            tracked.chunks.put_nowait(RequestCancelledError("the router shut down"))
        self._tracked.clear()
        self._waiting.clear()
        await self._targets.shutdown()
        if self._pool is not None:
            await self._pool.shutdown()
        if self._metrics is not None:
            self._metrics.close()

    # -- requests ---------------------------------------------------------------

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Stream a request's chunks; call with ``num_returns="streaming"``.

        Cancelling the Ray task (``ray.cancel`` on its generator) cancels the
        request and frees its state on every actor.
        """
        tracked = self._submit(request)
        finished = False
        try:
            while not finished:
                item = await tracked.chunks.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self._cancel(request.request_id)

    async def generate(self, request: GenerationRequest) -> RequestOutput:
        """The whole output as one chunk."""
        token_ids: list[int] = []
        texts: list[str] = []
        last: RequestOutput | None = None
        async for chunk in self.generate_stream(request):
            token_ids += chunk.token_ids
            texts.append(chunk.text)
            last = chunk
        assert last is not None
        return replace(last, token_ids=token_ids, text="".join(texts))

    async def cancel(self, request_id: str) -> bool:
        """Cancel a request; False if it is unknown or already finished."""
        return self._cancel(request_id)

    # -- scaling ------------------------------------------------------------------

    async def scale(self, drafts: int | None = None, targets: int | None = None) -> ScaleReport:
        """Grow or shrink to ``drafts`` draft and ``targets`` target replicas.

        New replicas take new requests and a fair share of the running ones;
        removed replicas drain first: each of their requests moves at its next
        round boundary (re-prefill on a target, restart on a draft). Returns
        once removed replicas are empty and stopped.
        """
        assert self._scale_lock is not None
        if targets is not None and targets < 1:
            raise ValueError(f"targets must be >= 1, got {targets}")
        if drafts is not None and drafts < 0:
            raise ValueError(f"drafts must be >= 0, got {drafts}")
        if drafts and self._pool is None:
            raise ValueError("this router has no draft spec to scale")
        began = time.perf_counter()
        moves_before = (self._target_moves, self._draft_moves)
        async with self._scale_lock:
            self._scaling = True
            try:
                await self._scale(drafts, targets)
            finally:
                self._scaling = False
                self._wake()
        return ScaleReport(
            targets=len(self._targets.live),
            drafts=len(self._pool.live) if self._pool is not None else 0,
            target_moves=self._target_moves - moves_before[0],
            draft_moves=self._draft_moves - moves_before[1],
            seconds=time.perf_counter() - began,
        )

    async def _scale(self, drafts: int | None, targets: int | None) -> None:
        pool, target_pool = self._pool, self._targets
        assert self._recovery is not None
        self._recovery.want(targets, drafts)  # what a lost replica is replaced up to
        # Replicas already (re)starting count: they join without our help.
        add_targets = max(0, (targets or 0) - len(target_pool.live) - target_pool.starting)
        add_drafts = 0
        if pool is not None:
            add_drafts = max(0, (drafts or 0) - len(pool.live) - pool.starting)
        grow: list[Any] = [self._add_target() for _ in range(add_targets)]
        if pool is not None and add_drafts:
            grow.append(pool.add(add_drafts))
        try:
            await asyncio.gather(*grow)
        except BaseException:  # keep what did start; restore no further
            self._recovery.want(len(target_pool.live), len(pool.live) if pool is not None else None)
            raise
        if pool is not None and not self._hidden_layers and pool.replicas:
            first = next(iter(pool.replicas.values()))
            self._hidden_layers = tuple(await first.handle.hidden_layers.remote())

        draining_targets = []
        if targets is not None and targets < len(target_pool.live):
            draining_targets = target_pool.drain(len(target_pool.live) - targets)
        elif add_targets:
            for request_id in target_pool.rebalance():
                self._tracked[request_id].move_target = True
        draining_drafts = []
        if pool is not None and drafts is not None and drafts < len(pool.live):
            draining_drafts = pool.drain(len(pool.live) - drafts)
        elif pool is not None and add_drafts:
            for request_id in pool.rebalance():
                self._tracked[request_id].move_draft = True
        self._wake()

        # Lanes move their requests at round boundaries; requests without a
        # lane (waiting) are in no round, so their drafts move from here.
        while any(r.occupied for r in draining_targets) or any(r.requests for r in draining_drafts):
            for tracked in list(self._tracked.values()):
                if tracked.lane is None:
                    self._reconcile_draft(tracked)
            await asyncio.sleep(0.005)
        await asyncio.gather(*(target_pool.retire(r) for r in draining_targets))
        if pool is not None:
            await asyncio.gather(*(pool.retire(r) for r in draining_drafts))

    # -- introspection ---------------------------------------------------------------

    async def state(self) -> RouterState:
        assert self._recovery is not None
        recovery = self._recovery.state()
        drafts = await self._pool.describe() if self._pool is not None else ()
        return RouterState(
            waiting=len(self._waiting),
            running=sum(len(lane) for lane in self._lanes),
            targets=self._targets.describe(),
            drafts=drafts,
            target_moves=self._target_moves,
            draft_moves=self._draft_moves,
            draft_failures=recovery.draft_failures,
            metrics_port=self._metrics_port,
            verify_costs=self._costs.verify.as_dict(),
            draft_costs=self._costs.draft.as_dict(),
            recovery=recovery,
        )

    async def ping(self) -> bool:
        return True

    async def health(self) -> RouterHealth:
        """Live replica counts, from the router's own books (no replica is called)."""
        assert self._recovery is not None
        return self._recovery.health()

    async def footprint(self) -> Footprint:
        """Per-request state on every actor, as each reports it (leak checks)."""
        drafts = await self._pool.num_requests() if self._pool is not None else {}
        return Footprint(len(self._tracked), await self._targets.active_slots(), drafts)

    async def timings(self, reset: bool = False) -> RouterTimings:
        """Round phases and replica compute since the last reset."""
        replicas = list(self._targets.replicas.values())
        shard_stats = await asyncio.gather(
            *(asyncio.to_thread(r.target.stats, reset) for r in replicas)
        )
        drafts = await self._pool.stats(reset) if self._pool is not None else {}
        timings = RouterTimings(
            router=replace(self._timings),
            target_compute_s=sum(ranks[0].verify_s for ranks in shard_stats),
            draft_compute_s=sum(d.propose_s for d in drafts.values()),
        )
        if reset:
            self._timings = RoundTimings()
        return timings

    # -- the round loop ------------------------------------------------------------------

    async def _lane_loop(self, lane: int) -> None:
        assert self._work is not None
        while not self._closed:
            self._work.clear()
            self._boundary(lane)
            batch = [self._tracked[request_id] for request_id in self._lanes[lane]]
            if not batch:
                await self._work.wait()
                continue
            try:
                await self._round(batch)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # a bug must not take the other requests down
                log.exception("round failed")
                for tracked in batch:
                    if tracked.request_id in self._tracked:
                        self._fail(tracked, err)

    def _boundary(self, lane: int) -> None:
        """Between two rounds of a lane: apply cancels, moves and admissions."""
        for request_id in list(self._lanes[lane]):
            tracked = self._tracked[request_id]
            if tracked.cancelled:
                self._free(tracked)
                continue
            self._reconcile_target(tracked)
            self._reconcile_draft(tracked)
        self._admit(lane)
        assert self._recovery is not None
        down = self._recovery.targets_down_error() if self._waiting and not self._scaling else None
        if down is not None:  # None: a target replica is up, or worth waiting for
            for request_id in list(self._waiting):
                self._fail(self._tracked[request_id], down)
        self._update_gauges()

    def _reconcile_target(self, tracked: Tracked) -> None:
        pool = self._targets
        replica = pool.replicas.get(tracked.target) if tracked.target is not None else None
        if replica is not None and not replica.draining and not tracked.move_target:
            return
        tracked.move_target = False
        pool.release(tracked.target, tracked.request_id)
        tracked.run.cached_len = 0  # re-prefill wherever it lands
        new = pool.pick()
        if new is None:  # no room: back to the queue's front, state kept
            tracked.target = None
            assert tracked.lane is not None
            self._lanes[tracked.lane].pop(tracked.request_id, None)
            tracked.lane = None
            self._waiting.appendleft(tracked.request_id)
        else:
            tracked.target = new.replica_id
            pool.pin(new, tracked.request_id)
        self._target_moves += 1

    def _reconcile_draft(self, tracked: Tracked) -> None:
        pool = self._pool
        if pool is None or not tracked.wants_draft:
            return
        replica = pool.replicas.get(tracked.draft) if tracked.draft is not None else None
        if tracked.draft is not None and replica is None:
            tracked.draft = None  # its replica failed; already counted as a fallback
        moving = replica is not None and (replica.draining or tracked.move_draft)
        if moving:
            pool.detach(tracked.draft, [tracked.request_id])
            tracked.draft = None
        tracked.move_draft = False
        if tracked.draft is not None:
            return
        if tracked.run.stats.fallback and not self.config.reattach_drafts:
            return
        new = pool.pick()
        if new is None:
            return
        tracked.updates.clear()  # the new state starts from every committed token
        pool.attach(new, tracked.request_id, tracked.run.tokens, tracked.run.sampling)
        tracked.draft_backlog = len(tracked.run.tokens)
        tracked.draft = new.replica_id
        if moving:
            self._draft_moves += 1

    def _admit(self, lane: int) -> None:
        others = [len(self._lanes[i]) for i in range(len(self._lanes)) if i != lane]
        while self._waiting and (not others or len(self._lanes[lane]) <= min(others)):
            replica = self._targets.pick()
            if replica is None:
                return
            tracked = self._tracked[self._waiting.popleft()]
            tracked.target = replica.replica_id
            self._targets.pin(replica, tracked.request_id)
            tracked.lane = lane
            self._lanes[lane][tracked.request_id] = None
            self._reconcile_draft(tracked)

    async def _round(self, batch: list[Tracked]) -> None:
        began = time.perf_counter()
        choose_gammas(batch, self._paths, self.config.adaptive, self._costs)
        proposing = time.perf_counter()
        drafts = await self._propose(batch)
        verifying = time.perf_counter()
        # Grouped after drafting: another lane may have lost a target meanwhile.
        groups: dict[int | None, list[int]] = {}
        for i, tracked in enumerate(batch):
            groups.setdefault(tracked.target, []).append(i)
        verified = await asyncio.gather(
            *(
                self._verify(target_id, [batch[i] for i in idx], [drafts[i] for i in idx])
                for target_id, idx in groups.items()
            )
        )
        verified_at = time.perf_counter()
        survivors: list[Tracked] = []
        kept_drafts: list[DraftProposal] = []
        outputs: list[VerifyOutput] = []
        for idx, outs in zip(groups.values(), verified, strict=True):
            if outs is None:
                continue
            survivors += [batch[i] for i in idx]
            kept_drafts += [drafts[i] for i in idx]
            outputs += outs
        if not survivors:
            return
        runs = [t.run for t in survivors]
        rejection = accept_drafts(runs, kept_drafts, outputs)
        updates = commit(runs, kept_drafts, outputs, rejection)
        assert self._metrics is not None
        self._metrics.observe_round(rejection)
        for tracked, draft, update, new_ids in zip(
            survivors, kept_drafts, updates, rejection.output_token_ids, strict=True
        ):
            if len(draft):
                pool_alpha = self._pool_alpha["lookup" if draft.from_lookup else "model"]
                pool_alpha.update(len(draft), update.num_accepted)
            if tracked.draft is not None:
                record_verdict(tracked, draft, update.num_accepted)
                tracked.updates.append(update)
                fed = 0 if draft.from_lookup else len(draft)
                tracked.draft_backlog = backlog_after(tracked.draft_backlog, fed, update)
            self._emit(tracked, stream_round(tracked.run, new_ids))
        ended = time.perf_counter()
        timings = self._timings
        timings.rounds += 1
        timings.request_rounds += len(survivors)
        timings.round_s += ended - began
        timings.propose_s += verifying - proposing
        timings.verify_s += verified_at - verifying
        timings.local_s += (proposing - began) + (ended - verified_at)

    async def _propose(self, batch: Sequence[Tracked]) -> list[DraftProposal]:
        proposals = await propose(self._pool, batch)
        for replica_id, error in proposals.failures.items():
            self._draft_failed(replica_id, error)
        elapsed = proposals.elapsed_s
        if elapsed is not None and not proposals.failures:
            # Timed as the model's call when a model drafted (a hybrid's
            # copies in the same call cost next to nothing), else the copies'.
            model_steps = fed_steps(batch, proposals.drafts)
            if model_steps:
                self._costs.draft.observe(model_steps, elapsed)
            else:
                self._costs.lookup.observe(fed_steps(batch, proposals.drafts, True), elapsed)
        return proposals.drafts

    async def _verify(
        self, target_id: int | None, group: list[Tracked], drafts: list[DraftProposal]
    ) -> list[VerifyOutput] | None:
        """One target replica's share of the round; None if it failed."""
        replica = self._targets.replicas.get(target_id) if target_id is not None else None
        if replica is None:  # broke while this round was drafting
            self._lost_target(target_id, group)
            return None
        inputs = verify_inputs([t.run for t in group], drafts)
        num_tokens = sum(len(item.token_ids) for item in inputs)
        began = time.perf_counter()
        try:
            outputs = await asyncio.to_thread(replica.target.verify, inputs, self._hidden_layers)
        except TargetGroupError as err:
            assert self._recovery is not None
            self._recovery.target_failed(replica.replica_id, err)  # gang restart
            self._lost_target(target_id, group)
            for tracked in group:  # replayed, unless it keeps breaking groups
                tracked.replays += 1
                if tracked.replays > self.config.recovery.max_replays:
                    self._fail(tracked, err)
            return None
        except Exception as err:  # every shard refused it alike: the requests' fault
            for tracked in group:
                self._fail(tracked, err)
            return None
        self._costs.verify.observe(num_tokens, time.perf_counter() - began)
        return outputs

    def _lost_target(self, target_id: int | None, group: Sequence[Tracked]) -> None:
        """Requests of a broken target replica re-prefill elsewhere; the ones in
        this round also restart their drafts, which drafted without a verdict."""
        for tracked in self._tracked.values():
            if target_id is not None and tracked.target == target_id:
                tracked.target = None
                tracked.run.cached_len = 0
        for tracked in group:
            tracked.move_draft = True

    def _unpin_target(self, target_id: int) -> None:
        """The watch found a target replica dead: its requests re-prefill elsewhere."""
        self._lost_target(target_id, ())
        self._wake()

    def _draft_failed(self, replica_id: int, why: object) -> None:
        assert self._recovery is not None
        self._recovery.draft_failed(replica_id, why)  # no-op if another lane saw it first
        self._unpin_draft(replica_id)

    def _unpin_draft(self, replica_id: int) -> None:
        """A draft replica is lost: its requests go target-only until they
        re-attach elsewhere at their next boundary."""
        fallbacks = 0
        for tracked in self._tracked.values():
            if tracked.draft == replica_id:
                tracked.draft = None
                tracked.updates = []
                fallbacks += not tracked.run.stats.fallback
                tracked.run.stats.fallback = True
        if fallbacks and self._recovery is not None:
            self._recovery.count_fallbacks(fallbacks)
        self._wake()

    # -- per-request bookkeeping ----------------------------------------------------------

    def _submit(self, request: GenerationRequest) -> Tracked:
        if not self._started or self._closed:
            raise RuntimeError("the router is not running (call start() first)")
        if request.request_id in self._tracked:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if not request.prompt_ids:
            raise ValueError("prompt_ids must not be empty")
        run = start_request(request, self._eos, self._tokenizer, self.config.num_speculative_tokens)
        tracked = Tracked(
            run,
            asyncio.Queue(),
            lookup_acceptance=SurvivalEstimate.with_prior(self._pool_alpha["lookup"].alpha),
            model_acceptance=SurvivalEstimate.with_prior(self._pool_alpha["model"].alpha),
        )
        self._tracked[request.request_id] = tracked
        self._waiting.append(request.request_id)
        self._update_gauges()
        self._wake()
        return tracked

    def _emit(self, tracked: Tracked, output: RequestOutput) -> None:
        assert self._metrics is not None
        now = time.perf_counter()
        stats = copy.copy(output.stats)  # later rounds keep mutating the live one
        if output.token_ids:
            if tracked.last_chunk_at is None:
                self._metrics.observe_first_token(now - stats.created_at)
            else:
                self._metrics.observe_inter_token(now - tracked.last_chunk_at)
            tracked.last_chunk_at = now
        tracked.chunks.put_nowait(replace(output, stats=stats))
        if output.finished:
            self._metrics.observe_finished(now - stats.created_at)
            self._free(tracked)

    def _cancel(self, request_id: str) -> bool:
        tracked = self._tracked.get(request_id)
        if tracked is None or tracked.cancelled:
            return False
        tracked.cancelled = True
        tracked.chunks.put_nowait(RequestCancelledError(f"request {request_id!r} was cancelled"))
        if tracked.lane is None:  # not in any round: free now
            self._free(tracked)
        self._wake()  # an idle lane frees it at its boundary
        return True

    def _fail(self, tracked: Tracked, err: BaseException) -> None:
        tracked.chunks.put_nowait(err)
        self._free(tracked)

    def _free(self, tracked: Tracked) -> None:
        """Drop a request everywhere: lane, queue, target slot and draft state."""
        request_id = tracked.request_id
        self._tracked.pop(request_id, None)
        if tracked.lane is not None:
            self._lanes[tracked.lane].pop(request_id, None)
            tracked.lane = None
        if request_id in self._waiting:
            self._waiting.remove(request_id)
        self._targets.release(tracked.target, request_id)
        tracked.target = None
        if self._pool is not None and tracked.draft is not None:
            self._pool.detach(tracked.draft, [request_id])
        tracked.draft = None
        self._update_gauges()
        self._wake()

    def _wake(self) -> None:
        """Something a lane may act on changed: a request, a slot, a replica."""
        if self._work is not None:
            self._work.set()

    async def _profile(self) -> None:
        """The cost curves' shapes, timed once every replica is up and one
        after the other: a profile taken while another replica loads or
        profiles reads that one's load too (on shared cores a draft step
        timed during the target's profile came out several times too slow,
        and the scheduler never drafted)."""
        target = self.config.target
        sizes = profile_sizes(target.num_slots, self.config.num_speculative_tokens, target.max_len)
        self._costs.verify.set_profile(await self._targets.profile(sizes))
        if self._pool is not None:
            feeds = feed_profile_sizes(self._pool.config.spec.max_len)
            self._costs.draft.set_profile(await self._pool.profile(feeds))

    async def _add_target(self) -> None:
        config = self.config
        sizes: list[int] = []
        if config.profile:
            target = config.target
            sizes = profile_sizes(target.num_slots, config.num_speculative_tokens, target.max_len)
        self._costs.verify.set_profile(await self._targets.add(sizes))

    def _update_gauges(self) -> None:
        if self._metrics is not None:
            running = sum(len(lane) for lane in self._lanes)
            self._metrics.set_queues(running, len(self._waiting))


# The router's actor subtree (it starts the target shards and draft actors,
# which inherit its runtime environment) runs with:
ROUTER_ENV = {
    # Its blocking Ray calls run in worker threads (asyncio.to_thread), which
    # Ray's blocking-get-in-async-actor warning cannot tell apart.
    "RAY_WARN_BLOCKING_GET_INSIDE_ASYNC": "0",
    # CPU tensors travel as numpy byte views, out of band: 16 requests' verify
    # logits (49 MB) took 59 ms instead of 307 ms here. Received tensors are
    # then read-only shared memory: nothing on the round's path writes to
    # them in place, and a drafter that wants to must copy first.
    "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1",
}


def launch_router(config: RouterConfig, **options: Any) -> Any:
    """Create the router actor (the one place ``ray.remote`` wraps it) and start it.

    ``options`` go to ``.options()`` (e.g. ``name``); the router itself takes
    no CPU from Ray's accounting: it mostly waits on its replicas.
    """
    runtime_env = dict(options.pop("runtime_env", None) or {})
    runtime_env["env_vars"] = {**ROUTER_ENV, **runtime_env.get("env_vars", {})}
    actor: Any = ray.remote(Router)
    actor = actor.options(num_cpus=0, max_concurrency=1000, runtime_env=runtime_env, **options)
    handle = actor.remote(config)
    ray.get(handle.start.remote())
    return handle


def open_stream(router: Any, request: GenerationRequest) -> Any:
    """The ObjectRefGenerator of a streamed request: iterate it and ``ray.get``
    (or ``await``) each ref for a :class:`RequestOutput`."""
    return router.generate_stream.options(num_returns="streaming").remote(request)
