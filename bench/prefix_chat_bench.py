"""Multi-turn chat with and without the prefix cache: time to first token
and prefill tokens saved, greedy output compared.

Each conversation starts from one shared system prompt; each turn sends the
whole conversation so far (system prompt, earlier user messages and
answers, the new message) through the chat template, as a chat client does.
User messages are the shipped ``chat`` prompts. Turns run one request at a
time through the in-process engine (n-gram drafting, fixed γ, the default
chunk budget) on two targets that share one loaded model: prefix cache off
and on (its default size), interleaved turn by turn so load drift hits both
alike, after one warm-up request each. The conversation continues with the
cache-off answer.

    python -m specray.bench.prefix_chat_bench --target qwen2.5-coder-0.5b-instruct \\
        --dtype float32

Writes ``prefix_chat_<target>_<dtype>.{json,md}`` under ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from specray.actors.drafting.ngram import NgramDrafter
from specray.actors.engine.engine import EngineConfig, SpecEngine
from specray.actors.engine.feeds import DEFAULT_MAX_BATCHED_TOKENS
from specray.actors.engine.request import GenerationRequest
from specray.actors.engine.target import LocalTarget
from specray.actors.engine.tokenizer import conversation_ids, eos_token_ids, load_tokenizer
from specray.actors.model.config import ModelConfig
from specray.actors.model.loader import load_model
from specray.actors.model.prefix_cache import prefix_tokens
from specray.actors.sampling.params import StoppingCriteria
from specray.bench.common import bench_parser, report_head, resolve_preferring, table
from specray.bench.prompts import load_prompts
from specray.bench.run_report import publish_run, run_title

SYSTEM_PROMPT = (
    "You are a careful, friendly assistant for a small software company. Answer in plain "
    "English, briefly, and stay on the topic the user asks about. When the user asks for "
    "code, give Python 3 unless they name another language, keep examples short and "
    "runnable, and explain any line that is not obvious. When the user asks for a list, "
    "give at most five items with one sentence each. Never invent facts: when you are not "
    "sure, say so and suggest where the user could check. Do not repeat the question back "
    "to the user, do not apologise for things that are not your fault, and do not add "
    "closing remarks such as 'I hope this helps'. If a request is ambiguous, state the "
    "assumption you make in one short sentence and then answer. Use metric units, ISO "
    "dates (YYYY-MM-DD) and 24-hour times. Keep a neutral, professional tone, and prefer "
    "concrete, practical advice over general statements. Earlier messages of this "
    "conversation may be about other topics: answer only the newest message, using the "
    "earlier ones only where the user refers to them."
)
MODES = ("off", "on")


def build_engines(
    target_dir: Path, dtype: str, num_slots: int, max_len: int, k: int
) -> dict[str, SpecEngine]:
    model = load_model(target_dir, dtype)
    tokenizer = load_tokenizer(target_dir)
    eos = eos_token_ids(ModelConfig.from_pretrained(target_dir), tokenizer)
    config = EngineConfig(
        num_slots, k, adaptive=False, max_batched_tokens=DEFAULT_MAX_BATCHED_TOKENS
    )
    sizes = {"off": 0, "on": prefix_tokens(None, num_slots, max_len)}
    return {
        mode: SpecEngine(
            LocalTarget(model, num_slots, max_len, sizes[mode]),
            NgramDrafter(),
            tokenizer,
            eos,
            config,
        )
        for mode in MODES
    }


def run_turn(engine: SpecEngine, request: GenerationRequest) -> dict[str, Any]:
    began = time.perf_counter()
    first: float | None = None
    token_ids: list[int] = []
    cached = 0
    for chunk in engine.generate([request]):
        if chunk.token_ids and first is None:
            first = time.perf_counter() - began
        token_ids += chunk.token_ids
        cached = chunk.stats.cached_tokens
    return {
        "ttft_s": round(first or 0.0, 3),
        "total_s": round(time.perf_counter() - began, 3),
        "cached_tokens": cached,
        "output_ids": token_ids,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    target_dir = resolve_preferring(args.target, args.dtype)
    engines = build_engines(target_dir, args.dtype, args.num_slots, args.max_len, args.k)
    tokenizer = engines["off"].tokenizer
    assert tokenizer is not None
    messages = [p.prompt for p in load_prompts(["chat"])]
    histories = [[{"role": "system", "content": SYSTEM_PROMPT}] for _ in range(args.conversations)]
    stopping = StoppingCriteria(max_tokens=args.max_tokens)
    for mode in MODES:  # first-call costs (allocations, kernel selection) off the clock
        run_turn(engines[mode], GenerationRequest(f"warm-{mode}", [9707] * 40, stopping=stopping))
    turns = []
    for turn in range(args.turns):
        for conv, history in enumerate(histories):
            history.append(
                {
                    "role": "user",
                    "content": messages[(conv + turn * args.conversations) % len(messages)],
                }
            )
            prompt_ids = conversation_ids(tokenizer, history)
            row: dict[str, Any] = {
                "turn": turn,
                "conversation": conv,
                "prompt_tokens": len(prompt_ids),
            }
            for mode in MODES:
                request = GenerationRequest(f"{mode}-{conv}-{turn}", prompt_ids, stopping=stopping)
                row[mode] = run_turn(engines[mode], request)
            off, on = row["off"], row["on"]
            row["identical"] = off["output_ids"] == on["output_ids"]
            history.append(
                {
                    "role": "assistant",
                    "content": str(tokenizer.decode(off["output_ids"], skip_special_tokens=True)),
                }
            )
            print(
                f"turn {turn} conv {conv}: {len(prompt_ids)} prompt tokens, "
                f"{on['cached_tokens']} cached, TTFT {off['ttft_s']} s -> {on['ttft_s']} s, "
                f"identical {row['identical']}",
                flush=True,
            )
            turns.append(row)
    return publish_run(
        "specray.bench.prefix_chat_bench",
        "prefix_chat",
        argv,
        args,
        ("target", "dtype", "threads", "conversations", "turns", "max_tokens", "k"),
        markdown,
        prefix_cache_tokens=prefix_tokens(None, args.num_slots, args.max_len),
        prefix_cache_mib=round(_pool_bytes(engines["on"]) / 2**20, 1),
        rows=turns,
        summary=summary(turns),
    )


def _pool_bytes(engine: SpecEngine) -> int:
    target = engine.target
    assert isinstance(target, LocalTarget) and target.prefix is not None
    return target.prefix.pool.nbytes


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    prompt = sum(r["prompt_tokens"] for r in rows)
    cached = sum(r["on"]["cached_tokens"] for r in rows)
    later = [r for r in rows if r["turn"] > 0]
    return {
        "prompt_tokens": prompt,
        "prefill_tokens_off": prompt,
        "prefill_tokens_on": prompt - cached,
        "prefill_saved": round(cached / prompt, 3),
        "ttft_off_s": round(sum(r["off"]["ttft_s"] for r in rows), 2),
        "ttft_on_s": round(sum(r["on"]["ttft_s"] for r in rows), 2),
        "ttft_ratio_median": round(
            statistics.median(r["off"]["ttft_s"] / r["on"]["ttft_s"] for r in rows), 2
        ),
        "ttft_ratio_median_later_turns": round(
            statistics.median(r["off"]["ttft_s"] / r["on"]["ttft_s"] for r in later), 2
        )
        if later
        else None,
        "identical": sum(r["identical"] for r in rows),
        "requests": len(rows),
    }


def markdown(result: dict[str, Any]) -> str:
    s = result["summary"]
    title = run_title("Multi-turn chat, prefix cache off vs on", result)
    headers = ["turn", "conv", "prompt tokens", "cached", "TTFT off s", "TTFT on s", "×"]
    rows = []
    for r in result["rows"]:
        off, on = r["off"], r["on"]
        ratio = off["ttft_s"] / on["ttft_s"] if on["ttft_s"] else float("inf")
        first = [r["turn"], r["conversation"], r["prompt_tokens"], on["cached_tokens"]]
        rows.append([*first, off["ttft_s"], on["ttft_s"], f"{ratio:.2f}", r["identical"]])
    lines = [
        *report_head(title, result["machine"]),
        f"{result['conversations']} conversations × {result['turns']} turns sharing one system "
        f"prompt, one request at a time, n-gram drafting at γ = {result['k']}, up to "
        f"{result['max_tokens']} output tokens; prefix cache of {result['prefix_cache_tokens']} "
        f"positions ({result['prefix_cache_mib']} MiB).",
        "",
        *table([*headers, "identical"], rows, 0),
    ]
    lines += [
        "",
        f"Prefill tokens: {s['prefill_tokens_off']} off, {s['prefill_tokens_on']} on "
        f"({100 * s['prefill_saved']:.1f} % saved). Summed TTFT: {s['ttft_off_s']} s off, "
        f"{s['ttft_on_s']} s on; median TTFT ratio {s['ttft_ratio_median']}× "
        f"({s['ttft_ratio_median_later_turns']}× over turns after the first). "
        f"Greedy output identical in {s['identical']} of {s['requests']} requests.",
        "",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser(__doc__)
    p.add_argument("--conversations", type=int, default=2)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--num-slots", type=int, default=2)
    p.add_argument("--max-len", type=int, default=4096)
    return p


if __name__ == "__main__":
    main()
