"""A :class:`~specray.deploy.backend.Backend` over the router actor.

Each request is one streaming call of ``Router.generate_stream``: its
``ObjectRefGenerator`` is iterated and each ref awaited on the caller's event
loop, so nothing here blocks and no thread is involved. Errors cross the Ray
boundary in one place, :func:`_cause`: what the router raised is taken out
of Ray's wrapper and keeps its class, which the error table maps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError
from transformers import PreTrainedTokenizerBase

from specray.actors.drafting.build import resolve_drafter
from specray.actors.engine.tokenizer import has_tokenizer, load_tokenizer
from specray.actors.model.config import ModelConfig
from specray.actors.model.prefix_cache import prefix_tokens
from specray.actors.store.weights_dir import weights_dir
from specray.actors.workers.draft_worker import DraftWorkerSpec
from specray.actors.workers.shard_model import ShardModel
from specray.cluster.draft_pool import DraftPoolConfig
from specray.cluster.local_ray import start_ray
from specray.cluster.recovery import RecoveryConfig
from specray.cluster.router import RouterConfig, launch_router, open_stream
from specray.cluster.router_state import RouterHealth, RouterState, RouterTimings
from specray.cluster.target_group_config import ShardedTargetConfig
from specray.deploy.backend import Backend, Chunk, ModelInfo, model_info
from specray.deploy.config import RouterSettings, ServeConfig
from specray.deploy.conversion import chunk_from_output, generation_request
from specray.deploy.errors import (
    UnavailableError,
)
from specray.deploy.replicas import ReplicaState
from specray.deploy.validation import ValidatedRequest, Validator
from specray.deploy.weights_choice import planned_router
from specray.deploy.weights_config import weight_source

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouterAttachment:
    """What a front door needs to serve through a router someone else launched
    (the Ray Serve router holder hands this to its ingress)."""

    router: Any  # the router's ActorHandle
    info: ModelInfo
    tokenizer: PreTrainedTokenizerBase | None
    num_slots: int  # requests one target replica batches
    num_targets: int  # target replicas when attached


class RouterBackend:
    """Serves through the router actor; at most ``targets × num_slots``
    requests run at once."""

    def __init__(
        self,
        attachment: RouterAttachment,
        health_timeout_s: float = 10.0,
        owns_router: bool = True,
    ) -> None:
        """``owns_router``: :meth:`close` shuts the router down."""
        self._router = attachment.router
        self._info = attachment.info
        self._num_slots = attachment.num_slots
        self._num_targets = attachment.num_targets
        self._health_timeout_s = health_timeout_s
        self._owns_router = owns_router
        self._closed = False
        self._healthy = True

    @property
    def router(self) -> Any:
        """The router's ActorHandle (for introspection: ``router.state.remote()``)."""
        return self._router

    # -- Backend -------------------------------------------------------------

    async def generate(self, request: ValidatedRequest) -> AsyncIterator[Chunk]:
        if self._closed:
            raise UnavailableError("the server is shutting down")
        request_id = request.request_id
        began = time.perf_counter()
        stream = open_stream(self._router, generation_request(request))
        finished = False
        while not finished:
            try:
                output = await (await anext(stream))
            except StopAsyncIteration:
                raise UnavailableError(
                    f"the router ended request {request_id!r} without finishing it"
                ) from None
            except Exception as error:  # the router freed it when it raised
                if self._closed:  # the router shut down under it
                    raise UnavailableError("the server is shutting down") from error
                raise _cause(error) from error
            chunk = chunk_from_output(output, request.prompt_tokens, time.perf_counter() - began)
            finished = chunk.finished
            yield chunk

    async def cancel(self, request_id: str) -> None:
        # The stream then raises the router's cancellation, mapped to ours.
        with contextlib.suppress(RayError, TimeoutError):
            await asyncio.wait_for(self._router.cancel.remote(request_id), self._health_timeout_s)

    def model_info(self) -> ModelInfo:
        return self._info

    async def health(self) -> bool:
        """The router answers and at least one target replica takes requests:
        NOT_SERVING while every target group is down (e.g. being restarted)."""
        if self._closed:
            return False
        try:
            health: RouterHealth = await asyncio.wait_for(
                self._router.health.remote(), self._health_timeout_s
            )
        except Exception as error:
            self._report_health(False, f"the router does not answer: {error!r}")
            return False
        self._num_targets = health.targets_up
        self._report_health(health.serving, "no target replica is up")
        return health.serving

    async def scale(self, drafts: int, targets: int) -> None:
        """Add or drain replicas; returns once removed ones are stopped."""
        try:
            await self._router.scale.remote(drafts=drafts, targets=targets)
        except Exception as error:
            raise _cause(error) from error
        finally:
            with contextlib.suppress(Exception):
                self._num_targets = _live_targets(await self._state())

    async def replicas(self) -> ReplicaState:
        try:
            state = await self._state()
        except Exception as error:
            raise _cause(error) from error
        self._num_targets = _live_targets(state)
        return ReplicaState(
            backend="router",
            drafts=sum(not d.draining for d in state.drafts),
            targets=self._num_targets,
            tensor_parallel_size=self._info.tensor_parallel_size,
            expert_parallel_size=self._info.expert_parallel_size,
            running=state.running,
            waiting=state.waiting,
            target_moves=state.target_moves,
            draft_moves=state.draft_moves,
        )

    def capacity(self) -> int:
        return max(self._num_targets, 1) * self._num_slots

    async def diagnostics(self, reset_rounds: bool = False) -> dict[str, Any]:
        """The router's cost models, shared copy estimates and replica losses
        now, and its rounds since the last reset (``reset_rounds``: start
        afresh after)."""
        try:
            state = await self._state()
            timings: RouterTimings = await self._router.timings.remote(reset_rounds)
        except Exception as error:
            raise _cause(error) from error
        return {
            "weights": state.weights,
            "verify_costs": state.verify_costs,
            "draft_costs": state.draft_costs,
            "copy_estimates": state.copy_estimates,
            "recovery": {
                "draft_failures": state.recovery.draft_failures,
                "target_failures": state.recovery.target_failures,
            },
            "rounds": asdict(timings.router)
            | {
                "target_compute_s": timings.target_compute_s,
                "draft_compute_s": timings.draft_compute_s,
            },
        }

    async def close(self) -> None:
        """Stop the router (when owned); requests still in flight fail as unavailable."""
        self._closed = True
        if self._owns_router:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._router.shutdown.remote(), self._health_timeout_s)
            with contextlib.suppress(Exception):
                ray.kill(self._router, no_restart=True)

    # -- internals -------------------------------------------------------------

    def _report_health(self, healthy: bool, why: str) -> None:
        """Log health transitions only: it is polled every second."""
        if healthy != self._healthy:
            if healthy:
                log.info("the router is healthy again")
            else:
                log.warning("unhealthy: %s", why)
        self._healthy = healthy

    async def _state(self) -> RouterState:
        state: RouterState = await self._router.state.remote()
        return state


