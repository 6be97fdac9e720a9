"""What a served run's speculation decisions rested on, read over Admin
``GetDiagnostics``: the router's cost models and shared copy estimates at
the start and end of each arm, and the arm's rounds by verified size.

A router keeps what earlier requests taught it (the client's warm-up
included), so a served level's result depends on more than its prompts;
these are what ``specray bench serve`` records beside each run so that such
a dependence can be read off the result instead of guessed.
"""

from __future__ import annotations

import json
from typing import Any

import grpc

from specray.protos.specray.v1 import admin_pb2 as admin_pb
from specray.protos.specray.v1 import admin_pb2_grpc as admin_grpc

# The server has no Admin service, or its backend keeps no diagnostics.
NOT_OFFERED = (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.PERMISSION_DENIED)


async def read_diagnostics(
    channel: grpc.aio.Channel, reset_rounds: bool, timeout_s: float
) -> dict[str, Any] | None:
    """The server's diagnostics now (``reset_rounds``: count rounds afresh
    after reading); None where the server does not offer them."""
    stub = admin_grpc.AdminStub(channel)
    request = admin_pb.GetDiagnosticsRequest(reset_rounds=reset_rounds)
    try:
        response = await stub.GetDiagnostics(request, timeout=timeout_s)
    except grpc.aio.AioRpcError as error:
        if error.code() in NOT_OFFERED:
            return None
        raise
    found: dict[str, Any] = json.loads(response.json)
    return found


def arm_names(parts: int, spec_first: bool) -> list[str]:
    """What each part of a level's plan sends: one arm each with phases,
    both interleaved otherwise."""
    if parts == 1:
        return ["both"]
    return ["spec", "no_spec"] if spec_first else ["no_spec", "spec"]
