"""A gRPC server interceptor that acts on the method handler of each call."""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import grpc


class HandlerInterceptor(grpc.aio.ServerInterceptor):
    """Looks up each call's handler and may answer with another in its place.
    A call no servicer handles (no handler) passes on untouched, so grpc
    answers it UNIMPLEMENTED as usual."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return self.intercept_handler(handler, handler_call_details)

    @abc.abstractmethod
    def intercept_handler(
        self, handler: grpc.RpcMethodHandler, call: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        """The handler that serves ``call``: ``handler`` itself or a wrapper."""