def _live_targets(state: RouterState) -> int:
    return sum(not t.draining for t in state.targets)


def _cause(error: BaseException) -> BaseException:
    """What the router raised, out of Ray's wrapper; the error table maps it.
    A router that is gone is unavailable."""
    if isinstance(error, RayActorError):
        return UnavailableError("the router is down; retry later")
    cause = error.cause if isinstance(error, RayTaskError) else error
    return cause if isinstance(cause, BaseException) else error


# -- building -------------------------------------------------------------------


def router_config(settings: RouterSettings, home: Path | None = None) -> RouterConfig:
    """The router's config, with registered model names resolved in the store
    (in the model dtype, so a bf16 router loads the store's bf16 copy; a
    gguf one a directory holding the GGUF file). Weights left ``auto`` and
    an unset ``tp`` are planned here (the probe) unless planned before."""
    settings = planned_router(settings, home)
    dtype = settings.model_dtype
    target_dir = weights_dir(settings.target, weight_source(settings.weights), dtype, home)
    model = ShardModel(
        str(target_dir),
        dtype=dtype,
        weights=weight_source(settings.weights),
        num_slots=settings.num_slots,
        max_len=settings.max_len,
        prefix_tokens=prefix_tokens(
            settings.prefix_cache_tokens, settings.num_slots, settings.max_len
        ),
    )
    target = ShardedTargetConfig(
        model,
        tp=settings.planned_tp,
        ep=settings.ep,
        strategy=settings.strategy,
        threads_per_shard=settings.threads_per_shard,
        cpus_per_shard=settings.cpus_per_shard,
        gpus_per_shard=settings.gpus_per_shard,
        timeout_s=settings.timeout_s,
        start_timeout_s=settings.start_timeout_s,
    )
    draft = None
    drafter = settings.drafter
    if drafter is not None:
        draft_dtype = drafter.dtype or dtype
        num_slots = drafter.num_slots or settings.num_slots
        spec = DraftWorkerSpec(
            drafter=resolve_drafter(drafter.spec, home, draft_dtype, drafter.weights),
            dtype=draft_dtype,
            weights=drafter.weights,
            num_slots=num_slots,
            max_len=settings.max_len,
            num_threads=drafter.threads,
            target_dir=str(target_dir),
            prefix_tokens=prefix_tokens(settings.prefix_cache_tokens, num_slots, settings.max_len),
        )
        draft = DraftPoolConfig(
            spec,
            num_cpus=drafter.cpus,
            start_timeout_s=settings.start_timeout_s,
            affinity=settings.prefix_affinity,
            placement=drafter.placed,
        )
    return RouterConfig(
        target=target,
        draft=draft,
        num_targets=settings.num_targets,
        num_drafts=settings.num_drafts if draft is not None else 0,
        num_speculative_tokens=settings.k,
        adaptive=settings.adaptive,
        budget_sizing=settings.budget_sizing,
        budget_floor=settings.budget_floor,
        max_batched_tokens=settings.max_num_batched_tokens,
        overlap=settings.overlap,
        prefix_affinity=settings.prefix_affinity,
        tokenizer_dir=str(target_dir) if has_tokenizer(target_dir) else None,
        model_name=Path(settings.target).name,
        metrics_port=settings.metrics_port,
        profile=settings.profile,
        recovery=RecoveryConfig(target_restart_timeout_s=settings.target_restart_timeout_s),
    )


