"""Where one decode step's (or one k-row verify's) time goes: torch's profiler
over verifies of a loaded model, per operator and per kind of work.

A step here is ``LocalTarget.verify`` of ``--rows`` tokens (1: a decode step)
after a short context, as the engine runs it, each row's logits reduced to
its argmax as the greedy server asks. The steps are timed twice: plain (the wall
time per token) and under the profiler (its own overhead inflates them).
The profiler's self time per operator is grouped into the low-bit and dense
matmuls, attention, norms and elementwise work, cache writes and the rest;
what the wall time holds beyond all operators is Python and dispatch
between them.

    python -m specray.bench.decode_profile --weights gguf --threads 2 --tag _avx512bf16
    python -m specray.bench.decode_profile --model qwen2.5-coder-1.5b-instruct --rows 8

With more than one row the files are named ``..._rows<k>``.

Writes ``decode_profile_<model>_<weights><tag>.{json,md}`` under ``--out``.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from specray.actors.engine.target import LocalTarget, VerifyInput
from specray.actors.model.loader import load_model
from specray.actors.parallel.block_weights import BlockWeights
from specray.actors.store.resolve import resolve_model
from specray.bench.common import command_line, machine_info, report_head, table, write_report

# --weights: (dtype, weight source) as load_model takes them.
FORMATS = {
    "fp32": ("float32", "dense"),
    "bf16": ("bfloat16", "dense"),
    "gguf": ("bfloat16", "gguf"),
}
# Operator name fragments, checked in order: the first that matches names the kind.
KINDS = (
    # block_matmul: the block kernel (its calls named for the profiler);
    # _int_mm: int8 x int8 with per-token activation scales (docs/weights.md)
    (
        "low-bit matmul",
        ("block_matmul", "_weight_int4pack", "_weight_int8pack", "_int_mm", "_dyn_quant", "int8"),
    ),
    ("dense matmul", ("mm", "linear", "matmul", "mkldnn", "addmm", "bmm")),
    ("attention", ("softmax", "scaled_dot_product", "attention")),
    ("norms", ("rsqrt", "pow", "mean", "rms_norm")),
    ("cache and indexing", ("index", "copy_", "scatter", "gather", "cat", "slice", "select")),
    (
        "elementwise",
        ("mul", "add", "silu", "sigmoid", "neg", "sub", "div", "exp", "to", "cos", "rotary"),
    ),
)
ID = "profiled"


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, fragments in KINDS:
        if any(fragment in lowered for fragment in fragments):
            return kind
    return "other"


class KernelClock:
    """Wall time inside the block kernel's calls, summed, while entered: each
    block weight's bound call is wrapped in a timer. No profiler runs, so the
    rest of a step (every other operator, Python, dispatch) is the step's
    wall time less this, measured in the same steps."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.weights = [m for m in model.modules() if isinstance(m, BlockWeights)]
        self.seconds = 0.0

    def __enter__(self) -> KernelClock:
        for weights in self.weights:
            bound = weights.kernel.bind(weights.packed())
            weights._bound = replace(bound, entry=self._timed(bound.entry))
        return self

    def __exit__(self, *exc: object) -> None:
        for weights in self.weights:
            weights._bound = None  # rebound, untimed, on the next call

    def _timed(self, entry: Callable[..., int]) -> Callable[..., int]:
        def call(*args: object) -> int:
            began = time.perf_counter()
            status = entry(*args)
            self.seconds += time.perf_counter() - began
            return status

        return call


