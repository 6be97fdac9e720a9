"""The block kernel's matmuls at this tree against another revision's, on
every block weight of a GGUF model: two processes, each loading the model
with its own revision's package (kernel sources, weight layout and packing
alike), timed in alternation so that machine drift hits both alike.

For each number of activation rows (a verify of that many tokens) the two
processes run every weight of the model once per repeat, one after the other
(never at once), in alternating order; the table keeps the median per build
and says whether the two builds' outputs are identical bit for bit.

    python -m specray.bench.kernel_ab --base 2cbbd80 --tag rowtile8

Writes ``kernel_ab_<target>[_<tag>].{json,md}`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from specray.actors.parallel.block_kernel import SWITCH
from specray.bench.common import bench_parser, int_list, run_record, write_report
from specray.bench.run_report import Cell, column_report

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("kernel_ab_worker.py")
COLUMNS: dict[str, Cell] = {
    "rows": "rows",
    "base ms": "base_ms",
    "head ms": "head_ms",
    "head / base": "head_vs_base",
    "base cost(n)/cost(1)": "base_vs_one",
    "head cost(n)/cost(1)": "head_vs_one",
    "outputs identical": lambda row: "yes" if row["identical"] else "NO",
}


class Side:
    """One revision's worker process (bench/kernel_ab_worker.py)."""

    def __init__(self, tree: Path, target: str, threads: int, avx2: bool, work: Path) -> None:
        # PYTHONPATH names a folder whose `specray` is the revision's tree.
        path = work / f"path-{id(self)}"
        path.mkdir()
        (path / "specray").symlink_to(tree.resolve())
        env = {**os.environ, "PYTHONPATH": str(path), "OMP_NUM_THREADS": str(threads)}
        if avx2:
            env[SWITCH] = "avx2"
        command = [sys.executable, "-c", WORKER.read_text(), target, str(threads)]
        self.process = subprocess.Popen(
            command, cwd=work, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.loaded = self._reply()
        if not self.loaded["weights"]:
            raise SystemExit(f"{target}: no weight runs on the block kernel at {tree}")

    def run(self, rows: int) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"rows": rows}) + "\n")
        self.process.stdin.flush()
        return self._reply()

    def _reply(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"kernel_ab worker exited with {self.process.wait()}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        base_tree = stack.enter_context(_checkout(args.base, work / "base"))
        sides = {}
        for name, tree in (("base", base_tree), ("head", REPO)):
            sides[name] = Side(tree, args.target, args.threads, args.avx2, work)
            stack.callback(sides[name].close)
        if sides["base"].loaded != sides["head"].loaded:
            loaded = {name: side.loaded for name, side in sides.items()}
            raise SystemExit(f"the two revisions load the model differently: {loaded}")
        rows = [_measure(sides, count, args.repeats) for count in args.rows]
    for row in rows:
        row["base_vs_one"] = round(row["base_ms"] / rows[0]["base_ms"], 2)
        row["head_vs_one"] = round(row["head_ms"] / rows[0]["head_ms"], 2)
    flags = ("target", "base", "threads", "repeats", "avx2")
    result = run_record(
        "specray.bench.kernel_ab",
        argv,
        args,
        flags,
        vnni=sides["head"].loaded["vnni"],
        weights=sides["head"].loaded["weights"],
        head=_this_tree(),
        rows=rows,
    )
    stem = f"kernel_ab_{Path(args.target).name}" + (f"_{args.tag}" if args.tag else "")
    write_report(args.out, stem, result, markdown(result))
    return result


@contextmanager
def _checkout(revision: str, into: Path) -> Iterator[Path]:
    """``revision``'s tree, checked out (detached) at ``into`` for the run."""
    git = ["git", "-C", str(REPO)]
    subprocess.run(
        [*git, "worktree", "add", "--detach", str(into), revision], check=True, capture_output=True
    )
    try:
        yield into
    finally:
        subprocess.run([*git, "worktree", "remove", "--force", str(into)], capture_output=True)


def _this_tree() -> str:
    """This tree's revision, ``-dirty`` where it has uncommitted changes."""
    command = ["git", "-C", str(REPO), "describe", "--always", "--dirty"]
    return subprocess.run(command, capture_output=True).stdout.decode().strip() or "unknown"


def _measure(sides: dict[str, Side], count: int, repeats: int) -> dict[str, Any]:
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    digests: dict[str, set[str]] = {name: set() for name in sides}
    names = list(sides)
    for name in names:  # a first pass each, untimed: allocation, caches
        sides[name].run(count)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            reply = sides[name].run(count)
            seconds[name].append(reply["seconds"])
            digests[name].add(reply["digest"])
    base_ms, head_ms = (1e3 * statistics.median(seconds[name]) for name in names)
    return {
        "rows": count,
        "base_ms": round(base_ms, 2),
        "head_ms": round(head_ms, 2),
        "head_vs_base": round(head_ms / base_ms, 3),
        "identical": digests["base"] == digests["head"] and len(digests["head"]) == 1,
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
    p.add_argument("--base", required=True, help="git revision to compare this tree with")
    p.add_argument("--avx2", action="store_true", help="both builds' AVX2 inner loop")
    p.add_argument("--rows", type=int_list, default=[1, 2, 4, 8, 9, 12, 16, 17])
    p.add_argument("--repeats", type=int, default=9)
    p.set_defaults(out=Path(__file__).parent / "results")
    return p


if __name__ == "__main__":
    main()
