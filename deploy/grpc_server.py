"""The gRPC front door: ``specray.v1.Generation`` plus grpc.health.v1 and
server reflection, on a :class:`~specray.deploy.gateway.Gateway`, and the
operator's ``specray.v1.Admin`` where enabled.

Binds 127.0.0.1 unless told otherwise; port 0 picks a free port, which
:attr:`GrpcServer.port` then reports. Optional TLS and bearer token
(:mod:`specray.deploy.auth`); ``specray.v1`` requests are decoded strictly
(:mod:`specray.deploy.strict_decoding`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from specray.actors.sampling.grammar import Guide
from specray.deploy.admin_server import ADMIN_SERVICE_NAME, add_admin_servicer
from specray.deploy.auth import TlsFiles, TokenAuth
from specray.deploy.backend import Chunk
from specray.deploy.errors import BindError, InvalidRequestError, abort_rpc
from specray.deploy.gateway import Gateway
from specray.deploy.strict_decoding import StrictDecoding
from specray.deploy.validation import RawRequest
from specray.protos.specray.v1 import admin_pb2
from specray.protos.specray.v1 import generation_pb2 as pb
from specray.protos.specray.v1 import generation_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["Generation"].full_name
FINISH_REASONS = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
}


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def raw_request(message: pb.GenerateRequest) -> RawRequest:
    """The wire request as a neutral :class:`RawRequest` (unset stays None)."""

    def optional(name: str) -> Any:
        return getattr(message, name) if message.HasField(name) else None

    def float32(name: str) -> float | None:
        # A float field holds float32: 0.7 arrives as 0.699999988; give the
        # engine the number the caller wrote.
        value = optional(name)
        return None if value is None else float(f"{value:.7g}")

    source = message.WhichOneof("input")
    guide_field = message.WhichOneof("guide")
    return RawRequest(
        request_id=message.request_id,
        text=message.text if source == "text" else None,
        token_ids=list(message.token_ids.ids) if source == "token_ids" else None,
        temperature=float32("temperature"),
        top_p=float32("top_p"),
        top_k=optional("top_k"),
        min_p=float32("min_p"),
        max_tokens=optional("max_tokens"),
        stop=list(message.stop),
        stop_token_ids=list(message.stop_token_ids),
        ignore_eos=message.ignore_eos,
        seed=optional("seed"),
        speculative=optional("speculative"),
        num_speculative_tokens=optional("num_speculative_tokens"),
        fixed_speculation=optional("fixed_speculation"),
        guide=_guide(message, guide_field),
        guide_field=guide_field or "guided_json",
    )


def _guide(message: pb.GenerateRequest, field: str | None) -> Guide | None:
    if field == "guided_json":
        return Guide("json_schema", message.guided_json)
    if field == "guided_json_object":
        if not message.guided_json_object:
            raise InvalidRequestError("`guided_json_object` must be true when set", field)
        return Guide("json_object")
    if field == "guided_regex":
        return Guide("regex", message.guided_regex)
    if field == "guided_choice":
        return Guide("choice", json.dumps(list(message.guided_choice.choices)))
    return None


def response(chunk: Chunk, token_ids: list[int], text: str) -> pb.GenerateResponse:
    """``chunk``'s counters with the given tokens and text (one chunk's or all)."""
    stats = chunk.stats
    return pb.GenerateResponse(
        token_ids=token_ids,
        text=text,
        finish_reason=FINISH_REASONS[chunk.finish_reason],
        usage=pb.Usage(
            prompt_tokens=chunk.prompt_tokens,
            completion_tokens=chunk.completion_tokens,
            cached_tokens=chunk.cached_tokens,
        ),
        spec_stats=pb.SpecStats(
            draft_tokens=stats.draft_tokens,
            accepted_tokens=stats.accepted_tokens,
            rounds=stats.rounds,
            fallback=stats.fallback,
        ),
        seed=chunk.seed,
    )


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        request_id = request.request_id
        try:
            validated = self._gateway.validate(raw_request(request))
            request_id = validated.request_id
            token_ids: list[int] = []
            text: list[str] = []
            last: Chunk | None = None
            stream = self._gateway.generate(validated, context.time_remaining())
            async with contextlib.aclosing(stream) as chunks:
                async for last in chunks:
                    token_ids += last.token_ids
                    text.append(last.text)
            assert last is not None and last.finished
            return response(last, token_ids, "".join(text))
        except Exception as error:
            await abort_rpc(context, error, request_id)
            raise  # unreachable: abort raises

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        request_id = request.request_id
        try:
            validated = self._gateway.validate(raw_request(request))
            request_id = validated.request_id
            stream = self._gateway.generate(validated, context.time_remaining())
            async with contextlib.aclosing(stream) as chunks:
                async for chunk in chunks:
                    yield response(chunk, list(chunk.token_ids), chunk.text)
        except Exception as error:
            await abort_rpc(context, error, request_id)

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        try:
            info = self._gateway.model_info()
            limits = self._gateway.validator.limits
        except Exception as error:
            await abort_rpc(context, error, "")
            raise
        # ModelInfo is the response's model half, field for field.
        return pb.GetModelInfoResponse(**asdict(info), max_tokens_limit=limits.request.max_tokens)


class GrpcServer:
    """A grpc.aio server with Generation, health and reflection."""

    def __init__(
        self,
        gateway: Gateway,
        host: str = "127.0.0.1",
        port: int = 50051,
        health_interval_s: float = 1.0,
        admin: bool = False,
        tls: TlsFiles | None = None,
        auth_token: str | None = None,
        max_request_bytes: int | None = None,
    ) -> None:
        """``admin``: also serve ``specray.v1.Admin`` (scaling) on this port.
        ``tls``: serve TLS only; ``auth_token``: every call but health checks
        needs it; ``max_request_bytes``: larger requests get RESOURCE_EXHAUSTED
        (None: gRPC's 4 MiB)."""
        self.gateway = gateway
        self.host = host
        self.port = port
        self.admin = admin
        self.tls = tls
        self._auth_token = auth_token
        self._max_request_bytes = max_request_bytes
        self._health_interval_s = health_interval_s
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None  # made in start(), on the serving loop
        self._watcher: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return host_port(self.host, self.port)

    async def start(self) -> int:
        """Bind and serve (health NOT_SERVING until the gateway serves); return the port."""
        # Without so_reuseport=0 gRPC sets SO_REUSEPORT and two servers could share a port.
        options: list[tuple[str, Any]] = [("grpc.so_reuseport", 0)]
        if self._max_request_bytes is not None:
            options.append(("grpc.max_receive_message_length", self._max_request_bytes))
        # Authentication first: a refused call's bytes are never decoded.
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if self._auth_token is not None:
            interceptors.append(TokenAuth(self._auth_token))
        specray_services = [pb.DESCRIPTOR.services_by_name["Generation"]]
        specray_services.append(admin_pb2.DESCRIPTOR.services_by_name["Admin"])
        interceptors.append(StrictDecoding(specray_services))
        self._server = grpc.aio.server(options=options, interceptors=interceptors)
        pb_grpc.add_GenerationServicer_to_server(GenerationServicer(self.gateway), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        services = [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME]
        if self.admin:
            add_admin_servicer(self.gateway, self._server)
            services.append(ADMIN_SERVICE_NAME)
        reflection.enable_server_reflection(services, self._server)
        address = host_port(self.host, self.port)
        # Probed first: gRPC's own failure is a bare RuntimeError after a
        # C-core log line, where a user wants the cause and the flag.
        _probe_bind(self.host, self.port)
        try:
            if self.tls is not None:
                cert, key = self.tls.read()
                credentials = grpc.ssl_server_credentials([(key, cert)])
                bound = self._server.add_secure_port(address, credentials)
            else:
                bound = self._server.add_insecure_port(address)
        except RuntimeError as error:
            bound = 0
            cause: BaseException | None = error
        else:
            cause = None
        if bound == 0:
            raise BindError(_bind_message(self.address, "taken")) from cause
        self.port = bound
        await self.refresh_health()
        await self._server.start()
        self._watcher = asyncio.get_running_loop().create_task(self._watch_health())
        return bound

    async def refresh_health(self) -> None:
        """Publish the gateway's state (and the backend's health) now."""
        serving = await self.gateway.healthy()
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", SERVICE_NAME):
            await self._health.set(service, status)

    async def drain(self, timeout_s: float) -> bool:
        """Stop taking requests (health NOT_SERVING, new calls UNAVAILABLE) and
        wait for those in flight; False if ``timeout_s`` ran out first."""
        self.gateway.start_draining()
        await self.refresh_health()
        return await self.gateway.wait_idle(timeout_s)

    async def stop(self, grace_s: float | None = 1.0) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace_s)

    async def _watch_health(self) -> None:
        # Transitions call refresh_health directly; this catches the backend
        # failing on its own (e.g. its target group going down).
        while True:
            await asyncio.sleep(self._health_interval_s)
            try:
                await self.refresh_health()
            except Exception:
                log.exception("health check failed")


def _bind_message(address: str, why: str) -> str:
    return (
        f"could not bind gRPC to {address} ({why}); choose another with --port "
        "(0 picks a free one) or --host"
    )


def _probe_bind(host: str, port: int) -> None:
    """Raise :class:`BindError` if ``host:port`` cannot be bound right now."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            why = error.strerror or str(error)
            raise BindError(_bind_message(host_port(host, port), why)) from error
