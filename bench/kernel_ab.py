"""The block kernel's matmuls at this tree against another revision's, on
every block weight of a GGUF model, interleaved in one process (the two
builds are two loaded libraries), so machine drift hits both alike.

For each number of activation rows (a verify of that many tokens) both
builds run every weight of the model once per repeat, in alternating order;
the table keeps the median per build and says whether the two builds'
outputs are identical bit for bit.

    python -m specray.bench.kernel_ab --base 2cbbd80 --tag rowtile8

Writes ``kernel_ab_<target>[_<tag>].{json,md}`` under ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from specray.actors.model.loader import load_model
from specray.actors.parallel.block_kernel import BoundMatmul, build_block_kernel
from specray.actors.parallel.block_weights import BlockWeights
from specray.actors.parallel.kernel_build import CSRC, HEADERS, SOURCES
from specray.actors.store.resolve import resolve_model
from specray.bench.common import bench_parser, int_list, run_record, write_report
from specray.bench.run_report import Cell, column_report

REPO = Path(__file__).resolve().parents[1]
COLUMNS: dict[str, Cell] = {
    "rows": "rows",
    "base ms": "base_ms",
    "head ms": "head_ms",
    "head / base": "head_vs_base",
    "base cost(n)/cost(1)": "base_vs_one",
    "head cost(n)/cost(1)": "head_vs_one",
    "outputs identical": lambda row: "yes" if row["identical"] else "NO",
}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(resolve_model(args.target), torch.bfloat16, weights="gguf")
    weights = [m for m in model.modules() if isinstance(m, BlockWeights)]
    if not weights:
        raise SystemExit(f"{args.target}: no weight runs on the block kernel here")
    vnni = weights[0].kernel.vnni and not args.avx2
    with tempfile.TemporaryDirectory() as work:
        base = build_block_kernel(vnni, _sources_at(args.base, Path(work)))
        head = build_block_kernel(vnni, CSRC)
        builds = {
            "base": [base.bind(w.packed()) for w in weights],
            "head": [head.bind(w.packed()) for w in weights],
        }
    rows = [_measure(builds, weights, count, args.repeats) for count in args.rows]
    for row in rows:
        row["base_vs_one"] = round(row["base_ms"] / rows[0]["base_ms"], 2)
        row["head_vs_one"] = round(row["head_ms"] / rows[0]["head_ms"], 2)
    flags = ("target", "base", "threads", "repeats", "avx2")
    result = run_record(
        "specray.bench.kernel_ab",
        argv,
        args,
        flags,
        vnni=vnni,
        weights=len(weights),
        head=_this_tree(),
        rows=rows,
    )
    stem = f"kernel_ab_{args.target}" + (f"_{args.tag}" if args.tag else "")
    write_report(args.out, stem, result, markdown(result))
    return result


def _sources_at(revision: str, into: Path) -> Path:
    """The kernel sources of ``revision``, written under ``into``."""
    folder = CSRC.resolve().relative_to(REPO)
    for name in (*SOURCES, *HEADERS):
        text = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{revision}:{folder / name}"],
            capture_output=True,
            check=True,
        ).stdout
        (into / name).write_bytes(text)
    return into


def _this_tree() -> str:
    """This tree's revision, ``-dirty`` where it has uncommitted changes."""
    command = ["git", "-C", str(REPO), "describe", "--always", "--dirty"]
    return subprocess.run(command, capture_output=True).stdout.decode().strip() or "unknown"


def _measure(
    builds: dict[str, list[BoundMatmul]],
    weights: list[BlockWeights],
    count: int,
    repeats: int,
) -> dict[str, Any]:
    inputs = [torch.randn(count, w.in_features, dtype=torch.bfloat16) for w in weights]
    outputs = {
        name: [torch.empty(count, w.out_features, dtype=torch.bfloat16) for w in weights]
        for name in builds
    }
    seconds: dict[str, list[float]] = {name: [] for name in builds}
    names = list(builds)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            began = time.perf_counter()
            for matmul, x, y in zip(builds[name], inputs, outputs[name], strict=True):
                matmul(x, y)
            seconds[name].append(time.perf_counter() - began)
    identical = all(
        torch.equal(a, b) for a, b in zip(outputs["base"], outputs["head"], strict=True)
    )
    base_ms, head_ms = (1e3 * statistics.median(seconds[name]) for name in names)
    return {
        "rows": count,
        "base_ms": round(base_ms, 2),
        "head_ms": round(head_ms, 2),
        "head_vs_base": round(head_ms / base_ms, 3),
        "identical": identical,
    }


def markdown(result: dict[str, Any]) -> str:
    title = (
        f"Block kernel, {result['head']} against {result['base']}: every block weight of "
        f"{result['target']} ({result['weights']} matmuls, "
        f"{'AVX512-VNNI' if result['vnni'] else 'AVX2'} build, {result['threads']} threads, "
        f"median of {result['repeats']}, interleaved)"
    )
    return column_report(title, result, COLUMNS, 0, notes=[f"`{result['command']}`"])


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser(__doc__, target="qwen2.5-coder-1.5b-instruct", dtype=None)
    p.add_argument("--tag", default="", help="suffix of the output files")
    p.add_argument("--base", required=True, help="git revision whose kernel sources to compare")
    p.add_argument("--avx2", action="store_true", help="both builds' AVX2 inner loop")
    p.add_argument("--rows", type=int_list, default=[1, 2, 4, 8, 9, 12, 16, 17])
    p.add_argument("--repeats", type=int, default=9)
    p.set_defaults(out=Path(__file__).parent / "results")
    return p


if __name__ == "__main__":
    main()
