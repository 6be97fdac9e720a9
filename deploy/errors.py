"""The serving errors and the one table that maps them to gRPC and HTTP codes.

Everything the front door raises itself is a :class:`ServingError` subclass;
errors from the engine and the router that callers must tell apart (a
request refused, cancelled, a target group going down) have rows of their
own. :func:`status_for` looks an error's class up in :data:`ERROR_TABLE`;
anything without a row is INTERNAL / 500.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc

from specray.actors.engine.errors import (
    NotRunningError,
    RequestCancelledError,
    RequestRejectedError,
)
from specray.cluster.errors import TargetGroupError

log = logging.getLogger(__name__)


class ServingError(Exception):
    """An error with a message safe to show to the caller."""


class InvalidRequestError(ServingError):
    """The request breaks a validation rule; the message names the field, the
    limit and the value given, and ``param`` is that field's wire name (for
    OpenAI's error ``param``) where there is one."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class BodyTooLargeError(InvalidRequestError):
    """The request is larger than the server accepts."""


class UnauthenticatedError(ServingError):
    """The call carries no bearer token, or a wrong one."""


class ModelNotFoundError(ServingError):
    """The request names a model this server does not serve."""

    param = "model"


class OverloadedError(ServingError):
    """The bounded queue is full; retrying later may succeed."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UnavailableError(ServingError):
    """The server cannot take requests now: loading, draining, or its target
    group is down."""


class DeadlineExceededError(ServingError):
    """The caller's deadline passed before the request finished."""


class BindError(OSError):
    """A server could not take its address; the message names the flag that
    changes it."""


class UnsupportedError(ServingError):
    """The backend cannot do this (e.g. scale an in-process engine)."""


@dataclass(frozen=True)
class ErrorStatus:
    grpc_code: grpc.StatusCode
    http_status: int
    openai_type: str  # the OpenAI error "type" field
    # What the caller is told for an error from below the front door (not a
    # ServingError), whose own message carries internals (shards, hosts).
    public_message: str = ""


INTERNAL = ErrorStatus(grpc.StatusCode.INTERNAL, 500, "internal_error")

# The single mapping from error to status code. Subclasses of an entry map
# like it unless they have their own row; order does not matter.
ERROR_TABLE: dict[type[Exception], ErrorStatus] = {
    InvalidRequestError: ErrorStatus(
        grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"
    ),
    BodyTooLargeError: ErrorStatus(grpc.StatusCode.INVALID_ARGUMENT, 413, "invalid_request_error"),
    UnauthenticatedError: ErrorStatus(grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error"),
    ModelNotFoundError: ErrorStatus(grpc.StatusCode.NOT_FOUND, 404, "model_not_found"),
    OverloadedError: ErrorStatus(grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "overloaded_error"),
    UnavailableError: ErrorStatus(grpc.StatusCode.UNAVAILABLE, 503, "unavailable_error"),
    DeadlineExceededError: ErrorStatus(grpc.StatusCode.DEADLINE_EXCEEDED, 504, "timeout_error"),
    # 499 is the de facto "client closed request" code (nginx); the client
    # has usually gone by then, so it shows up in logs and metrics only.
    RequestCancelledError: ErrorStatus(grpc.StatusCode.CANCELLED, 499, "cancelled_error"),
    # The engine or router refused the request itself (e.g. its id is in use).
    RequestRejectedError: ErrorStatus(
        grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"
    ),
    NotRunningError: ErrorStatus(
        grpc.StatusCode.UNAVAILABLE, 503, "unavailable_error", "the server is not running"
    ),
    UnsupportedError: ErrorStatus(grpc.StatusCode.UNIMPLEMENTED, 501, "unsupported_error"),
    # A shard died, fell out of step or timed out: the group is gone until
    # it is restarted, so retrying later (elsewhere) may succeed.
    TargetGroupError: ErrorStatus(
        grpc.StatusCode.UNAVAILABLE,
        503,
        "unavailable_error",
        "the target group is down; retry later",
    ),
}

# Trailing-metadata key gRPC's own retry machinery reads as a retry hint.
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"


def status_for(error: BaseException) -> ErrorStatus:
    """The codes for ``error``: its class's row, else its nearest base's, else INTERNAL."""
    for cls in type(error).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return INTERNAL


# Errors whose own message is written for the caller.
SAFE_TO_SHOW = (ServingError, RequestRejectedError, RequestCancelledError)


def public_message(error: BaseException, request_id: str) -> str:
    """What the caller is told: the own message of an error written for the
    caller (:data:`SAFE_TO_SHOW`); for anything else its row's public message
    or "internal error", with the request id to find the details in the
    server log, never the internals themselves."""
    if isinstance(error, SAFE_TO_SHOW):
        return str(error)
    summary = status_for(error).public_message
    if summary:
        return f"{summary} (request {request_id!r}; details in the server log)"
    return f"internal error while serving request {request_id!r}; see the server log"


def error_param(error: BaseException) -> str | None:
    """The request field an error is about, where it names one."""
    param = getattr(error, "param", None) if isinstance(error, ServingError) else None
    return param if isinstance(param, str) else None


def retry_after_s(error: BaseException) -> float | None:
    """How long the caller should wait before retrying, where the error says."""
    return error.retry_after_s if isinstance(error, OverloadedError) else None


async def abort_rpc(context: grpc.aio.ServicerContext, error: Exception, request_id: str) -> None:
    """End the call with ``error``'s status from the error table (raises)."""
    status = status_for(error)
    if status is INTERNAL:
        log.error("request %r failed", request_id, exc_info=error)
    elif not isinstance(error, SAFE_TO_SHOW):  # mapped, but its details stay here
        log.warning("request %r failed: %r", request_id, error)
    metadata: tuple[tuple[str, str], ...] = ()
    retry = retry_after_s(error)
    if retry is not None:
        metadata = ((RETRY_PUSHBACK_KEY, str(round(retry * 1000))),)
    await context.abort(status.grpc_code, public_message(error, request_id), metadata)
