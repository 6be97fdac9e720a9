"""What the serving benchmark sends, and when: its prompts (the shipped set
by category, or random token ids), the A/B order of the two arms, and
seeded Poisson arrival times."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from specray.bench.common import chat_ids
from specray.bench.prompts import load_prompts

RANDOM = "random"  # the dataset (and category) of random token-id prompts
AB_ORDERS = ("pairs", "phases")
# Length of each warm-up prompt (random token ids, sent in both arms).
WARMUP_PROMPT_TOKENS = 64


@dataclass(frozen=True)
class BenchPrompt:
    """One prompt: raw text (the server tokenizes it) or token ids."""

    id: str
    category: str
    prompt: str | list[int]


@dataclass(frozen=True)
class BenchRequest:
    """One request of the run: a prompt and the arm it is sent in."""

    prompt: BenchPrompt
    speculative: bool
    index: int  # the prompt's position in the run (seeds sampling alike in both arms)


def shipped_prompts(
    num_prompts: int | None,
    categories: Sequence[str] | None,
    split: str | None,
    seed: int,
    tokenizer: PreTrainedTokenizerBase | None,
) -> list[BenchPrompt]:
    """The shipped prompt set: shuffled (seeded) within each category, then
    taken round-robin across categories so any count covers them evenly;
    cycled (ids suffixed ``#2``, ...) past the set's size. A session
    category (``agentic``) shuffles whole sessions and keeps each one's
    turns in order, so at concurrency 1 a turn runs after the turns whose
    output it quotes (at higher concurrency they may overlap). With a
    ``tokenizer`` its chat template is applied here and token ids are sent;
    without one the raw user message is sent as text."""
    rng = random.Random(seed)
    wanted = list(categories) if categories else None
    by_category: dict[str, list[list[BenchPrompt]]] = {}
    by_session: dict[str, list[BenchPrompt]] = {}
    for prompt in load_prompts(wanted, split):
        body = chat_ids(tokenizer, prompt.prompt) if tokenizer is not None else prompt.prompt
        chosen = BenchPrompt(prompt.id, prompt.category, body)
        if prompt.session is None:
            by_category.setdefault(prompt.category, []).append([chosen])
        elif prompt.session in by_session:
            by_session[prompt.session].append(chosen)
        else:
            by_session[prompt.session] = [chosen]
            by_category.setdefault(prompt.category, []).append(by_session[prompt.session])
    for units in by_category.values():
        rng.shuffle(units)
    flat = {name: [p for unit in units for p in unit] for name, units in by_category.items()}
    ordered = [
        group[i]
        for i in range(max(map(len, flat.values()), default=0))
        for group in flat.values()
        if i < len(group)
    ]
    if not ordered:
        raise ValueError(f"no shipped prompts in categories {wanted} and split {split!r}")
    count = len(ordered) if num_prompts is None else num_prompts
    out = []
    for i in range(count):
        base = ordered[i % len(ordered)]
        lap = i // len(ordered)
        out.append(
            BenchPrompt(f"{base.id}#{lap + 1}" if lap else base.id, base.category, base.prompt)
        )
    return out


def random_prompts(
    num_prompts: int, input_lens: Sequence[int], vocab_size: int, seed: int
) -> list[BenchPrompt]:
    """``num_prompts`` prompts of token ids drawn uniformly below ``vocab_size``;
    prompt ``i`` has ``input_lens[i % len(input_lens)]`` of them (a mix of long
    and short prompts, in a fixed rhythm)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if not input_lens or min(input_lens) < 1:
        raise ValueError(f"input_lens must be lengths >= 1, got {list(input_lens)}")
    rng = random.Random(seed)
    return [
        BenchPrompt(
            f"random-{i:04d}",
            RANDOM,
            [rng.randrange(vocab_size) for _ in range(input_lens[i % len(input_lens)])],
        )
        for i in range(num_prompts)
    ]


def warmup_prompts(count: int, vocab_size: int, seed: int) -> list[BenchPrompt]:
    """The unmeasured warm-up a bench sends first: ``count`` random prompts
    of :data:`WARMUP_PROMPT_TOKENS` ids, drawn with ``seed + 1`` so they
    differ from any measured random prompt of the same seed."""
    return random_prompts(count, [WARMUP_PROMPT_TOKENS], vocab_size, seed + 1)


def ab_schedule(
    prompts: Sequence[BenchPrompt], order: str, spec_first: bool = True
) -> list[BenchRequest]:
    """Every prompt in both arms, in send order.

    ``pairs``: each prompt's two requests back to back, the arm that goes
    first alternating from prompt to prompt (starting with spec when
    ``spec_first``), so drift and noise hit both arms alike. Under
    concurrency the two arms then share the server's batches.
    ``phases``: every prompt in one arm, then every prompt in the other
    (spec first when ``spec_first``); the benchmark lets the first half
    finish before it sends the second, so batches never mix the arms.
    """
    if order not in AB_ORDERS:
        raise ValueError(f"--ab-order must be one of {', '.join(AB_ORDERS)}, got {order!r}")
    if order == "phases":
        arms = (spec_first, not spec_first)
        return [BenchRequest(p, arm, i) for arm in arms for i, p in enumerate(prompts)]
    plan = []
    for i, prompt in enumerate(prompts):
        first = spec_first if i % 2 == 0 else not spec_first
        plan += [BenchRequest(prompt, first, i), BenchRequest(prompt, not first, i)]
    return plan


def arrival_offsets(count: int, request_rate: float, seed: int) -> list[float]:
    """Seconds from the start at which each of ``count`` requests arrives: a
    Poisson process of ``request_rate`` requests/s (exponential gaps, the
    first request at 0); an infinite rate sends them all at once."""
    if not request_rate > 0:
        raise ValueError(f"--request-rate must be > 0, got {request_rate}")
    if math.isinf(request_rate):
        return [0.0] * count
    rng = random.Random(seed)
    offsets, now = [], 0.0
    for _ in range(count):
        offsets.append(now)
        now += rng.expovariate(request_rate)
    return offsets
