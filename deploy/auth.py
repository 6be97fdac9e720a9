"""Who may call the front doors: an optional bearer token, checked on every
gRPC call (:class:`TokenAuth`, a server interceptor) and every HTTP request
(:func:`check_bearer`), and the optional TLS files both servers use.

The token never goes on a command line (where ``ps`` shows it): it comes from
a file (``auth_token_file``) or the ``SPECRAY_AUTH_TOKEN`` environment
variable. Callers send ``authorization: Bearer <token>``; the comparison is
constant-time. Health checks stay open (gRPC ``grpc.health.v1.Health``, HTTP
``/health``) so that load balancers and orchestrators can probe without the
secret; they reveal only whether the server is serving.
"""

from __future__ import annotations

import hmac
import stat
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from specray.deploy.errors import UnauthenticatedError
from specray.deploy.handler_interceptor import HandlerInterceptor

TOKEN_ENV = "SPECRAY_AUTH_TOKEN"
AUTHORIZATION = "authorization"  # gRPC metadata keys are lower case
BEARER = "Bearer "
# Paths (gRPC method prefixes) open without a token.
OPEN_GRPC_PREFIXES: tuple[str, ...] = ("/grpc.health.v1.Health/",)
OPEN_HTTP_PATHS: frozenset[str] = frozenset({"/health"})


@dataclass(frozen=True)
class TlsFiles:
    """A PEM certificate chain and its private key."""

    cert: Path
    key: Path

    def read(self) -> tuple[bytes, bytes]:
        """(certificate chain, private key) as bytes."""
        return self.cert.read_bytes(), self.key.read_bytes()


def load_token(token_file: Path | None, environ: Mapping[str, str]) -> str | None:
    """The server's bearer token: ``token_file``'s content, else ``$SPECRAY_AUTH_TOKEN``,
    else None (no authentication). Raises ValueError for an empty or unusable token."""
    if token_file is not None:
        token, source = token_file.read_text().strip(), str(token_file)
    elif TOKEN_ENV in environ:
        token, source = environ[TOKEN_ENV].strip(), f"${TOKEN_ENV}"
    else:
        return None
    if not token:
        raise ValueError(f"the auth token in {source} is empty")
    if not token.isascii() or not token.isprintable() or " " in token:
        raise ValueError(
            f"the auth token in {source} must be printable ASCII without spaces (it travels "
            "in an HTTP header)"
        )
    return token


def is_private(path: Path) -> bool:
    """Whether only its owner may read or write ``path`` (a secret's file)."""
    return not path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO)


def check_bearer(header: str | None, token: str) -> None:
    """Raise UnauthenticatedError unless ``header`` is ``Bearer <token>``."""
    if not header:
        raise UnauthenticatedError(
            "this server needs a bearer token: send the header `authorization: Bearer <token>`"
        )
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        # Not echoed: a client that sent the bare token would get it back.
        raise UnauthenticatedError("the `authorization` header must be `Bearer <token>`")
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise UnauthenticatedError("the bearer token is wrong")


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The gRPC call metadata that carries ``token`` (none without one)."""
    return () if token is None else ((AUTHORIZATION, f"{BEARER}{token}"),)


class TokenAuth(HandlerInterceptor):
    """Refuse every call without the bearer token (UNAUTHENTICATED), except
    those whose method starts with one of ``open_prefixes``. A refused call's
    request is never deserialized."""

    def __init__(self, token: str, open_prefixes: Sequence[str] = OPEN_GRPC_PREFIXES) -> None:
        self._token = token
        self._open = tuple(open_prefixes)

    def intercept_handler(
        self, handler: grpc.RpcMethodHandler, call: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        if call.method.startswith(self._open):
            return handler
        header = None
        for key, value in call.invocation_metadata or ():
            if key == AUTHORIZATION:
                header = value if isinstance(value, str) else value.decode("latin-1")
        try:
            check_bearer(header, self._token)
        except UnauthenticatedError as error:
            return _refusal(handler, str(error))
        return handler


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s shape that answers UNAUTHENTICATED."""
    code = grpc.StatusCode.UNAUTHENTICATED
    serialize = handler.response_serializer

    def raw(data: bytes) -> bytes:
        return data

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(code, message)
        yield  # unreachable: makes this an async generator

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(stream, raw, serialize)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, raw, serialize)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(stream, raw, serialize)
    return grpc.unary_unary_rpc_method_handler(unary, raw, serialize)
