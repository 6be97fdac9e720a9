"""llama.cpp's own numbers on the same GGUF file, from its ``llama-bench``.

Optional: nothing here runs unless a ``llama-bench`` binary is given, and no
test depends on it. ``llama-bench`` reports tokens/s; a prompt of ``n``
tokens at context depth ``d`` is the cost of one ``n``-row verify at that
depth, so ``cost(n)/cost(1) = (n / tps(n)) / (1 / tps(1))``.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class LlamaBenchResult:
    binary: str
    build: str  # llama.cpp's build commit / number as it reports it
    cpu_info: str
    threads: int
    depth: int
    decode_ms_per_token: float  # -n tokens generated at ``depth``
    prefill_512_tokens_per_s: float
    prompt_ms: dict[int, float]  # prompt of n tokens at ``depth``: ms for all n
    verify_cost_ratio: dict[int, float]  # prompt_ms[n] / prompt_ms[1]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _run(binary: Path, gguf: Path, threads: int, args: Sequence[str]) -> list[dict[str, Any]]:
    command = [str(binary), "-m", str(gguf), "-t", str(threads), "-o", "json", *args]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    rows: list[dict[str, Any]] = json.loads(done.stdout)
    return rows


def llama_decode_ms(binary: Path, gguf: Path, threads: int, depth: int, tokens: int = 32) -> float:
    """One ``llama-bench`` run: ms per generated token at ``depth``."""
    rows = _run(binary, gguf, threads, ["-r", "1", "-p", "0", "-n", str(tokens), "-d", str(depth)])
    return 1e3 / float(rows[0]["avg_ts"])


def run_llama_bench(
    binary: Path,
    gguf: Path,
    threads: int,
    depth: int,
    prompt_sizes: Sequence[int],
    repeats: int = 5,
) -> LlamaBenchResult:
    """Decode at ``depth``, prefill of 512 from empty, and prompts of each
    size at ``depth``, each the mean of ``repeats`` runs."""
    common = ["-r", str(repeats)]
    decode = _run(binary, gguf, threads, [*common, "-p", "0", "-n", "32", "-d", str(depth)])
    prefill = _run(binary, gguf, threads, [*common, "-p", "512", "-n", "0"])
    sizes = ",".join(str(n) for n in prompt_sizes)
    prompts = _run(binary, gguf, threads, [*common, "-p", sizes, "-n", "0", "-d", str(depth)])
    prompt_ms = {
        int(row["n_prompt"]): int(row["n_prompt"]) / row["avg_ts"] * 1e3 for row in prompts
    }
    first = decode[0]
    return LlamaBenchResult(
        binary=str(binary),
        build=f"{first.get('build_commit', '?')} ({first.get('build_number', '?')})",
        cpu_info=str(first.get("cpu_info", "")),
        threads=threads,
        depth=depth,
        decode_ms_per_token=1e3 / decode[0]["avg_ts"],
        prefill_512_tokens_per_s=float(prefill[0]["avg_ts"]),
        prompt_ms=prompt_ms,
        verify_cost_ratio={n: ms / prompt_ms[1] for n, ms in prompt_ms.items()}
        if 1 in prompt_ms
        else {},
    )
