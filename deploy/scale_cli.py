"""``specray scale --drafts N --targets M [--server HOST:PORT]``: rescale a
running ``specray serve`` through its Admin service, then print its replicas.
Without ``--drafts`` or ``--targets`` it only prints them."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from specray.deploy.admin_client import AdminClient
from specray.deploy.client import SpecrayError
from specray.deploy.client_args import add_connection_args, connection_options, report_refusal
from specray.protos.specray.v1 import admin_pb2 as pb


def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("scale", help="rescale a running `specray serve` (drafts, targets)")
    p.add_argument("--drafts", type=int, default=None, help="draft replicas to run (0: none)")
    p.add_argument("--targets", type=int, default=None, help="target replicas (TP groups) to run")
    p.add_argument("--json", action="store_true", help="print the state as one JSON object")
    add_connection_args(p)
    return p


def run(args: argparse.Namespace) -> int:
    for name in ("drafts", "targets"):
        value = getattr(args, name)
        if value is not None and value < 0:
            print(f"error: --{name} must be >= 0, got {value}", file=sys.stderr)
            return 2
    seconds: float | None = None
    try:
        client = AdminClient(args.server, args.timeout, **connection_options(args))
        with client as admin:
            if args.drafts is None and args.targets is None:
                state = admin.state()
            else:
                response = admin.scale(args.drafts, args.targets)
                state, seconds = response.state, response.seconds
    except SpecrayError as error:
        return report_refusal(error)
    except OSError as error:  # an unreadable --tls-ca
        print(f"error: --tls-ca: {error}", file=sys.stderr)
        return 2
    if args.json:
        result = state_dict(state)
        if seconds is not None:
            result["seconds"] = round(seconds, 3)
        print(json.dumps(result))
    else:
        took = "" if seconds is None else f" (scaled in {seconds:.1f} s)"
        print(
            f"{state.backend}: {state.drafts} draft, {state.targets} target replica(s) of "
            f"tp {state.tensor_parallel_size} x ep {state.expert_parallel_size}; "
            f"{state.running} running, {state.waiting} "
            f"waiting{took}"
        )
    return 0


def state_dict(state: pb.ReplicaState) -> dict[str, Any]:
    """Every field, zeros included, under its proto name (numbers stay numbers)."""
    return {field.name: getattr(state, field.name) for field in state.DESCRIPTOR.fields}
