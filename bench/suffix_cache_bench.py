"""What a suffix drafter's global cache is worth on agentic sessions: the
stake of placing a conversation's turns on the draft replica that drafted
its earlier turns (docs/drafting.md, "Suffix decoding").

The shipped ``agentic`` sessions run turn by turn, in order, through two
in-process engines that share one loaded target: the suffix drafter as
``--draft suffix`` builds it, with its global cache of finished outputs
(``cache``), and the same drafter with that cache turned off (``no cache``:
what a turn sees on a replica that never drafted its session, less the
other sessions' outputs). Both arms run each turn back to back, so load
drift hits both alike; greedy outputs must match. A turn is sent alone (one
user message through the chat template, as the serving benchmark sends
prompts), or with ``--resend`` as a chat client sends it: the whole
conversation so far, earlier answers included.

    python -m specray.bench.suffix_cache_bench --target qwen2.5-coder-1.5b-instruct \\
        --weights gguf --tag _avx512bf16

Writes ``suffix_cache_<target>_<weights>[<tag>].{json,md}`` under ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from specray.actors.drafting.suffix.drafter import SuffixConfig, SuffixDrafter
from specray.actors.engine.request import GenerationRequest, RequestStats
from specray.actors.sampling.params import StoppingCriteria
from specray.bench.common import bench_parser, run_record, table, write_report
from specray.bench.prompts import Prompt
from specray.bench.session_turns import (
    LoadedTarget,
    TurnRun,
    add_session_flags,
    replay,
    report_top,
    run_turn,
)

ARMS = {"cache": SuffixConfig(tree=True), "no cache": SuffixConfig(tree=True, cache_tokens=0)}


def turn_record(run: TurnRun) -> dict[str, Any]:
    return {
        "seconds": run.seconds,
        "rounds": run.stats.rounds,
        "draft_tokens": run.stats.draft_tokens,
        "accepted_tokens": run.stats.accepted_tokens,
        "tau": round(run.stats.mean_acceptance_length, 2),
        "output_ids": run.token_ids,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = LoadedTarget.load(args)
    engines = {
        arm: loaded.engine(SuffixDrafter(suffix), args.k, args.max_len)
        for arm, suffix in ARMS.items()
    }
    stopping = StoppingCriteria(max_tokens=args.max_tokens)
    rows = []

    def run(prompt: Prompt, prompt_ids: list[int]) -> list[int]:
        row: dict[str, Any] = {
            "id": prompt.id,
            "turn": prompt.turn,
            "prompt_tokens": len(prompt_ids),
        }
        for arm, engine in engines.items():
            request = GenerationRequest(f"{arm}-{prompt.id}", list(prompt_ids), stopping=stopping)
            row[arm] = turn_record(run_turn(engine, request))
        row["identical"] = row["cache"]["output_ids"] == row["no cache"]["output_ids"]
        print(
            f"{prompt.id}: τ {row['cache']['tau']} with the cache, "
            f"{row['no cache']['tau']} without; identical {row['identical']}",
            flush=True,
        )
        rows.append(row)
        return list(row["cache"]["output_ids"])

    replay(loaded.tokenizer, args, run)
    flags = ("target", "weights", "dtype", "threads", "split", "max_tokens", "k", "resend")
    result = run_record("specray.bench.suffix_cache_bench", argv, args, flags, rows=rows)
    result["summary"] = summary(rows)
    stem = f"suffix_cache_{Path(args.target).name}_{args.weights}{args.tag}"
    write_report(args.out, stem, result, markdown(result))
    return result


def _arm_totals(rows: Sequence[dict[str, Any]], arm: str) -> dict[str, float]:
    rounds = sum(r[arm]["rounds"] for r in rows)
    accepted = sum(r[arm]["accepted_tokens"] for r in rows)
    tokens = sum(len(r[arm]["output_ids"]) for r in rows)
    seconds = sum(r[arm]["seconds"] for r in rows)
    return {
        "tau": round(
            RequestStats(accepted_tokens=accepted, rounds=rounds).mean_acceptance_length, 2
        ),
        "tokens_per_s": round(tokens / seconds, 2) if seconds else 0.0,
    }


def summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Totals over first turns and over later turns (where earlier outputs
    of the session can be in the cache), per arm."""
    out: dict[str, Any] = {"identical": sum(r["identical"] for r in rows), "requests": len(rows)}
    for part, chosen in (
        ("first", [r for r in rows if r["turn"] == 1]),
        ("later", [r for r in rows if r["turn"] > 1]),
    ):
        if not chosen:
            continue
        totals = {arm: _arm_totals(chosen, arm) for arm in ARMS}
        ratios = [r["no cache"]["seconds"] / r["cache"]["seconds"] for r in chosen]
        out[part] = totals | {"speedup_median": round(statistics.median(ratios), 2)}
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = report_top("Suffix drafter, global cache on vs off, agentic sessions", result)
    headers = [
        "prompt",
        "turn",
        "prompt tokens",
        "τ cache",
        "τ no cache",
        "s cache",
        "s no cache",
        "×",
        "identical",
    ]
    cells = [
        [
            r["id"],
            r["turn"],
            r["prompt_tokens"],
            r["cache"]["tau"],
            r["no cache"]["tau"],
            r["cache"]["seconds"],
            r["no cache"]["seconds"],
            round(r["no cache"]["seconds"] / r["cache"]["seconds"], 2),
            "yes" if r["identical"] else "no",
        ]
        for r in result["rows"]
    ]
    lines += table(headers, cells, 2)
    s = result["summary"]
    lines.append("")
    for part, label in (("first", "First turns"), ("later", "Later turns")):
        if part in s:
            p = s[part]
            lines.append(
                f"- {label}: τ {p['cache']['tau']} with the cache, {p['no cache']['tau']} without; "
                f"{p['cache']['tokens_per_s']} against {p['no cache']['tokens_per_s']} tokens/s; "
                f"median time ratio (no cache ÷ cache) {p['speedup_median']}×."
            )
    lines.append(f"- Greedy outputs identical in {s['identical']} of {s['requests']} turns.")
    return "\n".join([*lines, ""])


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser(__doc__, target="qwen2.5-coder-0.5b-instruct", dtype="bfloat16")
    add_session_flags(p, max_tokens=128)
    return p


if __name__ == "__main__":
    main()
