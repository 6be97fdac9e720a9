"""The verify budget beside fixed k on one server: reads the results of
``specray bench serve`` runs made back to back against one server, some
adaptive and some with ``--fixed-speculation --num-speculative-tokens K``,
and writes per drafter and concurrency each arm's spec-arm figures (the
mean over its runs) and the budget's ratio to the best fixed k.

Runs on one server share its suffix cache, its learned costs and the
machine's state of the moment, so the spec arms compare directly; the
target-only arm of each run is kept beside them, because it moves between
runs too (the budget's own out tokens/s ÷ its runs' target-only is the
"never slower than no speculation" check).

    python -m specray.bench.budget_vs_fixed --out bench/results/serve/NAME.md RESULT.json...
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any

from specray.bench.common import machine_line
from specray.bench.serve_report import load_results

ADAPTIVE = "adaptive"


@dataclass(frozen=True)
class ArmLevel:
    """One arm at one concurrency, averaged over its runs."""

    runs: int
    tpot_ms: float  # the spec arm's mean TPOT
    out_tok_s: float  # the spec arm's output tokens/s over its span
    base_tpot_ms: float  # the same runs' target-only arm
    base_out_tok_s: float
    # per prompt class: the spec arm's Σ tokens / Σ E2EL (a request's own rate)
    class_tok_s: dict[str, float]


def arm_name(result: dict[str, Any]) -> str:
    settings = result["settings"]
    return f"fixed k = {settings['gamma']}" if settings.get("fixed_speculation") else ADAPTIVE


def table(results: Sequence[dict[str, Any]]) -> dict[str, dict[int, dict[str, ArmLevel]]]:
    """drafter → concurrency → arm → its figures."""
    runs: dict[tuple[str, int, str], list[dict[str, Any]]] = defaultdict(list)
    for result in results:
        drafter = "+".join(result["model"]["drafts"]) or "none"
        for run in result["runs"]:
            runs[(drafter, run["concurrency"], arm_name(result))].append(run)
    out: dict[str, dict[int, dict[str, ArmLevel]]] = defaultdict(lambda: defaultdict(dict))
    for (drafter, concurrency, arm), measured in sorted(runs.items()):
        modes = [run["modes"] for run in measured]
        rows = [run["categories"] for run in measured]
        out[drafter][concurrency][arm] = ArmLevel(
            len(modes),
            mean(m["spec"]["tpot_ms"]["mean"] for m in modes),
            mean(m["spec"]["output_tokens_per_s"] for m in modes),
            mean(m["no_spec"]["tpot_ms"]["mean"] for m in modes),
            mean(m["no_spec"]["output_tokens_per_s"] for m in modes),
            _class_rates(rows),
        )
    return out


def _class_rates(rows: list[list[dict[str, Any]]]) -> dict[str, float]:
    """Each class's spec-arm tokens/s per request, the mean over runs."""
    rates: dict[str, list[float]] = defaultdict(list)
    for categories in rows:
        for row in categories:
            if row["spec_tokens_per_s"] is not None:
                rates[row["category"]].append(row["spec_tokens_per_s"])
    return {name: mean(values) for name, values in rates.items()}


def markdown(results: Sequence[dict[str, Any]], command: str) -> str:
    machines = sorted({machine_line(r["machine"]) for r in results})
    lines = [
        "### The verify budget beside fixed k, one server",
        "",
        f"`{command}`",
        "",
        f"Machine: {'; '.join(machines)}. Each cell is the mean over that arm's runs "
        "(`runs`); TPOT and out tokens/s are the spec arm's, `no spec` the same runs' "
        "target-only arm. Best fixed: the fixed k with the most out tokens/s at that level.",
        "",
        "| drafter | concurrency | arm | runs | TPOT ms | out tok/s | no spec TPOT ms "
        "| no spec out tok/s |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    ratios = [
        "| drafter | concurrency | best fixed | budget ÷ best fixed, out tok/s "
        "| best fixed ÷ budget, TPOT | budget out tok/s ÷ its no spec |",
        "|---|---:|---|---:|---:|---:|",
    ]
    classes = [
        "| drafter | concurrency | class | best fixed | budget ÷ best fixed, tok/s per request |",
        "|---|---:|---|---|---:|",
    ]
    for drafter, levels in table(results).items():
        for concurrency, arms in levels.items():
            for arm, level in arms.items():
                lines.append(
                    f"| {drafter} | {concurrency} | {arm} | {level.runs} | {level.tpot_ms:.1f} "
                    f"| {level.out_tok_s:.2f} | {level.base_tpot_ms:.1f} "
                    f"| {level.base_out_tok_s:.2f} |"
                )
            fixed = {arm: level for arm, level in arms.items() if arm != ADAPTIVE}
            budget = arms.get(ADAPTIVE)
            if budget is None or not fixed:
                continue
            best = max(fixed, key=lambda arm: fixed[arm].out_tok_s)
            ratios.append(
                f"| {drafter} | {concurrency} | {best} "
                f"| {budget.out_tok_s / fixed[best].out_tok_s:.2f} "
                f"| {fixed[best].tpot_ms / budget.tpot_ms:.2f} "
                f"| {budget.out_tok_s / budget.base_out_tok_s:.2f} |"
            )
            for name, rate in budget.class_tok_s.items():
                rivals = {
                    arm: f.class_tok_s[name] for arm, f in fixed.items() if name in f.class_tok_s
                }
                if rivals:
                    top = max(rivals, key=lambda arm: rivals[arm])
                    classes.append(
                        f"| {drafter} | {concurrency} | {name} | {top} | {rate / rivals[top]:.2f} |"
                    )
    return "\n".join([*lines, "", *ratios, "", *classes, ""])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+", help="specray bench serve result JSONs")
    parser.add_argument("--out", type=Path, required=True, help="the Markdown table to write")
    args = parser.parse_args(argv)
    words = ["python", "-m", "specray.bench.budget_vs_fixed", "--out", str(args.out)]
    command = " ".join(shlex.quote(w) for w in [*words, *map(str, args.results)])
    args.out.write_text(markdown(load_results(args.results), command))
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
