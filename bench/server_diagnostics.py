"""What a served run's speculation decisions rested on, read over Admin
``GetDiagnostics``: the router's cost models and shared copy estimates at
the start and end of each arm, the replicas it lost meanwhile, and the
arm's rounds by verified size.

A router keeps what earlier requests taught it (the client's warm-up
included), so a served level's result depends on more than its prompts;
these are what ``specray bench serve`` records beside each run so that such
a dependence can be read off the result instead of guessed.
"""

from __future__ import annotations

import json
from typing import Any

import grpc

from specray.bench import round_sizes
from specray.bench.common import cell, table
from specray.bench.serve_metrics import ARM_NAMES
from specray.cluster.router_state import describe_weights
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


def _estimates_row(arm: str, when: str, found: dict[str, Any]) -> list[str]:
    estimates = found["copy_estimates"]
    pooled = estimates.get("pool", {}).get("overall")
    calibration = estimates.get("calibration", {})
    return [
        arm,
        when,
        " / ".join(cell(v) for v in pooled) if pooled else "–",
        " / ".join(cell(v) for v in calibration.values()) if calibration else "–",
    ]


def diagnostics_lines(run: dict[str, Any]) -> list[str]:
    """A served level's diagnostics as Markdown: the copy estimates each arm
    started and ended with, and the speculative arm's rounds by verified
    size beside the target-only arm's decode round; nothing where the
    server offered none."""
    found = run.get("diagnostics") or {}
    if not found:
        return []
    rows = [
        _estimates_row(ARM_NAMES.get(arm, arm), when, reads[when])
        for arm, reads in found.items()
        for when in ("start", "end")
    ]
    first_read = next(iter(found.values()))["start"]
    first = first_read["copy_estimates"]
    depths = " / ".join(str(d) for d in first.get("depths", ()))
    points = " / ".join(first.get("calibration", {}))
    loaded = describe_weights(first_read.get("weights", {}))
    lines = ["", f"Weights the replicas loaded (Admin diagnostics): {loaded}."] if loaded else []
    lines += losses_lines(found)
    lines += [
        "",
        "The router's shared copy estimates (Admin diagnostics): pooled acceptance "
        f"given the parent's at depths {depths}, and what the survival calibration "
        f"maps estimates of {points} to. A request starts from these.",
        "",
        *table(["arm", "at", "pooled acceptance", "calibration"], rows, left=2),
    ]
    if "spec" in found and "no_spec" in found:
        plain = round_sizes.plain_round(sizes_of(found["no_spec"]))
        if plain is not None:
            size_rows = round_sizes.size_rows(sizes_of(found["spec"]), plain)
            lines += ["", round_sizes.TEXT, "", *table(round_sizes.HEADERS, size_rows, left=1)]
    return lines


def losses_lines(found: dict[str, Any]) -> list[str]:
    """The replicas each arm's router lost (and replaced) while it ran: a
    lost replica's restart shares the cores with the rest, so an arm that
    lost one was slowed by more than its own work. Nothing for results
    from before the diagnostics counted them."""
    parts = []
    for arm, reads in found.items():
        start, end = reads["start"].get("recovery"), reads["end"].get("recovery")
        if start is None or end is None:
            return []
        lost = [end[f"{kind}_failures"] - start[f"{kind}_failures"] for kind in ("draft", "target")]
        parts.append(f"{ARM_NAMES.get(arm, arm)} {lost[0]} draft, {lost[1]} target")
    return ["", f"Replicas lost during each arm (Admin diagnostics): {'; '.join(parts)}."]


def sizes_of(reads: dict[str, Any]) -> round_sizes.Sizes:
    """An arm's rounds by size, as its closing read counted them."""
    return round_sizes.sizes_ms(reads["end"]["rounds"]["by_verified"])