def decode_steps(
    target: LocalTarget, context: int, steps: int, rows: int = 1, clock: KernelClock | None = None
) -> float:
    """Seconds per ``rows``-token verify over ``steps`` steps after ``context``
    tokens; ``clock`` counts the kernel's time in those steps only."""
    target.release(ID)
    target.verify([VerifyInput(ID, 0, [11] * context, 1)])
    if clock is not None:
        clock.seconds = 0.0
    began = time.perf_counter()
    for step in range(steps):
        start = context + step * rows
        target.verify([VerifyInput(ID, start, [13] * rows, rows, argmax_only=True)])
    return (time.perf_counter() - began) / steps


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype, weights = FORMATS[args.weights]
    model_dir = resolve_model(args.model)
    rows = args.rows
    target = LocalTarget(
        load_model(model_dir, dtype, weights=weights), 1, args.context + rows * args.steps + 8
    )
    decode_steps(target, args.context, 4, rows)  # warm-up: kernel choice, allocation
    wall = min(decode_steps(target, args.context, args.steps, rows) for _ in range(args.repeats))
    kernel_split = None
    clock = KernelClock(target.model)
    if clock.weights:
        with clock:
            splits = []
            for _ in range(args.repeats):
                step = decode_steps(target, args.context, args.steps, rows, clock)
                splits.append((step * 1e3, clock.seconds / args.steps * 1e3))
        step_ms, kernel_ms = min(splits)
        kernel_split = {"step_ms": step_ms, "kernel_ms": kernel_ms, "calls": len(clock.weights)}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        profiled = decode_steps(target, args.context, args.steps, rows)
    ops = [
        {
            "op": e.key,
            "calls": e.count // args.steps,
            "ms": e.self_cpu_time_total / 1e3 / args.steps,
        }
        for e in prof.key_averages()
        if e.self_cpu_time_total > 0
    ]
    ops.sort(key=lambda o: -o["ms"])
    kinds: dict[str, float] = defaultdict(float)
    for op in ops:
        kinds[kind_of(op["op"])] += op["ms"]
    in_ops = sum(kinds.values())
    result = {
        "command": command_line("specray.bench.decode_profile", argv),
        "machine": machine_info(),
        "model": args.model,
        "weights": args.weights,
        "threads": args.threads,
        "context": args.context,
        "rows": rows,
        "steps": args.steps,
        "wall_ms": wall * 1e3,
        "profiled_wall_ms": profiled * 1e3,
        "in_ops_ms": in_ops,
        "kinds_ms": dict(kinds),
        "ops": ops,
        "kernel_split": kernel_split,
    }
    shape = f"_rows{rows}" if rows > 1 else ""
    stem = f"decode_profile_{Path(args.model).name}_{args.weights}{shape}{args.tag}"
    write_report(args.out, stem, result, markdown(result, args.top))
    return result


def markdown(result: dict[str, Any], top: int) -> str:
    profiled, in_ops = result["profiled_wall_ms"], result["in_ops_ms"]
    rows = result.get("rows", 1)
    step = "One decode step" if rows == 1 else f"One verify of {rows} rows"
    lines = report_head(
        f"{step} of {result['model']} ({result['weights']}), "
        f"{result['threads']} threads, context {result['context']}",
        result["machine"],
    )
    lines += [
        f"`{result['command']}`",
        "",
        f"Wall time per step {result['wall_ms']:.1f} ms (best of the plain runs); "
        f"{profiled:.1f} ms under the profiler, whose operators' self times add up to "
        f"{in_ops:.1f} ms. What is left between them (Python, dispatch) is "
        f"{max(profiled - in_ops, 0.0):.1f} ms: the self times of intra-op threads can "
        "add up to more than the wall time, so this is a floor, not a measurement.",
        "",
    ]
    kinds = sorted(result["kinds_ms"].items(), key=lambda kv: -kv[1])
    lines += table(
        ["kind", "ms per step", "share of profiled wall"],
        [(k, f"{ms:.2f}", f"{ms / profiled:.0%}") for k, ms in kinds],
    )
    split = result.get("kernel_split")
    if split:
        rest = split["step_ms"] - split["kernel_ms"]
        lines += [
            "",
            f"Without the profiler, timed around each of the block kernel's calls (fastest "
            f"of the timed runs): a step {split['step_ms']:.1f} ms, of which "
            f"{split['kernel_ms']:.1f} ms inside the kernel's calls and {rest:.1f} ms in "
            "everything else (other operators, Python, dispatch).",
        ]
    lines += ["", f"Top {top} operators by self time:", ""]
    lines += table(
        ["operator", "calls per step", "ms per step", "kind"],
        [(o["op"], o["calls"], f"{o['ms']:.2f}", kind_of(o["op"])) for o in result["ops"][:top]],
    )
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m specray.bench.decode_profile", description=__doc__)
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--weights", default="gguf", choices=sorted(FORMATS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--context", type=int, default=64, help="tokens before the decoded ones")
    p.add_argument("--steps", type=int, default=20, help="steps per run")
    p.add_argument("--rows", type=int, default=1, help="tokens verified per step (1: decode)")
    p.add_argument("--repeats", type=int, default=3, help="plain runs; the best is reported")
    p.add_argument("--top", type=int, default=15, help="operators listed")
    p.add_argument("--tag", default="", help="suffix of the result files' names")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    return p


if __name__ == "__main__":
    main()
