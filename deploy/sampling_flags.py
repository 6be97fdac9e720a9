"""The sampling, stopping and prompt flags of ``specray generate`` and
``specray client generate``, defined once so that the two commands read
the same words the same way."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_sampling_flags(
    parser: argparse.ArgumentParser, *, leave_unset: bool
) -> argparse._MutuallyExclusiveGroup:
    """Add the flags; return the required prompt-source group (``--prompt``,
    ``--prompt-file``), to which a command may add sources of its own.

    ``leave_unset``: --top-p, --top-k and --min-p default to None, so a
    server applies its own defaults; otherwise to the values that turn them
    off (1.0, 0, 0.0)."""
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    parser.add_argument("--top-p", type=float, default=None if leave_unset else 1.0)
    parser.add_argument("--top-k", type=int, default=None if leave_unset else 0)
    parser.add_argument("--min-p", type=float, default=None if leave_unset else 0.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt")
    source.add_argument("--prompt-file", type=Path)
    return source
