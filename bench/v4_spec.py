"""Speculative decoding on the V4 benchmark model: n-gram and the
checkpoint's MTP block at γ = 1..4 against target-only, on the shipped
prompts (one per category, eval split).

The model's weights are random, so what it generates is noise and how often
a draft is accepted says nothing about a trained V4: random weights tend to
fall into loops that n-gram lookup copies, and a random MTP block agrees
with a random target about as often as chance. What the numbers do say is
what a round costs: each run reports τ (tokens committed per round) beside
its decode rate, so τ ÷ speedup is the price of a round (draft and verify)
in target-only steps: a trained drafter's speedup is its τ divided by that.

The prompts' text enters as UTF-8 bytes (ids 3..258, the last
:data:`PROMPT_BYTES` of each): the bench model has no tokenizer, and bytes
keep the text's repetitions, which is what n-gram lookup reads. Methods run
interleaved, prompt by prompt, so machine noise hits them alike.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from specray.actors.drafting.base import Drafter
from specray.actors.drafting.mtp import MTPDrafter
from specray.actors.drafting.ngram import NgramDrafter
from specray.actors.engine.engine import EngineConfig, SpecEngine
from specray.actors.engine.request import GenerationRequest, RequestStats
from specray.actors.engine.target import LocalTarget
from specray.actors.model.decoder import DecoderModel
from specray.actors.model.v4.mtp import load_mtp
from specray.actors.sampling.params import SamplingParams, StoppingCriteria
from specray.bench.prompts import CATEGORIES, load_prompts

GAMMAS = (1, 2, 3, 4)
PROMPT_BYTES = 256
NEW_TOKENS = 48
BYTE_OFFSET = 3  # ids below are the special tokens of the config


@dataclass(frozen=True)
class Method:
    label: str  # target-only | ngram | mtp
    gamma: int  # 0 for target-only


def prompt_ids(text: str) -> list[int]:
    return [BYTE_OFFSET + byte for byte in text.encode("utf-8")[-PROMPT_BYTES:]]


def cache_len(prompt_len: int) -> int:
    """KV room for a prompt, its new tokens and the last round's drafts."""
    return prompt_len + NEW_TOKENS + max(GAMMAS) + 2


def methods() -> list[Method]:
    spec = [Method(label, gamma) for label in ("ngram", "mtp") for gamma in GAMMAS]
    return [Method("target-only", 0), *spec]


def run_once(
    model: DecoderModel, drafter: Drafter | None, gamma: int, prompt: list[int]
) -> RequestStats:
    """One greedy request of :data:`NEW_TOKENS` tokens; its statistics."""
    target = LocalTarget(model, num_slots=1, max_len=cache_len(len(prompt)))
    config = EngineConfig(max_batch=1, num_speculative_tokens=gamma, adaptive=False)
    engine = SpecEngine(target, drafter, None, (), config)
    request = GenerationRequest(
        "r", prompt, SamplingParams(), StoppingCriteria(NEW_TOKENS, ignore_eos=True)
    )
    for chunk in engine.generate([request]):
        if chunk.finished:
            assert chunk.stats is not None
            return chunk.stats
    raise RuntimeError("the request did not finish")


def decode_tokens_per_s(stats: RequestStats) -> float:
    """Tokens after the first over the time after the first (prefill excluded)."""
    assert stats.first_token_at is not None and stats.finished_at is not None
    return (stats.num_output_tokens - 1) / (stats.finished_at - stats.first_token_at)


def measure(model_dir: Path, model: DecoderModel, dtype: torch.dtype) -> dict[str, Any]:
    """Every method on one prompt per category; per method, the median over
    prompts of its speedup against target-only on the same prompt, and of τ."""
    mtp_block = load_mtp(model_dir, dtype)
    max_len = cache_len(PROMPT_BYTES)  # every prompt is at most this long
    drafters: dict[str, Callable[[], Drafter | None]] = {
        "target-only": lambda: None,
        "ngram": lambda: NgramDrafter(max_ngram=5),
        "mtp": lambda: MTPDrafter(mtp_block, 1, max_len),
    }
    prompts = [next(p for p in load_prompts([c], split="eval")) for c in CATEGORIES]
    rows: dict[str, dict[str, list[float]]] = {}
    for prompt in prompts:
        ids = prompt_ids(prompt.prompt)
        run_once(model, None, 0, ids)  # warm-up: caches and kernels for this length
        rates = {}
        for method in methods():
            stats = run_once(model, drafters[method.label](), method.gamma, ids)
            key = f"{method.label} γ={method.gamma}" if method.gamma else method.label
            rates[key] = decode_tokens_per_s(stats)
            row = rows.setdefault(key, {"tau": [], "speedup": [], "tokens_per_s": []})
            row["tau"].append(stats.mean_acceptance_length if method.gamma else 1.0)
            row["tokens_per_s"].append(rates[key])
        for key, rate in rates.items():
            rows[key]["speedup"].append(rate / rates["target-only"])
    return {
        "prompts": [p.id for p in prompts],
        "new_tokens": NEW_TOKENS,
        "prompt_bytes": PROMPT_BYTES,
        "methods": {
            key: {name: statistics.median(values) for name, values in row.items()}
            for key, row in rows.items()
        },
    }


def markdown(spec: dict[str, Any]) -> list[str]:
    lines = [
        f"Speculative decoding, greedy, {spec['new_tokens']} new tokens on "
        f"{len(spec['prompts'])} shipped prompts (the last {spec['prompt_bytes']} "
        "UTF-8 bytes of each); medians over prompts. Random weights: τ is not what a "
        "trained V4 would reach. Round cost = τ ÷ speedup, in target-only steps: "
        "what a trained drafter's τ would be divided by.",
        "",
        "| method | τ | decode tok/s | speedup | round cost |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for key, row in spec["methods"].items():
        lines.append(
            f"| {key} | {row['tau']:.2f} | {row['tokens_per_s']:.1f} | "
            f"{row['speedup']:.2f}x | {row['tau'] / row['speedup']:.2f} |"
        )
    return lines
