"""Helpers every benchmark shares: the target-only label, the machine a
result came from, acceptance arithmetic, comparing outputs, prompts as chat
token ids, timing a call, the flags and record of a run, and writing the
report's tables. Light to import: a benchmark client (``specray bench
serve``) loads no model code through it."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from specray.actors.engine.gamma import expected_tokens
from specray.actors.engine.tokenizer import chat_ids

__all__ = ["chat_ids"]  # the benchmarks take it from here with the rest

TARGET_ONLY = "none"
SPECRAY, HF = "specray", "hf"
ALL = "all"  # the row that pools every category
DEFAULT_TARGET = "qwen2.5-coder-0.5b-instruct"
DTYPE_NAMES = ("float32", "bfloat16")

# The CPU features that decide which matmul kernels are fast (machines of one
# kind differ in them): every benchmark header prints the ones found.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8")


def alpha_from_tau(tau: float, gamma: int) -> float:
    """The i.i.d. per-token acceptance α whose expected round length
    (1 − α^(γ+1)) / (1 − α) equals ``tau``.

    accepted/drafted is *not* that α: a round stops at its first rejection, so
    later drafts are never tested (α = 0.8, γ = 4 gives accepted/drafted ≈
    0.59). Plugging the inverted τ into the analytic speedup keeps it
    consistent with the tokens the rounds actually committed.
    """
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1, got {gamma}")
    if tau <= 1.0:
        return 0.0
    if tau >= gamma + 1:
        return 1.0
    low, high = 0.0, 1.0
    for _ in range(60):  # bisection: expected_tokens rises with α
        middle = (low + high) / 2
        if expected_tokens(middle, gamma) < tau:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def first_divergence(left: Sequence[int], right: Sequence[int]) -> int | None:
    """Index of the first differing token, or None when the sequences are equal
    (a strict prefix diverges at the shorter length)."""
    for i, (a, b) in enumerate(zip(left, right, strict=False)):
        if a != b:
            return i
    return None if len(left) == len(right) else min(len(left), len(right))


def parse_drafters(text: str, default_k: int) -> list[tuple[str, int]]:
    """``"none,ngram:8,NAME"`` → [("none", 0), ("ngram", 8), ("NAME", default_k)]."""
    drafters = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        # The part after the last colon is K only when it is a number: a
        # draft head is named head:DIR, and head:DIR:K carries its own γ.
        prefix, _, suffix = item.rpartition(":")
        name, k = (prefix, suffix) if prefix and suffix.isdigit() else (item, "")
        gamma = 0 if name == TARGET_ONLY else int(k) if k else default_k
        if name != TARGET_ONLY and gamma < 1:
            raise ValueError(f"drafter {name!r} needs k >= 1, got {gamma}")
        drafters.append((name, gamma))
    return drafters


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """Which of :data:`CPU_FLAGS` this machine has ([] where unreadable)."""
    try:
        words = set(cpuinfo.read_text().split())
    except OSError:
        return []
    return [flag for flag in CPU_FLAGS if flag in words]


def machine_info() -> dict[str, Any]:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next(
            (ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if "Model name" in ln), "?"
        )
    except OSError:
        model = "?"
    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "?"
    return {
        "cpu": model,
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch_version,
        "loadavg": os.getloadavg(),
    }


def machine_line(machine: dict[str, Any]) -> str:
    """The machine as a report header names it."""
    flags = ", ".join(machine.get("cpu_flags") or ["flags not recorded"])
    return f"{machine['cpu']} ({flags}), {machine['cpu_count']} cores, torch {machine['torch']}"


def machine_header(machine: dict[str, Any]) -> str:
    """A report's machine line, with the load it started under."""
    load = machine["loadavg"][0]
    return f"Machine: {machine_line(machine)}; load average {load:.1f} at the start."


def resolve_preferring(name: str, dtype: str) -> Path:
    """The store copy in ``dtype`` when cached, else the default one (cast on load)."""
    from specray.actors.store.errors import NotCachedError
    from specray.actors.store.resolve import resolve_model

    try:
        return resolve_model(name, fetch_missing=False, dtype=dtype)
    except NotCachedError:
        return resolve_model(name)
    except Exception:  # a path, not a registered name
        return resolve_model(name)