def launch(settings: RouterSettings, home: Path | None = None, **options: Any) -> RouterAttachment:
    """Resolve the models and start a router on the connected Ray (blocking);
    ``options`` go to :func:`launch_router`."""
    settings = planned_router(settings, home)
    config = router_config(settings, home)
    drafter = settings.drafter
    info = model_info(
        settings.target,
        drafter.spec if drafter is not None else None,
        ModelConfig.from_pretrained(Path(config.target.model.model_dir)),
        settings.max_len,
        settings.model_dtype,
        settings.planned_tp,
        settings.k,
        settings.ep,
    )
    tokenizer = load_tokenizer(Path(config.tokenizer_dir)) if config.tokenizer_dir else None
    router = launch_router(config, **options)
    return RouterAttachment(router, info, tokenizer, settings.num_slots, settings.num_targets)


def embedded_ray_cpus(settings: RouterSettings) -> int:
    """Logical CPUs for an embedded Ray: room for twice the configured
    replicas, so ``specray scale`` can grow on one machine. They are only
    placement units: the replicas' threads are set separately."""
    if settings.ray_num_cpus is not None:
        return settings.ray_num_cpus
    threads = settings.threads_per_shard or max(1, (os.cpu_count() or 1) // settings.shards)
    per_shard = settings.cpus_per_shard if settings.cpus_per_shard is not None else threads
    needed = settings.num_targets * settings.shards * per_shard
    drafter = settings.drafter
    if drafter is not None and drafter.placed == "actor":
        needed += settings.num_drafts * drafter.cpus
    return max(os.cpu_count() or 1, math.ceil(2 * needed))


def start_ray_for(config: ServeConfig) -> bool:
    """Join ``config.address``, or start an embedded Ray on loopback sized for
    the configured replicas; True if this started one (stop it with
    ``ray.shutdown()``). Call it on the main thread: Ray's daemons are killed
    when the thread that started them ends (PR_SET_PDEATHSIG)."""
    if ray.is_initialized():
        return False
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("start Ray on the main thread: its daemons die with their thread")
    num_cpus = None if config.address is not None else embedded_ray_cpus(config.router)
    return start_ray(config.address, num_cpus=num_cpus).started_here


def stop_ray() -> None:
    """Stop the Ray :func:`start_ray_for` started (its daemons and workers)."""
    ray.shutdown()


def build_router_backend(config: ServeConfig) -> tuple[Backend, Validator]:
    """Launch the router on the connected Ray (:func:`start_ray_for`) and wrap
    it; blocking, so it may run on a loading thread."""
    if not ray.is_initialized():
        raise RuntimeError("Ray is not running: call start_ray_for(config) first")
    return attach(config, launch(config.router, config.home), owns_router=True)


def attach(
    config: ServeConfig, attachment: RouterAttachment, owns_router: bool
) -> tuple[RouterBackend, Validator]:
    """A backend and validator for a running router."""
    backend = RouterBackend(attachment, owns_router=owns_router)
    return backend, Validator(config.validation_limits(attachment.info), attachment.tokenizer)
