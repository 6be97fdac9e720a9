"""The ``specray`` command: one subcommand per module, each with
``register(subparsers)`` and ``run(args) -> int``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType


def _commands() -> list[ModuleType]:
    from specray.actors.store import cli as models
    from specray.deploy import (
        bench_cli,
        client_cli,
        cluster_cli,
        generate,
        plan_cli,
        scale_cli,
        serve,
        train_cli,
    )

    return [
        generate,
        models,
        serve,
        client_cli,
        scale_cli,
        bench_cli,
        cluster_cli,
        plan_cli,
        train_cli,
    ]


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, ModuleType]]:
    parser = argparse.ArgumentParser(
        prog="specray", description="Distributed speculative decoding on Ray."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    handlers = {}
    for module in _commands():
        sub = module.register(subparsers)
        handlers[sub.prog.split()[-1]] = module
    return parser, handlers


def main(argv: Sequence[str] | None = None) -> int:
    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    return int(handlers[args.command].run(args))


if __name__ == "__main__":
    sys.exit(main())
