"""Two versions of the code through the router benchmark, run back to back
on one machine (A, B, A, B...), so that the drift of a shared machine hits
both alike: tokens/s per mode and concurrency for every run, and the ratio
of the two versions within each round.

    python -m specray.bench.router_compare --label new --label old \\
        --runs NEW1.json OLD1.json NEW2.json OLD2.json --stem router_ab_c1c8

The runs alternate between the labels in the order given; each is a JSON
that ``python -m specray.bench.router_bench`` wrote. Writes ``STEM.{json,md}``
under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from specray.bench.common import machine_line, table, write_report


def compare(runs: Sequence[dict[str, Any]], labels: Sequence[str]) -> dict[str, Any]:
    """Rows of tokens/s per (mode, concurrency): one column per run, and the
    first label ÷ the second within each round (consecutive runs)."""
    if len(labels) != 2 or len(runs) % 2:
        raise ValueError(f"need two labels and whole rounds, got {labels} and {len(runs)} runs")
    keys = sorted({(r["mode"], r["concurrency"]) for run in runs for r in run["sweep"]})
    rows = []
    for mode, concurrency in keys:
        speeds = [_tokens_per_s(run, mode, concurrency) for run in runs]
        ratios = [
            round(first / second, 3)
            for first, second in zip(speeds[::2], speeds[1::2], strict=True)
            if first is not None and second
        ]
        rows.append(
            {
                "mode": mode,
                "concurrency": concurrency,
                "tokens_per_s": speeds,
                "ratios": ratios,
                "median_ratio": round(statistics.median(ratios), 3) if ratios else None,
            }
        )
    return {"labels": list(labels), "rows": rows}


def _tokens_per_s(run: dict[str, Any], mode: str, concurrency: int) -> float | None:
    found = [r for r in run["sweep"] if (r["mode"], r["concurrency"]) == (mode, concurrency)]
    return found[0]["tokens_per_s"] if found else None


def markdown(result: dict[str, Any]) -> str:
    first, second = result["labels"]
    rounds = len(result["rows"][0]["ratios"]) if result["rows"] else 0
    headers = ["mode", "c"]
    headers += [f"{label} {i + 1} tok/s" for i in range(rounds) for label in (first, second)]
    headers += [f"{first} ÷ {second} per round", "median"]
    rows = []
    for row in result["rows"]:
        ratios = " / ".join(map(str, row["ratios"]))
        speeds = row["tokens_per_s"]
        rows.append([row["mode"], row["concurrency"], *speeds, ratios, row["median_ratio"]])
    lines = [
        f"### Router benchmark, {first} against {second}: {result['target']} "
        f"({result['dtype']}, {result['max_tokens']} tokens, k {result['k']})",
        "",
        f"Machine: {machine_line(result['machine'])}. Runs alternate {first}, {second}, "
        f"... back to back; each cell is one run's tokens/s (its faster pass).",
        "",
        *table(headers, rows, left=1),
        "",
        "Runs: " + "; ".join(f"`{run}`" for run in result["runs"]),
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    runs = [json.loads(path.read_text()) for path in args.runs]
    result = compare(runs, args.label)
    first = runs[0]
    result |= {key: first[key] for key in ("target", "dtype", "max_tokens", "k", "machine")}
    result["runs"] = [str(path) for path in args.runs]
    write_report(args.out, args.stem, result, markdown(result))
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--label", action="append", required=True, help="twice: the two versions")
    p.add_argument("--runs", type=Path, nargs="+", required=True, help="router_bench JSONs")
    p.add_argument("--stem", default="router_ab")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    return p


if __name__ == "__main__":
    main()
