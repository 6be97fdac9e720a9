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
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from specray.actors.drafting.suffix.drafter import SuffixConfig, SuffixDrafter
from specray.actors.engine.engine import EngineConfig, SpecEngine
from specray.actors.engine.request import GenerationRequest, RequestStats
from specray.actors.engine.scheduling import DEFAULT_MAX_BATCHED_TOKENS
from specray.actors.engine.target import LocalTarget
from specray.actors.engine.tokenizer import eos_token_ids, load_tokenizer
from specray.actors.model.config import ModelConfig
from specray.actors.model.loader import load_model
from specray.actors.sampling.params import StoppingCriteria
from specray.actors.store.weights_dir import weights_dir
from specray.bench.common import bench_parser, report_head, run_record, table, write_report
from specray.bench.prompts import load_prompts, sessions
from specray.bench.run_report import run_title

ARMS = {"cache": SuffixConfig(tree=True), "no cache": SuffixConfig(tree=True, cache_tokens=0)}


def build_engines(args: argparse.Namespace) -> dict[str, SpecEngine]:
    target_dir = weights_dir(args.target, args.weights, args.dtype)
    model = load_model(target_dir, args.dtype, weights=args.weights)
    tokenizer = load_tokenizer(target_dir)
    eos = eos_token_ids(ModelConfig.from_pretrained(target_dir), tokenizer)
    config = EngineConfig(1, args.k, adaptive=True, max_batched_tokens=DEFAULT_MAX_BATCHED_TOKENS)
    return {
        arm: SpecEngine(
            LocalTarget(model, 1, args.max_len), SuffixDrafter(suffix), tokenizer, eos, config
        )
        for arm, suffix in ARMS.items()
    }


def run_turn(engine: SpecEngine, request: GenerationRequest) -> dict[str, Any]:
    began = time.perf_counter()
    token_ids: list[int] = []
    stats = None
    for chunk in engine.generate([request]):
        token_ids += chunk.token_ids
        stats = chunk.stats
    assert stats is not None
    return {
        "seconds": round(time.perf_counter() - began, 3),
        "rounds": stats.rounds,
        "draft_tokens": stats.draft_tokens,
        "accepted_tokens": stats.accepted_tokens,
        "tau": round(stats.mean_acceptance_length, 2),
        "output_ids": token_ids,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    engines = build_engines(args)
    tokenizer = engines["cache"].tokenizer
    assert tokenizer is not None
    stopping = StoppingCriteria(max_tokens=args.max_tokens)
    chosen = sessions(load_prompts(["agentic"], args.split))[: args.sessions]
    rows = []
    for session in chosen:
        history: list[dict[str, str]] = []
        for prompt in session:
            message = {"role": "user", "content": prompt.prompt}
            turn = [*history, message] if args.resend else [message]
            prompt_ids = tokenizer.apply_chat_template(
                turn, add_generation_prompt=True, tokenize=True, return_dict=False
            )
            row: dict[str, Any] = {
                "id": prompt.id,
                "turn": prompt.turn,
                "prompt_tokens": len(prompt_ids),
            }
            for arm, engine in engines.items():
                request = GenerationRequest(
                    f"{arm}-{prompt.id}", list(prompt_ids), stopping=stopping
                )
                row[arm] = run_turn(engine, request)
            row["identical"] = row["cache"]["output_ids"] == row["no cache"]["output_ids"]
            answer = tokenizer.decode(row["cache"]["output_ids"], skip_special_tokens=True)
            history += [message, {"role": "assistant", "content": answer}]
            print(
                f"{prompt.id}: τ {row['cache']['tau']} with the cache, "
                f"{row['no cache']['tau']} without; identical {row['identical']}",
                flush=True,
            )
            rows.append(row)
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
    send = "whole conversation resent" if result["resend"] else "each turn sent alone"
    weights = f"{result['weights']} weights"
    title = run_title(
        "Suffix drafter, global cache on vs off, agentic sessions", result, weights, send
    )
    lines = [*report_head(title, result["machine"]), f"`{result['command']}`", ""]
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
    p.add_argument("--weights", default="dense", choices=["dense", "gguf"])
    p.add_argument("--split", default=None, choices=["eval", "train"], help="default: both")
    p.add_argument("--sessions", type=int, default=None, help="the first N sessions; default all")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-len", type=int, default=4096)
    p.add_argument("--k", type=int, default=16, help="the adaptive budget's ceiling")
    p.add_argument("--resend", action="store_true", help="send the whole conversation each turn")
    p.add_argument("--tag", default="", help="suffix of the output files")
    return p


if __name__ == "__main__":
    main()
