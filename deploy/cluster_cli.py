"""``specray cluster check``: all-reduce bandwidth and latency within every
node of a Ray cluster and across its nodes, as nccl-tests tables, failing
(exit 1) when a threshold is missed."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import ray

from specray.cluster.local_ray import start_ray
from specray.cluster.preflight.check import CheckSettings, PreflightError, run_check
from specray.cluster.preflight.nccl_tests import parse_size
from specray.cluster.preflight.report import Thresholds, evaluate, report_dict, report_text


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("cluster", help="check a Ray cluster before placing shards on it")
    commands = p.add_subparsers(dest="cluster_command", required=True)
    check = commands.add_parser(
        "check", help="all-reduce busbw and latency per node and across nodes (nccl-tests terms)"
    )
    check.add_argument(
        "--address", default=None, help="Ray cluster to join (default: embedded Ray on loopback)"
    )
    check.add_argument(
        "--mode",
        choices=["auto", "nccl-tests", "torch"],
        default="auto",
        help="auto: all_reduce_perf on nodes with it and >= 2 GPUs, else torch.distributed",
    )
    check.add_argument("--min-bytes", type=_size, default=8, help="first size (8, 64K, 1M)")
    check.add_argument(
        "--max-bytes", type=_size, default=None, help="last size (default: 128M GPU, 1M CPU)"
    )
    check.add_argument("--factor", type=int, default=2, help="size multiplier per step")
    check.add_argument("--dtype", default="float32", help="torch dtype (nccl-tests -d float)")
    check.add_argument("--warmup", type=int, default=5, help="untimed all-reduces per size")
    check.add_argument("--iters", type=int, default=20, help="timed all-reduces per size")
    check.add_argument("--ranks-per-node", type=int, default=2, help="gloo ranks on CPU nodes")
    check.add_argument("--no-cross-node", action="store_true", help="skip the cross-node group")
    check.add_argument("--timeout", type=float, default=300.0, help="seconds per step")
    check.add_argument(
        "--min-busbw-gbps", type=float, default=None, help="per node, at the largest size"
    )
    check.add_argument(
        "--min-cross-busbw-gbps", type=float, default=None, help="across nodes, largest size"
    )
    check.add_argument(
        "--max-latency-us", type=float, default=None, help="every group, at the smallest size"
    )
    check.add_argument("--json", action="store_true", help="print the report as one JSON object")
    return p


def run(args: argparse.Namespace) -> int:
    try:
        settings = CheckSettings(
            min_bytes=args.min_bytes,
            max_bytes=args.max_bytes,
            factor=args.factor,
            dtype=args.dtype,
            warmup=args.warmup,
            iters=args.iters,
            mode=args.mode,
            ranks_per_node=args.ranks_per_node,
            cross_node=not args.no_cross_node,
            timeout_s=args.timeout,
        )
        thresholds = Thresholds(args.min_busbw_gbps, args.min_cross_busbw_gbps, args.max_latency_us)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    joined_here = not ray.is_initialized()
    try:
        start_ray(args.address)
        groups = run_check(settings)
    except (PreflightError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        if joined_here:
            ray.shutdown()
    report = evaluate(groups, thresholds)
    print(json.dumps(report_dict(report)) if args.json else report_text(report))
    if not report.ok and args.json:
        for failure in report.failures:
            print(f"error: {failure}", file=sys.stderr)
    return 0 if report.ok else 1
