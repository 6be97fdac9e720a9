"""``specray bench serve ...``: benchmark a running ``specray serve`` with
speculation on and off in one run (see :mod:`specray.bench.serve_bench`)."""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from pathlib import Path
from typing import Any

import grpc

from specray.bench import serve_bench
from specray.bench.common import int_list
from specray.bench.prompts import ALL_CATEGORIES
from specray.bench.serve_dataset import AB_ORDERS, RANDOM
from specray.bench.serve_report import load_results, print_and_write


def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="benchmarks against a running server")
    commands = p.add_subparsers(dest="bench_command", required=True)
    serve = commands.add_parser(
        "serve",
        help="load a running server over gRPC; TTFT, TPOT, ITL, E2EL, spec vs no spec",
        description=serve_bench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_serve_arguments(serve)
    return p


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT of the gRPC server")
    p.add_argument("--label", default=None, help="the run's drafter label (default: the server's)")
    p.add_argument("--dataset", default="shipped", choices=["shipped", RANDOM])
    categories = ", ".join(ALL_CATEGORIES)
    p.add_argument("--categories", default=None, help=f"comma list from {categories}")
    p.add_argument("--split", default="eval", choices=["train", "eval", "all"])
    p.add_argument(
        "--num-prompts",
        type=int,
        default=None,
        help="per level, at least its concurrency (cycled); default: the whole split (16 random)",
    )
    p.add_argument(
        "--random-input-len",
        type=int_list,
        default=[128],
        help="prompt lengths, cycled over the random prompts: 3000,128,128,128 mixes one "
        "long prompt into every four",
    )
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument(
        "--tokenizer",
        default=None,
        help="NAME|PATH: apply its chat template, send token ids (default: raw text, no template)",
    )
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")
    p.add_argument("--seed", type=int, default=0, help="prompt order, arrivals and sampling")
    p.add_argument("--num-speculative-tokens", type=int, default=None, help="spec arm's k ceiling")
    p.add_argument(
        "--fixed-speculation",
        action="store_true",
        help="the spec arm verifies its whole k every round, past the server's verify budget "
        "(fixed k beside an adaptive run on the same server)",
    )
    load = p.add_argument_group("load (neither --request-rate nor a cap: one request at a time)")
    load.add_argument("--request-rate", type=float, default=None, help="Poisson requests/s")
    load.add_argument(
        "--max-concurrency", type=int, default=None, help="requests in flight at most"
    )
    load.add_argument(
        "--sweep-concurrency",
        type=int_list,
        default=None,
        help="one run per cap, e.g. 1,4,8,16 (for TPOT vs concurrency)",
    )
    load.add_argument(
        "--waves",
        type=int,
        default=1,
        help="each level sends at least this many times its concurrency cap of prompts: one "
        "wave measures its slowest request's span, several the sustained throughput",
    )
    p.add_argument("--ab-order", default="pairs", choices=AB_ORDERS, help="see the module doc")
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="random prompts sent (both arms) before measuring, none of them measured",
    )
    p.add_argument(
        "--prime-cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="prefill each level's new prompts once (one token, unmeasured) so neither arm "
        "finds a prefix cache the other warmed",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="deadline per request, seconds")
    p.add_argument("--draft-cost", type=float, default=None, help="c for the analytic limit S")
    p.add_argument("--verify-cost", type=float, default=None, help="cost(γ+1)/cost(1) for S")
    p.add_argument("--save-result", type=Path, default=None, help="JSON path; .md/.png beside it")
    p.add_argument(
        "--plot-from",
        type=Path,
        nargs="+",
        default=None,
        help="combine saved result JSONs into one table and plots (no server needed)",
    )


def check_args(args: argparse.Namespace) -> str | None:
    """The first bad flag, named with its limit and the value given; None if all are good."""
    at_least_one = [
        "num_prompts",
        "max_tokens",
        "max_concurrency",
        "random_output_len",
        "num_speculative_tokens",
    ]
    for key in at_least_one:
        value = getattr(args, key)
        if value is not None and value < 1:
            return f"--{key.replace('_', '-')} must be >= 1, got {value}"
    for key in ("sweep_concurrency", "random_input_len"):
        bad = [value for value in getattr(args, key) or () if value < 1]
        if bad or getattr(args, key) == []:
            return f"--{key.replace('_', '-')} values must be >= 1, got {getattr(args, key)}"
    checks = [
        ("request_rate", lambda v: v > 0, "> 0"),
        ("temperature", lambda v: v >= 0 and math.isfinite(v), ">= 0 and finite"),
        ("timeout", lambda v: v > 0, "> 0"),
        ("warmup", lambda v: v >= 0, ">= 0"),
        ("waves", lambda v: v >= 1, ">= 1"),
        ("draft_cost", lambda v: v >= 0, ">= 0"),
        ("verify_cost", lambda v: v > 0, "> 0"),
    ]
    for key, good, limit in checks:
        value = getattr(args, key)
        if value is not None and not good(value):
            return f"--{key.replace('_', '-')} must be {limit}, got {value}"
    if args.sweep_concurrency and args.max_concurrency is not None:
        return "--sweep-concurrency and --max-concurrency are exclusive"
    if args.categories and args.dataset == RANDOM:
        return "--categories applies to --dataset shipped only"
    if args.categories:
        unknown = [c for c in args.categories.split(",") if c not in ALL_CATEGORIES]
        if unknown:
            return f"--categories: unknown {unknown}; choose from {', '.join(ALL_CATEGORIES)}"
    if args.plot_from and not args.save_result:
        return "--plot-from needs --save-result (the stem of the combined .md and .png)"
    return None


def run(args: argparse.Namespace) -> int:
    """``bench serve``: 0 when it ran, 2 for bad flags, 1 when the server
    could not be reached. (The only sub-subcommand; argparse requires it.)"""
    problem = check_args(args)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.plot_from:
        print_and_write(load_results(args.plot_from), args.save_result, combined=True)
        return 0
    try:
        result = asyncio.run(serve_bench.benchmark(args))
    except ValueError as error:  # a dataset that cannot be built from these flags
        print(f"error: {error}", file=sys.stderr)
        return 2
    except grpc.aio.AioRpcError as error:
        print(f"error: {args.server}: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    print_and_write([result], args.save_result, combined=False)
    return 0
