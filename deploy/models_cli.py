"""``specray models fetch|list``: argparse glue over the store API."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from specray.actors.store.errors import StoreError
from specray.actors.store.layout import DEFAULT_DTYPE, DTYPES
from specray.actors.store.listing import list_models
from specray.actors.store.registry import REGISTRY
from specray.actors.store.resolve import resolve_model


def register(subparsers: Any) -> argparse.ArgumentParser:  # argparse's _SubParsersAction
    """Add the ``models`` command to ``subparsers``; dispatch parsed args to :func:`run`."""
    home = argparse.ArgumentParser(add_help=False)
    home.add_argument(
        "--home",
        type=Path,
        default=None,
        help="store directory (default: $SPECRAY_HOME, else ~/.cache/specray)",
    )
    models = subparsers.add_parser("models", help="fetch and list checkpoints in the local store")
    commands = models.add_subparsers(dest="models_command", required=True)
    fetch = commands.add_parser(
        "fetch", parents=[home], help="download a checkpoint and convert it to safetensors"
    )
    fetch.add_argument(
        "name", help=f"a registered model ({', '.join(sorted(REGISTRY))}) or a .gguf file"
    )
    fetch.add_argument("--dtype", choices=DTYPES, default=DEFAULT_DTYPE)
    fetch.add_argument("--quiet", action="store_true", help="no progress output")
    commands.add_parser("list", parents=[home], help="show registered and cached checkpoints")
    return models


def run(args: argparse.Namespace) -> int:
    """Carry out a parsed ``models`` command; returns the exit status."""
    try:
        if args.models_command == "fetch":
            progress = not args.quiet
            print(resolve_model(args.name, home=args.home, dtype=args.dtype, progress=progress))
        else:
            _print_table(args.home)
    except StoreError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def _print_table(home: Path | None) -> None:
    rows = list_models(home)
    width = max(len(row.name) for row in rows)
    print(f"{'NAME':<{width}}  {'DTYPE':<8}  {'GGUF':>9}  {'CACHED':>9}  PATH")
    for row in rows:
        cached = f"{row.disk_bytes / 2**20:,.0f} MiB" if row.cached else "-"
        print(
            f"{row.name:<{width}}  {row.dtype:<8}  {row.source_bytes / 2**20:>5,.0f} MiB"
            f"  {cached:>9}  {row.path}"
        )
