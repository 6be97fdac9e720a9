"""How prefill throughput and a round's length depend on the prefill chunk
(the round budget ``max_num_batched_tokens``), for choosing its default.

One prompt of ``--prompt-tokens`` is prefilled in chunks of each size, then
whole, through ``LocalTarget`` (one process, ``--threads`` threads); the
sizes are interleaved over ``--repeats`` passes and the fastest kept. A
smaller chunk keeps each round (and so every decoding request's inter-token
gap while a prompt prefills) short; too small and prefill slows down.

    python -m specray.bench.prefill_chunk_bench --target qwen2.5-coder-0.5b-instruct \\
        --dtype float32 --prompt-tokens 1024

Writes ``prefill_chunk_<target>_<dtype>.{json,md}`` under ``--out``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import torch

from specray.actors.engine.target import LocalTarget, VerifyInput
from specray.actors.model.loader import load_model
from specray.bench.common import bench_parser, int_list, resolve_preferring
from specray.bench.run_report import column_report, publish_run, run_title

COLUMNS = {
    "chunk": "chunk",
    "rounds": "rounds",
    "prefill s": "prefill_s",
    "tokens/s": "tokens_per_s",
    "throughput ÷ whole": "vs_whole",
    "longest round s": "longest_round_s",
}


def prefill_seconds(target: LocalTarget, tokens: list[int], chunk: int) -> list[float]:
    """Seconds of each round that prefills ``tokens`` in chunks of ``chunk``."""
    rounds = []
    for start in range(0, len(tokens), chunk):
        piece = tokens[start : start + chunk]
        last = start + chunk >= len(tokens)
        began = time.perf_counter()
        target.verify([VerifyInput("p", start, piece, 1 if last else 0)])
        rounds.append(time.perf_counter() - began)
    target.release("p")
    return rounds


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(resolve_preferring(args.target, args.dtype), args.dtype)
    target = LocalTarget(model, 1, args.prompt_tokens + 8)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(100, 20000, (args.prompt_tokens,), generator=gen).tolist()
    chunks = [*args.chunks, args.prompt_tokens]
    prefill_seconds(target, tokens[:64], 64)  # warm up
    best: dict[int, list[float]] = {}
    for _ in range(args.repeats):
        for chunk in chunks:
            rounds = prefill_seconds(target, tokens, chunk)
            if chunk not in best or sum(rounds) < sum(best[chunk]):
                best[chunk] = rounds
    whole = sum(best[args.prompt_tokens])
    rows = [
        {
            "chunk": chunk,
            "rounds": len(best[chunk]),
            "prefill_s": round(sum(best[chunk]), 3),
            "tokens_per_s": round(args.prompt_tokens / sum(best[chunk]), 1),
            "vs_whole": round(whole / sum(best[chunk]), 3),
            "longest_round_s": round(max(best[chunk]), 3),
        }
        for chunk in chunks
    ]
    flags = ("target", "dtype", "threads", "prompt_tokens", "repeats")
    return publish_run(
        "specray.bench.prefill_chunk_bench", "prefill_chunk", argv, args, flags, markdown, rows=rows
    )


def markdown(result: dict[str, Any]) -> str:
    prompt, repeats = f"{result['prompt_tokens']}-token prompt", f"best of {result['repeats']}"
    title = run_title("Prefill by chunk", result, prompt, repeats)
    return column_report(title, result, COLUMNS, 0)


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser(__doc__)
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--chunks", type=int_list, default=[64, 128, 256, 512])
    p.add_argument("--repeats", type=int, default=2)
    return p


if __name__ == "__main__":
    main()
