"""The ``specray`` command: one subcommand per module, each with
``register(subparsers)`` and ``run(args) -> int``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType


def _commands() -> list[ModuleType]:
    # Imported when the command line is built, not with this module: bench/
    # is a client of the server and imports deploy/, never the other way.
    from specray.bench import cli as bench_cli
    from specray.deploy import (
        client_cli,
        cluster_cli,
        generate,
        models_cli,
        plan_cli,
        scale_cli,
        serve,
        train_cli,
    )

    return [
        generate,
        models_cli,
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
