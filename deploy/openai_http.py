"""OpenAI-compatible HTTP on the same gateway as gRPC: /v1/completions,
/v1/chat/completions, /v1/models, /health and /metrics, served by uvicorn on
the caller's event loop (127.0.0.1 unless told otherwise)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Generator
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

from specray.deploy.backend import Chunk
from specray.deploy.errors import (
    INTERNAL,
    InvalidRequestError,
    ModelNotFoundError,
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
    error_object,
)
from specray.deploy.validation import RawRequest

log = logging.getLogger(__name__)

Kind = Literal["completion", "chat"]


def error_response(error: Exception, request_id: str = "") -> JSONResponse:
    status = status_for(error)
    if status is INTERNAL:
        log.error("request %r failed", request_id, exc_info=error)
    message = public_message(error, request_id)
    headers = {}
    retry = retry_after_s(error)
    if retry is not None:
        headers["Retry-After"] = str(max(1, round(retry)))
    body = error_object(message, status.openai_type, status.http_status)
    return JSONResponse(body, status_code=status.http_status, headers=headers)


def create_app(gateway: Gateway) -> FastAPI:
    """The HTTP application; its metrics live in a registry of its own."""
    app = FastAPI(title="specray", docs_url=None, redoc_url=None, openapi_url=None)
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
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"] if part != "body")
        return error_response(InvalidRequestError(f"`{where}`: {first['msg']}"))

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
            f"model {requested!r} is not served here; this server serves {name!r}"
        )
    return name


def chat_request(gateway: Gateway, body: ChatBody) -> RawRequest:
    if not body.messages:
        raise InvalidRequestError("`messages` must not be empty")
    tokenizer = gateway.validator.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError(
            "the served model has no chat template; use /v1/completions instead"
        )
    messages = [m.as_template_input() for m in body.messages]
    # tokenize=False then encode: transformers 5 returns a dict for tokenize=True.
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = gateway.validator.encode(str(text), add_special_tokens=False)
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
            yield event(error_object(message, status.openai_type, status.http_status))
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

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> None:
        self.host = host
        self.port = port
        self._app = app
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as error:
            sock.close()
            raise OSError(f"could not bind HTTP to {self.host}:{self.port}: {error}") from error
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._app, lifespan="off", log_level="warning", timeout_graceful_shutdown=5
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
