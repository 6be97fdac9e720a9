"""Errors a request can end with inside the engine or the router. The front
door maps each class to its status code in its one error table
(``specray.deploy.errors``); nothing is told apart by its message."""

from __future__ import annotations


class RequestRejectedError(ValueError):
    """The request cannot be served as asked; nothing of it was started."""


class DuplicateRequestError(RequestRejectedError):
    """Another request with the same id is in flight."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"request id {request_id!r} is already in use")
        self.request_id = request_id


class RequestCancelledError(RuntimeError):
    """The request was cancelled (by its caller or an operator, or because the
    server shut down) before it finished; its work was freed."""


class NotRunningError(RuntimeError):
    """The router is not running (not started yet, or shut down)."""
