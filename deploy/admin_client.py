"""A small client for ``specray.v1.Admin``.

with AdminClient("127.0.0.1:50051") as admin:
    state = admin.scale(drafts=2)        # unset counts stay as they are
    print(state.drafts, state.targets)
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

import grpc

from specray.deploy.client import SpecrayError, bearer_metadata, open_channel
from specray.protos.specray.v1 import admin_pb2 as pb
from specray.protos.specray.v1 import admin_pb2_grpc as pb_grpc


class AdminClient:
    """Blocking client over one channel; ``timeout_s`` is each call's deadline
    (None: wait as long as scaling takes; starting a target group can take minutes).
    ``tls`` / ``tls_ca`` / ``token`` as for :class:`~specray.deploy.client.SpecrayClient`."""

    def __init__(
        self,
        address: str,
        timeout_s: float | None = None,
        *,
        tls: bool = False,
        tls_ca: Path | None = None,
        token: str | None = None,
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = open_channel(address, tls, tls_ca)
        self._stub = pb_grpc.AdminStub(self._channel)
        self._metadata = bearer_metadata(token)

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

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
