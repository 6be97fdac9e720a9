"""The flags every command that talks to a running ``specray serve`` takes:
where it is, the deadline, and how to authenticate; and how such a command
reports a refused call."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import grpc

from specray.deploy.auth import TOKEN_ENV
from specray.deploy.client import SpecrayError


def add_connection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT of the gRPC server")
    parser.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    parser.add_argument("--tls", action="store_true", help="connect with TLS (the system's CAs)")
    parser.add_argument(
        "--tls-ca", type=Path, default=None, help="PEM CA of the server (implies TLS)"
    )
    parser.add_argument(
        "--token",
        default=None,
        help=f"bearer token (default ${TOKEN_ENV}; the variable keeps it out of `ps`)",
    )


def connection_options(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for a :class:`~specray.deploy.client.ChannelClient`."""
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV)
    return {"tls": args.tls, "tls_ca": args.tls_ca, "token": token}


def report_refusal(error: SpecrayError) -> int:
    """Print the server's refusal; the exit status: 2 when the request itself
    was invalid (the caller's flags), else 1."""
    print(f"error: {error}", file=sys.stderr)
    return 2 if error.code == grpc.StatusCode.INVALID_ARGUMENT else 1
