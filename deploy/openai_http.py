"""OpenAI-compatible HTTP on the same gateway as gRPC: /v1/completions,
/v1/chat/completions, /v1/models, /health and /metrics, served by uvicorn on
the caller's event loop (127.0.0.1 unless told otherwise; optionally TLS and
a bearer token, see :mod:`specray.deploy.auth`). Every error, malformed
bodies included, is OpenAI's JSON error object with the HTTP status from the
error table."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import socket
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Generator
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from specray.deploy.auth import OPEN_HTTP_PATHS, TlsFiles, check_bearer
from specray.deploy.backend import Chunk
from specray.deploy.errors import (
    INTERNAL,
    BindError,
    BodyTooLargeError,
    InvalidRequestError,
    ModelNotFoundError,
    UnauthenticatedError,
    error_param,
    public_message,
    retry_after_s,
    status_for,
)
from specray.deploy.gateway import Gateway
from specray.deploy.openai_schema import (
    ChatBody,
    CompletionBody,
    SamplingBody,
    chunk_object,
    completion_object,
    describe_body_error,
    error_object,
)
from specray.deploy.validation import RawRequest

log = logging.getLogger(__name__)

Kind = Literal["completion", "chat"]
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024  # as gRPC's default receive limit
# OpenAI's error type for statuses the framework raises itself (an unknown
# path; otherwise a wrong method, a body too large or not text at all).
FRAMEWORK_ERROR_TYPES = {404: "not_found_error"}


def error_response(error: Exception, request_id: str = "") -> JSONResponse:
    status = status_for(error)
    if status is INTERNAL:
        log.error("request %r failed", request_id, exc_info=error)
    message = public_message(error, request_id)
    headers = {}
    retry = retry_after_s(error)
    if retry is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry)))  # whole seconds, never sooner
    if isinstance(error, UnauthenticatedError):
        headers["WWW-Authenticate"] = 'Bearer realm="specray"'
    body = error_object(message, status.openai_type, status.http_status, error_param(error))
    return JSONResponse(body, status_code=status.http_status, headers=headers)


class RequestGuard:
    """ASGI middleware that refuses a request before its body is read: 401
    without the bearer token (every path but ``/health``), 413 when the
    declared ``Content-Length`` is over the limit; a body sent without a
    length gets 413 once it passes the limit."""

    def __init__(self, app: ASGIApp, token: str | None, max_body_bytes: int | None) -> None:
        self.app = app
        self._token = token
        self._max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            try:
                if self._token is not None and scope["path"] not in OPEN_HTTP_PATHS:
                    check_bearer(headers.get("authorization"), self._token)
                self._check_length(headers.get("content-length"))
            except (UnauthenticatedError, InvalidRequestError) as error:
                await error_response(error)(scope, receive, send)
                return
            if self._max_body_bytes is not None:
                receive = self._counted(receive, self._max_body_bytes)
        await self.app(scope, receive, send)

    def _check_length(self, declared: str | None) -> None:
        limit = self._max_body_bytes
        if limit is not None and declared is not None and declared.isdigit():
            size = int(declared)
            if size > limit:
                raise BodyTooLargeError(
                    f"the request body must be at most {limit:,} bytes, got {size:,}"
                )

    @staticmethod
    def _counted(receive: Receive, limit: int) -> Receive:
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                # An HTTPException passes FastAPI's body reading unchanged.
                raise HTTPException(413, f"the request body must be at most {limit:,} bytes")
            return message

        return counted


def create_app(
    gateway: Gateway,
    auth_token: str | None = None,
    max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """The HTTP application; its metrics live in a registry of its own.
    ``auth_token``: every path but /health needs it; bodies over
    ``max_body_bytes`` get 413 (None: unlimited)."""
    app = FastAPI(title="specray", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestGuard, token=auth_token, max_body_bytes=max_body_bytes)
    created = int(time.time())
    registry = CollectorRegistry()
    requests_total = Counter(
        "specray_http_requests", "HTTP generation requests", ["endpoint", "code"], registry=registry
    )
    tokens_total = Counter(
        "specray_generated_tokens", "Tokens generated over HTTP", registry=registry
    )
    in_flight = Gauge("specray_requests_in_flight", "Requests in flight", registry=registry)
    in_flight.set_function(lambda: gateway.num_in_flight)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = describe_body_error(error.errors())
        return error_response(InvalidRequestError(message, param))

    @app.exception_handler(HTTPException)
    async def framework_error(request: Request, error: HTTPException) -> JSONResponse:
        code = error.status_code
        error_type = FRAMEWORK_ERROR_TYPES.get(code, "invalid_request_error")
        message = f"{request.method} {request.url.path}: {error.detail}"
        body = error_object(message, error_type, code)
        return JSONResponse(body, status_code=code, headers=error.headers)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody) -> Response:
        return await serve("completion", body, lambda: body.raw_request())

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody) -> Response:
        body = body.effective()
        return await serve("chat", body, lambda: chat_request(gateway, body))

    async def serve(kind: Kind, body: SamplingBody, make_raw: Any) -> Response:
        endpoint = f"/v1/{'chat/' if kind == 'chat' else ''}completions"
        response_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        try:
            body.check_supported()
            model = served_model(gateway, body.model)
            raw: RawRequest = make_raw()
            request = gateway.validate(dataclasses.replace(raw, request_id=response_id))
            stream = gateway.generate(request)
            if body.stream:
                # Pull the first chunk here so that refusals (overloaded,
                # draining) still get their HTTP status, not a 200 stream.
                first = await anext(stream)
                requests_total.labels(endpoint, "200").inc()
                events = sse(kind, response_id, model, first, stream, tokens_total)
                return StreamingResponse(events, media_type="text/event-stream")
            text: list[str] = []
            last: Chunk | None = None
            async with contextlib.aclosing(stream) as chunks:
                async for last in chunks:
                    text.append(last.text)
            assert last is not None
            tokens_total.inc(last.completion_tokens)
            requests_total.labels(endpoint, "200").inc()
            return JSONResponse(completion_object(kind, response_id, model, "".join(text), last))
        except Exception as error:
            response = error_response(error, response_id)
            requests_total.labels(endpoint, str(response.status_code)).inc()
            return response

    @app.get("/v1/models")
    async def models() -> Response:
        try:
            info = gateway.model_info()
        except Exception as error:
            return error_response(error)
        card = {
            "id": info.target,
            "object": "model",
            "created": created,
            "owned_by": "specray",
            "max_model_len": info.max_context,
        }
        return JSONResponse({"object": "list", "data": [card]})

    @app.get("/health")
    async def health() -> Response:
        healthy = await gateway.healthy()
        state = gateway.state if healthy or gateway.state != "serving" else "unhealthy"
        return JSONResponse({"status": state}, status_code=200 if healthy else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def served_model(gateway: Gateway, requested: str | None) -> str:
    name = gateway.model_info().target
    if requested not in (None, "", name):
        raise ModelNotFoundError(
            f"`model` {requested!r} is not served here; this server serves {name!r}"
        )
    return name


def chat_request(gateway: Gateway, body: ChatBody) -> RawRequest:
    if not body.messages:
        raise InvalidRequestError("`messages` must not be empty", "messages")
    tokenizer = gateway.validator.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError(
            "the served model has no chat template; use /v1/completions instead", "messages"
        )
    messages = [m.as_template_input() for m in body.messages]
    try:
        # tokenize=False then encode: transformers 5 returns a dict for tokenize=True.
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except TemplateError as error:  # templates refuse e.g. roles they do not know
        raise InvalidRequestError(
            f"`messages` were refused by the model's chat template: {error}", "messages"
        ) from None
    ids = gateway.validator.encode(str(text), add_special_tokens=False, field="messages")
    return body.raw(token_ids=ids, text_field="messages", token_ids_field="messages")


async def sse(
    kind: Kind,
    response_id: str,
    model: str,
    first: Chunk,
    rest: AsyncGenerator[Chunk, None],
    tokens_total: Counter,
) -> AsyncIterator[str]:
    """Server-sent events, ending with ``data: [DONE]``; an error after the
    stream has started is sent as an ``error`` event before it."""
    last = first
    async with contextlib.aclosing(rest) as chunks:
        try:
            yield event(chunk_object(kind, response_id, model, first, first=True))
            if not first.finished:
                async for last in chunks:
                    yield event(chunk_object(kind, response_id, model, last, first=False))
        except Exception as error:
            status = status_for(error)
            if status is INTERNAL:
                log.error("request %r failed", response_id, exc_info=error)
            message = public_message(error, response_id)
            param = error_param(error)
            yield event(error_object(message, status.openai_type, status.http_status, param))
        finally:
            tokens_total.inc(last.completion_tokens)
    yield "data: [DONE]\n\n"


def event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # `specray serve` owns SIGTERM / SIGINT: it drains both front ends.
        yield


class HttpServer:
    """uvicorn on a socket bound up front, so port 0 reports the real port."""

    def __init__(
        self, app: FastAPI, host: str = "127.0.0.1", port: int = 8000, tls: TlsFiles | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self._app = app
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets
        # that say so, and without it every response on a kept-alive
        # connection waits ~40 ms (Nagle against the client's delayed ACK).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as error:
            sock.close()
            raise BindError(
                f"could not bind HTTP to {self.host}:{self.port} ({error.strerror or error}); "
                "choose another with --http-port (0 picks a free one) or serve gRPC only "
                "with --no-http"
            ) from error
        self.port = sock.getsockname()[1]
        tls = self.tls
        config = uvicorn.Config(
            self._app,
            lifespan="off",
            log_level="warning",
            timeout_graceful_shutdown=5,
            ssl_certfile=None if tls is None else str(tls.cert),
            ssl_keyfile=None if tls is None else str(tls.key),
        )
        self._server = _Server(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve([sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises why it failed
                raise RuntimeError("the HTTP server stopped during startup")
            await asyncio.sleep(0.01)
        return self.port

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