def config_stem(path: Path) -> str:
    """A serve config's file name without its ``.serve.yaml`` (or ``.yaml``,
    ``.yml``) ending: what a report made from it is named after."""
    name = path.name
    for suffix in (".serve.yaml", ".yaml", ".yml"):
        name = name.removesuffix(suffix)
    return name


def int_list(text: str) -> list[int]:
    """``"1,4,8"`` → [1, 4, 8]: the argparse type of a flag that takes several
    sizes (an empty item is skipped)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def bench_parser(
    doc: str | None, *, target: str = DEFAULT_TARGET, dtype: str | None = "float32"
) -> argparse.ArgumentParser:
    """A benchmark's parser with the flags that benchmarks of one model share:
    ``--target``, ``--dtype`` (none where ``dtype`` is None: a benchmark that
    sweeps dtypes itself), ``--threads`` and ``--out``; it adds its own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--target", default=target)
    if dtype is not None:
        p.add_argument("--dtype", default=dtype, choices=DTYPE_NAMES)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    return p


def run_record(
    module: str,
    argv: Sequence[str] | None,
    args: argparse.Namespace,
    flags: Sequence[str],
    **measured: Any,
) -> dict[str, Any]:
    """A run's JSON record: the command that reproduces it, the ``flags`` it
    ran with (named as in ``args``), the machine, then what it measured."""
    settings = {flag: getattr(args, flag) for flag in flags}
    return {
        "command": command_line(module, argv),
        **settings,
        "machine": machine_info(),
        **measured,
    }


def write_run_report(out_dir: Path, kind: str, result: dict[str, Any], text: str) -> None:
    """:func:`write_report` with the files named after the run: ``kind`` (the
    benchmark), the target's last path part (a local path names the same
    model as its store name) and the dtype, where the run has one."""
    parts = [kind, Path(result["target"]).name, result.get("dtype")]
    write_report(out_dir, "_".join(part for part in parts if part), result, text)


def write_report(out_dir: Path, stem: str, result: dict[str, Any], text: str) -> None:
    """``STEM.json`` (the measurements) and ``STEM.md`` (the table) under
    ``out_dir``, and the table on stdout."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / f"{stem}.md").write_text(text)
    print(text)


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The command that reproduces a run: ``argv`` as given to ``main``, or
    this process's arguments when it was run from the shell."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python -m", module, *args])


def timed_ms(
    call: Callable[[], object],
    repeats: int,
    pick: Callable[[list[float]], float] = statistics.median,
) -> float:
    """Milliseconds per ``call``: one warm-up run, then ``pick`` (the median,
    or ``min`` for the best) of ``repeats`` timed runs."""
    call()
    seconds = []
    for _ in range(repeats):
        began = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - began)
    return pick(seconds) * 1e3


def report_head(title: str, machine: dict[str, Any]) -> list[str]:
    """A report's first lines: its title and the machine it ran on."""
    return [f"### {title}", "", machine_header(machine), ""]


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], left: int = 1) -> list[str]:
    """A markdown table; the first ``left`` columns align left (labels), the
    rest right (numbers)."""
    rule = ["---" if i < left else "---:" for i in range(len(headers))]
    return [_table_row(headers), _table_row(rule), *(_table_row(row) for row in rows)]


def table_report(
    title: str,
    machine: dict[str, Any],
    headers: Sequence[str],
    rows: Iterable[Sequence[object]],
    left: int = 1,
) -> str:
    """A report of one table under its title and machine (see :func:`table`)."""
    return "\n".join([*report_head(title, machine), *table(headers, rows, left), ""])


def cell(value: Any, digits: int = 2) -> str:
    """A number as a table cell: ``digits`` decimals, "–" where it is missing
    or NaN."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return "–" if value != value else f"{value:.{digits}f}"
    return str(value)


def _table_row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def stop_process(process: subprocess.Popen[Any], grace_s: float) -> None:
    """SIGTERM, then SIGKILL if ``process`` has not exited within ``grace_s``."""
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
