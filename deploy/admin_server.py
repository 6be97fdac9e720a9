"""``specray.v1.Admin``: rescale the running backend and report its replicas.

It shares the Generation server's port and its lack of authentication, so
:class:`~specray.deploy.grpc_server.GrpcServer` adds it only when asked
(``specray serve`` asks when bound to loopback, or when the config says so).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict

import grpc

from specray.deploy.errors import InvalidRequestError, UnsupportedError, abort_rpc
from specray.deploy.gateway import Gateway
from specray.deploy.replicas import MAX_REPLICAS, Diagnosable, ReplicaState, Scalable
from specray.protos.specray.v1 import admin_pb2 as pb
from specray.protos.specray.v1 import admin_pb2_grpc as pb_grpc

ADMIN_SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["Admin"].full_name


def state_message(state: ReplicaState) -> pb.ReplicaState:
    # ReplicaState is the message's Python twin, field for field.
    return pb.ReplicaState(**asdict(state))


def _count(name: str, value: int, low: int) -> int:
    if not low <= value <= MAX_REPLICAS:
        raise InvalidRequestError(f"`{name}` must be >= {low} and <= {MAX_REPLICAS}, got {value}")
    return value


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def _backend(self) -> Scalable:
        backend = self._gateway.backend
        if not isinstance(backend, Scalable):
            raise UnsupportedError("this backend cannot report or change its replicas")
        return backend

    def _diagnosable(self) -> Diagnosable:
        backend = self._gateway.backend
        if not isinstance(backend, Diagnosable):
            raise UnsupportedError("this backend keeps no router diagnostics")
        return backend

    async def Scale(
        self, request: pb.ScaleRequest, context: grpc.aio.ServicerContext
    ) -> pb.ScaleResponse:
        try:
            backend = self._backend()
            current = await backend.replicas()
            drafts = current.drafts
            targets = current.targets
            if request.HasField("drafts"):
                drafts = _count("drafts", request.drafts, 0)
            if request.HasField("targets"):
                targets = _count("targets", request.targets, 1)
            began = time.perf_counter()
            await backend.scale(drafts, targets)
            seconds = time.perf_counter() - began
            state = await backend.replicas()
        except Exception as error:
            await abort_rpc(context, error, "scale")
            raise  # unreachable: abort raises
        return pb.ScaleResponse(state=state_message(state), seconds=seconds)

    async def GetState(
        self, request: pb.GetStateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetStateResponse:
        try:
            state = await self._backend().replicas()
        except Exception as error:
            await abort_rpc(context, error, "state")
            raise
        return pb.GetStateResponse(state=state_message(state))

    async def GetDiagnostics(
        self, request: pb.GetDiagnosticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetDiagnosticsResponse:
        try:
            found = await self._diagnosable().diagnostics(request.reset_rounds)
        except Exception as error:
            await abort_rpc(context, error, "diagnostics")
            raise
        return pb.GetDiagnosticsResponse(json=json.dumps(found))


def add_admin_servicer(gateway: Gateway, server: grpc.aio.Server) -> None:
    pb_grpc.add_AdminServicer_to_server(AdminServicer(gateway), server)
