"""The router: an async Ray actor that runs speculative rounds over draft
replicas and tensor-parallel target replicas.

This module is its surface — configuration, start and shutdown, the
request calls, scaling and introspection — and the wiring of its parts,
which share one :class:`~specray.cluster.fleet.Fleet` (the replica pools,
the metrics and the inbox):

- :class:`~specray.cluster.request_table.RequestTable`: every request, the
  waiting queue and the lanes' members; where requests enter and leave;
- :class:`~specray.cluster.lanes.Lanes`: the round loops. Each round is
  :func:`~specray.actors.engine.round.speculative_round`, the function the
  in-process engine runs, through the Ray ports of :mod:`specray.cluster.ports`;
- :class:`~specray.cluster.scaling.Scaler`: growing, shrinking, profiling;
- :class:`~specray.cluster.recovery.Recovery`: replacing lost replicas (a
  target replica as a whole TP group) and bounding how long requests wait
  for a target; losses reach the lanes as events (:mod:`specray.cluster.events`).

A request moves between target replicas by re-prefilling its committed
tokens and between draft replicas by starting again from them, so neither
moves nor draft failures change greedy output.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ray
import torch

from specray.actors.engine.errors import NotRunningError
from specray.actors.engine.feeds import DEFAULT_MAX_BATCHED_TOKENS
from specray.actors.engine.lifecycle import grammar_for, start_request
from specray.actors.engine.request import GenerationRequest, RequestOutput
from specray.actors.engine.scheduling import GammaScheduler
from specray.actors.engine.tokenizer import eos_token_ids, load_tokenizer
from specray.actors.engine.verify_budget import DEFAULT_FLOOR, BudgetSizing
from specray.actors.model.config import ModelConfig
from specray.actors.sampling.grammar import GrammarCompiler
from specray.cluster.draft_pool import DraftPool, DraftPoolConfig
from specray.cluster.events import Inbox
from specray.cluster.fleet import Fleet
from specray.cluster.lanes import Lanes
from specray.cluster.metrics import RouterMetrics
from specray.cluster.ports import PoolDrafting, PoolVerifying
from specray.cluster.recovery import Recovery, RecoveryConfig
from specray.cluster.request_table import RequestTable
from specray.cluster.router_state import (
    Footprint,
    RoundTimings,
    RouterHealth,
    RouterState,
    RouterTimings,
    ScaleReport,
    StartupTimes,
    describe_weights,
)
from specray.cluster.scaling import ProfilePlan, Scaler
from specray.cluster.target_group_config import ShardedTargetConfig
from specray.cluster.target_pool import TargetPool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouterConfig:
    target: ShardedTargetConfig  # one target replica: a whole TP group
    draft: DraftPoolConfig | None = None  # None: target-only decoding
    num_targets: int = 1
    num_drafts: int = 1
    num_speculative_tokens: int = 4  # γ ceiling
    adaptive: bool = True  # False: always draft the ceiling
    # Tokens a target replica feeds per round: prompts prefill in chunks
    # beside the decoding requests. None: every prompt in one round.
    max_batched_tokens: int | None = DEFAULT_MAX_BATCHED_TOKENS
    # How the verify budget sizes a batch: "fresh" or "stale" (verify_budget.py).
    budget_sizing: BudgetSizing = "fresh"
    # The least share of its rate without speculation the verify budget
    # leaves any request of a batch; 0: off (verify_budget.py).
    budget_floor: float = DEFAULT_FLOOR
    overlap: bool = False  # two micro-batches: one drafts while the other verifies
    # Admit a request where its prefix is likely cached (cluster/affinity.py);
    # False: on the least occupied target replica.
    prefix_affinity: bool = True
    tokenizer_dir: str | None = None  # streams text when set
    eos_token_ids: tuple[int, ...] | None = None  # None: the target's config and tokenizer
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


@dataclass
class _Parts:
    """What :meth:`Router.start` builds."""

    table: RequestTable
    lanes: Lanes
    scaler: Scaler
    recovery: Recovery
    tasks: list[asyncio.Task[None]]


class Router:
    """The router actor's body; :func:`launch_router` is where Ray wraps it."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self._parts: _Parts | None = None
        self._fleet: Fleet | None = None
        self._tokenizer: Any = None
        self._eos: tuple[int, ...] = ()
        self._grammars: GrammarCompiler | None = None  # structured output
        self._metrics_port: int | None = None
        self._closed = False
        self._startup: StartupTimes | None = None

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> RouterState:
        """Start the replicas, the metrics endpoint and the round loops."""
        if self._parts is not None:
            return await self.state()
        began = time.perf_counter()
        config = self.config
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)  # the router's own process
        # Blocking replica calls (verify, release, start-up) run in threads;
        # the default pool (cores + 4) is small enough to queue releases
        # behind verifies when several replicas and lanes are busy.
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=32, thread_name_prefix="router")
        )
        model_dir = Path(config.target.model.model_dir)
        if config.tokenizer_dir is not None:
            self._tokenizer = await asyncio.to_thread(load_tokenizer, Path(config.tokenizer_dir))
        model_config = ModelConfig.from_pretrained(model_dir)
        self._eos = config.eos_token_ids or eos_token_ids(model_config, self._tokenizer)
        if self._tokenizer is not None:
            self._grammars = GrammarCompiler(self._tokenizer, model_config.vocab_size)
        metrics = RouterMetrics(config.model_name or model_dir.name, config.num_speculative_tokens)
        if config.metrics_port is not None:
            self._metrics_port = metrics.serve(config.metrics_port)

        inbox = Inbox()
        targets = TargetPool(config.target, inbox, config.prefix_affinity)
        drafts = None
        if config.draft is not None and config.num_speculative_tokens > 0:
            drafts = DraftPool(config.draft)
        self._fleet = fleet = Fleet(targets, drafts, metrics, inbox)
        starts: list[Any] = [targets.add() for _ in range(config.num_targets)]
        if drafts is not None and config.num_drafts:
            starts.append(drafts.add(config.num_drafts))
        await asyncio.gather(*starts)
        replicas_s = time.perf_counter() - began

        recovery = Recovery(config.recovery, fleet)
        lanes_count = 2 if config.overlap else 1
        table = RequestTable(fleet, lanes_count)
        drafting = PoolDrafting(drafts, recovery) if drafts is not None else None
        verifying = PoolVerifying(targets, recovery, table, config.recovery.max_replays)
        scheduler = GammaScheduler(
            config.draft.spec.drafter.paths if drafts is not None and config.draft else None,
            config.adaptive,
            max_batched_tokens=config.max_batched_tokens,
            budget_sizing=config.budget_sizing,
            budget_floor=config.budget_floor,
        )
        scheduler.costs.overlap = config.overlap
        lanes = Lanes(
            table, fleet, recovery, scheduler, (drafting, verifying), config.reattach_drafts
        )
        plan = ProfilePlan(
            config.profile,
            config.target.model.num_slots,
            config.num_speculative_tokens,
            config.target.model.max_len,
            config.max_batched_tokens,
        )
        scaler = Scaler(fleet, drafting, recovery, lanes, scheduler.costs, plan)
        profile = await scaler.profile()
        await scaler.read_hidden_layers()
        self._startup = StartupTimes(replicas_s, profile, time.perf_counter() - began)
        recovery.start(config.num_targets, config.num_drafts if drafts is not None else 0)
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(lanes.run(lane)) for lane in range(lanes_count)]
        self._parts = _Parts(table, lanes, scaler, recovery, tasks)
        return await self.state()

    async def shutdown(self) -> None:
        """Fail what is left, stop the loops and every replica."""
        self._closed = True
        parts, fleet = self._parts, self._fleet
        if fleet is not None:
            fleet.targets.close()  # before the restarts stop: a group starting is stopped
        if parts is not None:
            await parts.recovery.close()
            parts.lanes.closed = True
            for task in parts.tasks:
                task.cancel()
            await asyncio.gather(*parts.tasks, return_exceptions=True)
            parts.table.close("the router shut down")
        if fleet is not None:
            await fleet.targets.shutdown()
            if fleet.drafts is not None:
                await fleet.drafts.shutdown()
            if parts is not None:
                fleet.metrics.close()

    # -- requests ---------------------------------------------------------------

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Stream a request's chunks; call with ``num_returns="streaming"``.

        Cancelling the Ray task (``ray.cancel`` on its generator) cancels the
        request and frees its state on every actor.
        """
        parts = self._running()
        run = start_request(
            request,
            self._eos,
            self._tokenizer,
            self.config.num_speculative_tokens,
            parts.lanes.scheduler.new_draft_state(),
            # Compiled on a worker thread: the first one also builds the
            # grammar engine's view of the vocabulary (seconds).
            await asyncio.to_thread(grammar_for, request, self._grammars),
        )
        tracked = parts.table.submit(run)
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
                parts.table.cancel(request.request_id)

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
        return self._running().table.cancel(request_id)

    async def scale(self, drafts: int | None = None, targets: int | None = None) -> ScaleReport:
        """Grow or shrink to ``drafts`` draft and ``targets`` target replicas
        (see :mod:`specray.cluster.scaling`)."""
        return await self._running().scaler.scale(drafts, targets)

    # -- introspection ---------------------------------------------------------------

    async def state(self) -> RouterState:
        parts, fleet = self._running(), self._fleet
        assert fleet is not None
        recovery = parts.recovery.state()
        drafts = await fleet.drafts.describe() if fleet.drafts is not None else ()
        costs = parts.lanes.scheduler.costs
        return RouterState(
            waiting=len(parts.table.waiting),
            running=parts.table.num_running,
            targets=fleet.targets.describe(),
            drafts=drafts,
            target_moves=parts.lanes.moves.target,
            draft_moves=parts.lanes.moves.draft,
            draft_failures=recovery.draft_failures,
            metrics_port=self._metrics_port,
            verify_costs=costs.verify.as_dict(),
            draft_costs=costs.draft.as_dict(),
            recovery=recovery,
            copy_estimates=parts.lanes.scheduler.budget.describe(),
            startup=self._startup,
            weights=loaded_weights(self.config),
        )

    async def ping(self) -> bool:
        return True

    async def health(self) -> RouterHealth:
        """Live replica counts, from the router's own books (no replica is called)."""
        return self._running().recovery.health()

    async def footprint(self) -> Footprint:
        """Per-request state on every actor, as each reports it (leak checks)."""
        parts, fleet = self._running(), self._fleet
        assert fleet is not None
        drafts = await fleet.drafts.num_requests() if fleet.drafts is not None else {}
        draft_pins = await fleet.drafts.prefix_pins() if fleet.drafts is not None else {}
        return Footprint(
            len(parts.table.tracked),
            await fleet.targets.active_slots(),
            drafts,
            await fleet.targets.prefix_pins(),
            draft_pins,
        )

    async def timings(self, reset: bool = False) -> RouterTimings:
        """Round phases and replica compute since the last reset."""
        parts, fleet = self._running(), self._fleet
        assert fleet is not None
        replicas = list(fleet.targets.replicas.values())
        shard_stats = await asyncio.gather(
            *(asyncio.to_thread(r.target.stats, reset) for r in replicas)
        )
        drafts = await fleet.drafts.stats(reset) if fleet.drafts is not None else {}
        timings = RouterTimings(
            router=replace(parts.lanes.timings),
            target_compute_s=sum(ranks[0].verify_s for ranks in shard_stats),
            draft_compute_s=sum(d.propose_s for d in drafts.values()),
        )
        if reset:
            parts.lanes.timings = RoundTimings()
        return timings

    def _running(self) -> _Parts:
        if self._parts is None or self._closed:
            raise NotRunningError("the router is not running (call start() first)")
        return self._parts


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
    state: RouterState = ray.get(handle.start.remote())
    if state.startup is not None:
        weights = describe_weights(state.weights)
        log.info("router started in %s; weights: %s", state.startup.describe(), weights)
    return handle


def loaded_weights(config: RouterConfig) -> dict[str, str]:
    """The weights each kind of replica loads: format (model dtype)."""
    model = config.target.model
    weights = {"target": f"{model.weights} ({model.dtype})"}
    if config.draft is not None and config.draft.spec.drafter.model is not None:
        spec = config.draft.spec
        weights["draft"] = f"{spec.weights} ({spec.dtype})"
    return weights


def open_stream(router: Any, request: GenerationRequest) -> Any:
    """The ObjectRefGenerator of a streamed request: iterate it and ``ray.get``
    (or ``await``) each ref for a :class:`RequestOutput`."""
    return router.generate_stream.options(num_returns="streaming").remote(request)
