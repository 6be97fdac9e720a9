"""specray as a Ray Serve application: two deployments, composed in
:func:`build_app` (the only place ``serve.deployment`` is applied).

- ``SpecrayRouter`` (:class:`RouterHolder`, one replica): owns the router
  actor and, through it, the target replicas (TP groups) and the draft pool.
  Their counts are its ``user_config`` (``num_targets``, ``num_drafts``),
  applied by :meth:`RouterHolder.reconfigure` with ``router.scale``. Serve
  applies a changed user_config to the running replica (``serve deploy``,
  or a RayService edit), so drafts rescale while the target group stays up;
  ``serve.run`` would replace every replica instead.
- ``SpecrayIngress`` (:class:`Ingress`, one replica): the front door. It
  runs specray's own grpc.aio server (Generation, health, reflection and,
  on loopback, Admin) on ``host:port`` from the config, 127.0.0.1:50051 by
  default, because Serve's gRPC proxy binds every interface and has no host
  option; that proxy stays off. The OpenAI HTTP API is this deployment's
  Serve HTTP ingress, behind Serve's proxy on ``http_options.host``
  (127.0.0.1 in deploy/serve_config.yaml).

Both front doors reach the router actor directly (not through Serve
handles), so a streamed request is one actor call, as in ``specray serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, cast

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application, Deployment

from specray.deploy.config import ServeConfig
from specray.deploy.gateway import Gateway
from specray.deploy.grpc_server import GrpcServer
from specray.deploy.openai_http import create_app
from specray.deploy.router_backend import RouterAttachment, RouterBackend, attach, launch

log = logging.getLogger(__name__)

ROUTER_DEPLOYMENT = "SpecrayRouter"
INGRESS_DEPLOYMENT = "SpecrayIngress"


class ReplicaCounts(BaseModel):
    """``SpecrayRouter``'s user_config: the scaling knobs, one per replica kind."""

    model_config = ConfigDict(extra="forbid")

    num_targets: int = Field(1, ge=1, description="target replicas, each a TP group")
    num_drafts: int = Field(1, ge=0, description="draft replicas")


class RouterHolder:
    """Launches the router on its first user_config and rescales it on later ones."""

    def __init__(self, config: dict[str, Any]) -> None:
        self._config = ServeConfig.model_validate(config)
        if self._config.backend != "router":
            raise ValueError("the Serve application needs `backend: router`")
        self._attachment: RouterAttachment | None = None
        self._lock = asyncio.Lock()  # launch and scale one at a time

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        counts = ReplicaCounts.model_validate(user_config)
        if counts.num_drafts and self._config.router.drafter is None:
            raise ValueError("num_drafts > 0 needs a drafter in the router's `drafts`")
        async with self._lock:
            if self._attachment is None:
                await self._launch(counts)
                return
            report = await self._attachment.router.scale.remote(
                drafts=counts.num_drafts, targets=counts.num_targets
            )
            log.info("rescaled to %d target and %d draft replicas", report.targets, report.drafts)

    async def attachment(self) -> RouterAttachment:
        """The router and what a front door needs to serve through it."""
        async with self._lock:
            if self._attachment is None:  # deployed without a user_config
                await self._launch(initial_counts(self._config))
            assert self._attachment is not None
            return self._attachment

    async def check_health(self) -> None:
        """Unhealthy once no target replica is up: Serve then restarts this
        replica, which starts a fresh router and target group (gang restart)."""
        if self._attachment is None:
            return
        state = await self._attachment.router.state.remote()
        if not any(not target.draining for target in state.targets):
            raise RuntimeError("no target replica is up")

    async def __del__(self) -> None:
        # Serve awaits this on a graceful shutdown; the router's replicas and
        # placement groups would die with this process anyway.
        if self._attachment is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._attachment.router.shutdown.remote(), 60)

    async def _launch(self, counts: ReplicaCounts) -> None:
        settings = self._config.router.model_copy(
            update={"num_targets": counts.num_targets, "num_drafts": counts.num_drafts}
        )
        self._attachment = await asyncio.to_thread(launch, settings, self._config.home)


class Ingress:
    """specray's gRPC server and the OpenAI HTTP app over the holder's router."""

    # Serve awaits an async constructor; type checkers want __init__ to return None.
    async def __init__(self, config: dict[str, Any], router_holder: Any) -> None:  # type: ignore[misc]
        self._config = settings = ServeConfig.model_validate(config)
        self.gateway = Gateway()
        self.grpc = GrpcServer(
            self.gateway, settings.host, settings.port, admin=settings.admin_enabled
        )
        await self.grpc.start()  # NOT_SERVING until the router is attached
        attachment: RouterAttachment = await router_holder.attachment.remote()
        backend, validator = attach(settings, attachment, owns_router=False)
        self.gateway.attach(backend, validator, settings.queue_limits())
        await self.grpc.refresh_health()

    def __serve_build_asgi_app__(self) -> FastAPI:
        """The OpenAI-compatible app, served by Serve's HTTP proxy."""
        return create_app(self.gateway)

    async def grpc_address(self) -> str:
        return self.grpc.address

    async def check_health(self) -> None:
        """Unhealthy once the router actor is gone (its holder restarted), so
        Serve restarts this replica and it attaches to the new router."""
        backend = self.gateway.backend
        if isinstance(backend, RouterBackend):
            await asyncio.wait_for(backend.router.ping.remote(), 30)

    async def __del__(self) -> None:
        # Serve awaits this on a graceful shutdown: drain, then stop.
        await self.grpc.drain(self._config.drain_timeout_s)
        await self.grpc.stop(grace_s=1.0)


def initial_counts(config: ServeConfig) -> ReplicaCounts:
    router = config.router
    drafts = router.num_drafts if router.drafter is not None else 0
    return ReplicaCounts(num_targets=router.num_targets, num_drafts=drafts)


def _deployment(cls: type, **options: Any) -> Deployment:
    return cast(Deployment, serve.deployment(cls, **options))


def build_app(config: ServeConfig) -> Application:
    """The application: ``SpecrayIngress`` bound to a ``SpecrayRouter``.

    The router's replica counts start from ``config.router``'s; a Serve
    config's ``deployments[].user_config`` overrides them.
    """
    if config.backend != "router":
        raise ValueError("the Serve application needs `backend: router`")
    settings = config.model_dump(mode="json")
    # serve.deployment is typed as a decorator factory; called with a class it
    # returns the Deployment itself.
    holder = _deployment(
        RouterHolder,
        name=ROUTER_DEPLOYMENT,
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},  # it only launches and watches actors
        user_config=initial_counts(config).model_dump(),
        health_check_period_s=10,
        health_check_timeout_s=60,
        graceful_shutdown_timeout_s=90,
    )
    ingress = _deployment(
        serve.ingress()(Ingress),
        name=INGRESS_DEPLOYMENT,
        # One replica: it binds a fixed gRPC port (two on a node would collide).
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        health_check_period_s=10,
        health_check_timeout_s=60,
        graceful_shutdown_timeout_s=config.drain_timeout_s + 10,
    )
    return ingress.bind(settings, holder.bind(settings))


def app_builder(args: dict[str, Any]) -> Application:
    """``import_path: specray.deploy.serve_app:app_builder`` for ``serve run`` /
    ``serve deploy``: ``args`` are ``specray serve`` config keys."""
    return build_app(ServeConfig.model_validate(args))
