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
from specray.bench.common import (
    bench_parser,
    int_list,
    report_head,
    resolve_preferring,
    run_record,
    table,
    write_run_report,
)


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
    result = run_record(
        "specray.bench.row_kernel_bench", argv, args, flags, transposed_rows=choices, rows=rows
    )
    write_run_report(args.out, "row_kernels", result, markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    title = (
        f"Verify time with the few-row matmul choice: {result['target']} "
        f"({result['dtype']}, {result['threads']} threads, best of {result['repeats']})"
    )
    chosen = (
        "Chosen by weight shape (`packed`: oneDNN's packed copy at every row count; "
        f"a number: `W · xᵀ` up to that many rows): {result['transposed_rows'] or 'none'}"
    )
    headers = ["tokens verified", "F.linear ms", "chosen ms", "F.linear cost(n)/cost(1)"]
    headers.append("chosen cost(n)/cost(1)")
    keys = ["tokens", "linear_ms", "chosen_ms", "linear_vs_one", "chosen_vs_one"]
    rows = [[r[key] for key in keys] for r in result["rows"]]
    lines = [*report_head(title, result["machine"]), f"`{result['command']}`", "", chosen, ""]
    return "\n".join([*lines, *table(headers, rows, 0), ""])


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser(__doc__)
    p.add_argument("--sizes", type=int_list, default=[1, 2, 4, 9, 17])
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(out=Path(__file__).parent / "results")  # the package's, from any folder
    return p


if __name__ == "__main__":
    main()
