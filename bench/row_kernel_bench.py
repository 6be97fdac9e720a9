"""What the matmul choice (``actors/parallel/row_kernels.py``) does to a
verify: the target's verify time for 1..17 tokens with the measured choice
(``F.linear``, ``W · xᵀ`` for a few rows, or oneDNN's packed copy) and with
``F.linear`` everywhere, two copies of the model in one process, interleaved.

    python -m specray.bench.row_kernel_bench --target qwen2.5-coder-0.5b-instruct \\
        --dtype float32

Writes ``row_kernels_<target>_<dtype>.{json,md}`` under ``--out``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from specray.actors.engine.profile import profile_verify
from specray.actors.engine.target import LocalTarget
from specray.actors.model.loader import load_model
from specray.actors.parallel.linear_weights import DenseWeights
from specray.bench.common import bench_parser, int_list, resolve_preferring
from specray.bench.run_report import column_report, publish_run, run_title

COLUMNS = {
    "tokens verified": "tokens",
    "F.linear ms": "linear_ms",
    "chosen ms": "chosen_ms",
    "F.linear cost(n)/cost(1)": "linear_vs_one",
    "chosen cost(n)/cost(1)": "chosen_vs_one",
}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    model_dir = resolve_preferring(args.target, args.dtype)
    chosen = load_model(model_dir, args.dtype)  # measures and chooses
    plain = load_model(model_dir, args.dtype)
    for module in plain.modules():
        if isinstance(module, DenseWeights):
            module.use_plain()
    targets = {"chosen": LocalTarget(chosen, 1, 64), "linear": LocalTarget(plain, 1, 64)}
    best: dict[str, dict[int, float]] = {"chosen": {}, "linear": {}}
    for _ in range(args.repeats):
        for arm, target in targets.items():
            for size, seconds in profile_verify(target, args.sizes, repeats=1):
                best[arm][size] = min(best[arm].get(size, float("inf")), seconds)
    choices = {
        f"{m.out_features}x{m.in_features}": "packed" if m.packed is not None else m.transposed_rows
        for m in chosen.modules()
        if isinstance(m, DenseWeights) and (m.packed is not None or m.transposed_rows)
    }
    rows = [
        {
            "tokens": size,
            "linear_ms": round(1e3 * best["linear"][size], 1),
            "chosen_ms": round(1e3 * best["chosen"][size], 1),
            "linear_vs_one": round(best["linear"][size] / best["linear"][1], 2),
            "chosen_vs_one": round(best["chosen"][size] / best["chosen"][1], 2),
        }
        for size in args.sizes
    ]
    flags = ("target", "dtype", "threads", "repeats")
    return publish_run(
        "specray.bench.row_kernel_bench", "row_kernels", argv, args, flags, markdown,
        transposed_rows=choices, rows=rows,
    )  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    subject = "Verify time with the few-row matmul choice"
    title = run_title(subject, result, f"best of {result['repeats']}")
    chosen = (
        "Chosen by weight shape (`packed`: oneDNN's packed copy at every row count; "
        f"a number: `W · xᵀ` up to that many rows): {result['transposed_rows'] or 'none'}"
    )
    return column_report(title, result, COLUMNS, 0, notes=[f"`{result['command']}`", chosen])


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser(__doc__)
    p.add_argument("--sizes", type=int_list, default=[1, 2, 4, 9, 17])
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(out=Path(__file__).parent / "results")  # the package's, from any folder
    return p


if __name__ == "__main__":
    main()
