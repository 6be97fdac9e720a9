"""DSpark against the EAGLE-3-style head: the same answers, the same budget.

Trains both drafters on one data set with the same wall-clock budget, then
measures acceptance of both (and of n-gram lookup, which needs no training)
on the held-out prompts with :mod:`specray.bench.head_eval`, including the
DSpark confidence head's calibration on real rounds. First the data, with
the layers both read (the head: 2, 12, 23 of Qwen2.5-0.5B's 24; DSpark:
1, 6, 11, 16, 21)::

    specray train-draft --target qwen2.5-coder-0.5b-instruct --data-only \\
        --layers 1,2,6,11,12,16,21,23 --data-minutes 14 --data DATA
    python -m specray.bench.train_compare --target qwen2.5-coder-0.5b-instruct \\
        --data DATA --train-minutes 20

Writes ``draft_train_compare_<target>.{json,md}`` (and head_eval's own
``head_eval_<target>_train_compare.{json,md}``) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from specray.bench import head_eval
from specray.bench.common import command_line, machine_header, machine_info, write_report
from specray.deploy.cli import main as cli

METHODS = ("head", "dspark")


def train(args: argparse.Namespace, method: str, out: Path) -> dict[str, Any]:
    """One ``specray train-draft`` run; its ``train_log.json``."""
    flags = [
        "train-draft",
        "--target",
        args.target,
        "--data",
        str(args.data),
        "--method",
        method,
        "--train-minutes",
        str(args.train_minutes),
        "--epochs",
        str(args.epochs),
        "--threads",
        str(args.threads),
        "--out",
        str(out),
    ]
    if method == "dspark":
        flags += ["--draft-layers", str(args.draft_layers), "--block-size", str(args.block_size)]
    began = time.perf_counter()
    if cli(flags) != 0:
        raise SystemExit(f"train-draft --method {method} failed")
    log: dict[str, Any] = json.loads((out / "train_log.json").read_text())
    log["command"] = "specray " + " ".join(flags)
    log["wall_s"] = time.perf_counter() - began
    log["steps"] = log["train"][-1]["step"] if log["train"] else 0
    log["epochs_done"] = log["train"][-1]["epoch"] if log["train"] else 0.0
    del log["train"]  # per-step losses: train_curve.png and the work directory keep them
    return log


def training_summary(log: dict[str, Any]) -> dict[str, Any]:
    first_val, last_val = log["val"][0], log["val"][-1]
    return {
        "steps": log["steps"],
        "epochs": log["epochs_done"],
        "train_s": log["train_s"],
        "val_loss": [first_val["loss"], last_val["loss"]],
        "val_accuracy": last_val["accuracy"],
        "calibration": log.get("calibration"),
    }


def markdown(result: dict[str, Any], eval_text: str) -> str:
    lines = [
        f"### DSpark vs the EAGLE-3-style head on the same data: {result['target']}",
        "",
        machine_header(result["machine"]),
        "",
        f"Data: {result['answers']} answers, {result['rows']} rows ({result['data']}); "
        f"each drafter trained for at most {result['train_minutes']} min with "
        f"{result['threads']} torch thread(s). Validation: the same held-out answers for both.",
        "",
        "| drafter | optimiser steps | epochs | train s | val loss first → last "
        "| val top-1 agreement by position |",
        "|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        s = result["training"][method]
        agree = ", ".join("—" if math.isnan(a) else f"{a:.2f}" for a in s["val_accuracy"])
        lines.append(
            f"| {method} | {s['steps']} | {s['epochs']:.2f} | {s['train_s']:.0f} | "
            f"{s['val_loss'][0]:.3f} → {s['val_loss'][1]:.3f} | {agree} |"
        )
    lines.append("")
    lines.append(
        "Validation losses are each method's own (head: CE + TV over its chained steps "
        "on an 8192-token vocabulary; DSpark: 0.1 CE + 0.9 TV + confidence BCE over the "
        "block), so only each drafter's own first → last compares."
    )
    fit = result["training"]["dspark"]["calibration"]
    if fit:
        lines += [
            "",
            f"DSpark confidence head on the {fit['blocks']} held-out blocks "
            f"({fit['labels']} acceptance), ECE of a_k by position: raw "
            + ", ".join(f"{e:.3f}" for e in fit["ece_before"])
            + "; after STS "
            + ", ".join(f"{e:.3f}" for e in fit["ece_after"])
            + " (temperatures "
            + ", ".join(f"{t:.2f}" for t in fit["calibration"]["temperatures"])
            + ").",
        ]
    lines += ["", eval_text]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    machine = machine_info()
    name = Path(args.target).name
    dirs = {method: args.work / method for method in METHODS}
    logs = {method: train(args, method, dirs[method]) for method in METHODS}
    drafters = f"ngram,head:{dirs['head']},dspark:{dirs['dspark']}"
    eval_args = [
        "--target",
        args.target,
        "--drafters",
        drafters,
        "--gammas",
        args.gammas,
        "--max-tokens",
        str(args.max_tokens),
        "--per-category",
        str(args.per_category),
        "--threads",
        str(args.threads),
        "--out",
        str(args.out),
        "--tag",
        "train_compare",
    ]
    if args.categories:
        eval_args += ["--categories", args.categories]
    evaluated = head_eval.main(eval_args)
    result = {
        "command": command_line("specray.bench.train_compare", argv),
        "machine": machine,
        "target": args.target,
        "data": str(args.data),
        "answers": logs["dspark"]["samples"],
        "rows": logs["dspark"]["rows"],
        "train_minutes": args.train_minutes,
        "threads": args.threads,
        "training": {method: training_summary(logs[method]) for method in METHODS},
        "train_logs": logs,
        "eval": evaluated,
    }
    write_report(
        args.out,
        f"draft_train_compare_{name}",
        result,
        markdown(result, head_eval.markdown(evaluated)),
    )
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--target", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--data", type=Path, required=True, help="made by train-draft --data-only")
    p.add_argument("--train-minutes", type=float, default=20.0, help="each drafter's budget")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--draft-layers", type=int, default=1, help="DSpark's layers")
    p.add_argument("--block-size", type=int, default=5, help="DSpark's γ")
    p.add_argument("--gammas", default="3,5")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--per-category", type=int, default=4)
    p.add_argument("--categories", default=None, help="head_eval's (default: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("/tmp/specray-train-compare"))
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    return p


if __name__ == "__main__":
    main()
