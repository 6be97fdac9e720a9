"""A small client for ``specray.v1.Admin``.

with AdminClient("127.0.0.1:50051") as admin:
    state = admin.scale(drafts=2)        # unset counts stay as they are
    print(state.drafts, state.targets)
"""

from __future__ import annotations

import json
from typing import Any

import grpc

from specray.deploy.client import ChannelClient, SpecrayError
from specray.protos.specray.v1 import admin_pb2 as pb
from specray.protos.specray.v1 import admin_pb2_grpc as pb_grpc


class AdminClient(ChannelClient):
    """Blocking client of ``specray.v1.Admin`` (see
    :class:`~specray.deploy.client.ChannelClient`); by default a call waits as
    long as scaling takes (starting a target group can take minutes)."""

    def __init__(self, address: str, timeout_s: float | None = None, **channel: Any) -> None:
        super().__init__(address, timeout_s, **channel)
        self._stub = pb_grpc.AdminStub(self._channel)

    def scale(self, drafts: int | None = None, targets: int | None = None) -> pb.ScaleResponse:
        """Run ``drafts`` draft and ``targets`` target replicas (None: unchanged)."""
        fields = {k: v for k, v in {"drafts": drafts, "targets": targets}.items() if v is not None}
        try:
            response: pb.ScaleResponse = self._stub.Scale(
                pb.ScaleRequest(**fields), timeout=self.timeout_s, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise SpecrayError.from_rpc(error) from None
        return response

    def state(self) -> pb.ReplicaState:
        try:
            response: pb.GetStateResponse = self._stub.GetState(
                pb.GetStateRequest(), timeout=self.timeout_s, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise SpecrayError.from_rpc(error) from None
        return response.state

    def diagnostics(self, reset_rounds: bool = False) -> dict[str, Any]:
        """The router's cost models, shared copy estimates and rounds by size
        (``reset_rounds``: count rounds afresh from now)."""
        try:
            response: pb.GetDiagnosticsResponse = self._stub.GetDiagnostics(
                pb.GetDiagnosticsRequest(reset_rounds=reset_rounds),
                timeout=self.timeout_s,
                metadata=self._metadata,
            )
        except grpc.RpcError as error:
            raise SpecrayError.from_rpc(error) from None
        found: dict[str, Any] = json.loads(response.json)
        return found
