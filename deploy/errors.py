"""The serving errors and the one table that maps them to gRPC and HTTP codes.

Everything the front door can fail with is a :class:`ServingError` subclass;
:func:`status_for` looks its class up in :data:`ERROR_TABLE`, and anything
that is not a ServingError is INTERNAL / 500.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc


class ServingError(Exception):
    """An error with a message safe to show to the caller."""


class InvalidRequestError(ServingError):
    """The request breaks a validation rule; the message names the field, the
    limit and the value given."""


class ModelNotFoundError(ServingError):
    """The request names a model this server does not serve."""


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


class RequestCancelledError(ServingError):
    """The request was cancelled (by its caller or an operator); its work was freed."""


class UnsupportedError(ServingError):
    """The backend cannot do this (e.g. scale an in-process engine)."""


@dataclass(frozen=True)
class ErrorStatus:
    grpc_code: grpc.StatusCode
    http_status: int
    openai_type: str  # the OpenAI error "type" field


INTERNAL = ErrorStatus(grpc.StatusCode.INTERNAL, 500, "internal_error")

# The single mapping from error to status code. Subclasses of an entry map
# like it unless they have their own row; order does not matter.
ERROR_TABLE: dict[type[ServingError], ErrorStatus] = {
    InvalidRequestError: ErrorStatus(
        grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"
    ),
    ModelNotFoundError: ErrorStatus(grpc.StatusCode.NOT_FOUND, 404, "model_not_found"),
    OverloadedError: ErrorStatus(grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "overloaded_error"),
    UnavailableError: ErrorStatus(grpc.StatusCode.UNAVAILABLE, 503, "unavailable_error"),
    DeadlineExceededError: ErrorStatus(grpc.StatusCode.DEADLINE_EXCEEDED, 504, "timeout_error"),
    # 499 is the de facto "client closed request" code (nginx); the client
    # has usually gone by then, so it shows up in logs and metrics only.
    RequestCancelledError: ErrorStatus(grpc.StatusCode.CANCELLED, 499, "cancelled_error"),
    UnsupportedError: ErrorStatus(grpc.StatusCode.UNIMPLEMENTED, 501, "unsupported_error"),
}

# Trailing-metadata key gRPC's own retry machinery reads as a retry hint.
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"


def status_for(error: BaseException) -> ErrorStatus:
    """The codes for ``error``: its class's row, else its nearest base's, else INTERNAL."""
    for cls in type(error).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return INTERNAL


def public_message(error: BaseException, request_id: str) -> str:
    """What the caller is told: a ServingError's own message; for anything
    else only the request id to find it in the server log, never internals."""
    if isinstance(error, ServingError):
        return str(error)
    return f"internal error while serving request {request_id!r}; see the server log"


def retry_after_s(error: BaseException) -> float | None:
    """How long the caller should wait before retrying, where the error says."""
    return error.retry_after_s if isinstance(error, OverloadedError) else None
