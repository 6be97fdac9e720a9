"""``specray bench serve``: load a running server over gRPC and report what
``vllm bench serve`` reports, with speculation on and off in the same run.

Every prompt is sent twice, ``speculative=true`` and ``speculative=false``,
interleaved (``--ab-order pairs``, the arm that goes first alternating) so
machine noise hits both arms alike, but under concurrency the arms then
share the server's batches (a target-only request rides in rounds that also
verify drafts, which flatters speculation). ``--ab-order phases`` sends one
arm, waits for it, then sends the other, so batches never mix the arms: use
it for throughput under load. Either way the arm that goes first would warm
the server's prefix cache for the other, so each level first sends every
prompt it has not sent before once, target-only and for one token, and
measures nothing of it (``--no-prime-cache`` to measure cold prefills in
whichever arm comes first). Streams run concurrently from one asyncio process:
Poisson arrivals at ``--request-rate`` (seeded), capped by
``--max-concurrency``, or one run per level of ``--sweep-concurrency``.

    specray bench serve --server 127.0.0.1:50051 --tokenizer qwen2.5-coder-1.5b-instruct \\
        --max-tokens 128 --ab-order phases --sweep-concurrency 1,4,8,16 --label ngram \\
        --save-result out/ngram.json
    specray bench serve --plot-from out/none.json out/ngram.json --save-result out/all.json

Metrics are defined in :mod:`specray.bench.serve_metrics` (ITL counts a
multi-token chunk as one gap). Writes the JSON to ``--save-result`` and the
Markdown and PNG plots next to it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import math
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from specray.bench.common import machine_info, resolve_preferring
from specray.bench.serve_dataset import (
    RANDOM,
    BenchPrompt,
    BenchRequest,
    ab_schedule,
    arrival_offsets,
    random_prompts,
    shipped_prompts,
    warmup_prompts,
)
from specray.bench.serve_metrics import RequestRecord, category_rows, mode_summary, output_agreement
from specray.bench.serve_report import attach_limit
from specray.bench.server_diagnostics import arm_names, read_diagnostics
from specray.protos.messages import FINISH_REASONS, build_request
from specray.protos.specray.v1 import generation_pb2 as pb
from specray.protos.specray.v1 import generation_pb2_grpc as pb_grpc

# The flags that shape a run, recorded in the result and in its command line.
SETTINGS = (
    "dataset",
    "categories",
    "split",
    "num_prompts",
    "max_tokens",
    "temperature",
    "ignore_eos",
    "seed",
    "num_speculative_tokens",
    "fixed_speculation",
    "request_rate",
    "max_concurrency",
    "sweep_concurrency",
    "waves",
    "ab_order",
    "tokenizer",
    "random_input_len",
    "random_output_len",
    "warmup",
    "prime_cache",
    "draft_cost",
    "verify_cost",
    "timeout",
)

# Switches that default on (--no-NAME turns them off).
ON_BY_DEFAULT = ("prime_cache",)


@dataclass(frozen=True)
class RequestOptions:
    """What every request of a run asks for, besides its prompt and arm."""

    max_tokens: int
    temperature: float
    ignore_eos: bool
    seed: int
    num_speculative_tokens: int | None  # spec arm only; None: the server's setting
    timeout_s: float
    fixed_speculation: bool = False  # spec arm only: its whole k every round


@dataclass(frozen=True)
class LoadShape:
    """How requests arrive: Poisson at ``request_rate`` (inf: all at once),
    at most ``max_concurrency`` in flight (None: no cap)."""

    request_rate: float
    max_concurrency: int | None


async def send_one(
    stub: pb_grpc.GenerationStub, request: BenchRequest, options: RequestOptions, tag: str
) -> RequestRecord:
    """Stream one request, timing each response as it arrives."""
    prompt = request.prompt
    message = build_request(
        prompt.prompt,
        request_id=f"{tag}-{request.index}-{'spec' if request.speculative else 'base'}",
        max_tokens=options.max_tokens,
        temperature=options.temperature,
        ignore_eos=options.ignore_eos,
        seed=options.seed + request.index,  # the same in both arms
        speculative=request.speculative,
        num_speculative_tokens=options.num_speculative_tokens if request.speculative else None,
        fixed_speculation=True if request.speculative and options.fixed_speculation else None,
    )
    record = RequestRecord(prompt.id, prompt.category, request.speculative, time.perf_counter())
    try:
        async for response in stub.GenerateStream(message, timeout=options.timeout_s):
            record.chunk_s.append(time.perf_counter())
            record.chunk_tokens.append(len(response.token_ids))
            record.token_ids += response.token_ids
            stats = response.spec_stats
            record.prompt_tokens = response.usage.prompt_tokens
            record.cached_tokens = response.usage.cached_tokens
            record.draft_tokens, record.accepted_tokens = stats.draft_tokens, stats.accepted_tokens
            record.rounds, record.fallback = stats.rounds, stats.fallback
            record.finish_reason = FINISH_REASONS.get(response.finish_reason)
    except grpc.aio.AioRpcError as error:
        record.error, record.error_details = error.code().name, error.details() or ""
    return record


async def run_load(
    stub: pb_grpc.GenerationStub,
    plan: Sequence[BenchRequest],
    options: RequestOptions,
    load: LoadShape,
    tag: str,
) -> list[RequestRecord]:
    """Send ``plan`` in order at its arrival times; records in plan order."""
    offsets = arrival_offsets(len(plan), load.request_rate, options.seed)
    # asyncio's semaphore wakes waiters first come first served: plan order.
    slots = asyncio.Semaphore(load.max_concurrency or len(plan) or 1)
    start = time.perf_counter()

    async def one(offset: float, request: BenchRequest) -> RequestRecord:
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        async with slots:
            return await send_one(stub, request, options, tag)

    return list(await asyncio.gather(*(one(o, r) for o, r in zip(offsets, plan, strict=True))))


async def prime(
    stub: pb_grpc.GenerationStub,
    prompts: Sequence[BenchPrompt],
    options: RequestOptions,
    load: LoadShape,
) -> None:
    """Prefill ``prompts`` once (one token, target-only), unmeasured, so both
    arms of the level that follows find them in the prefix cache alike."""
    if not prompts:
        return
    one_token = dataclasses.replace(options, max_tokens=1, ignore_eos=True)
    plan = [BenchRequest(prompt, False, i) for i, prompt in enumerate(prompts)]
    await run_load(stub, plan, one_token, LoadShape(math.inf, load.max_concurrency), "prime")


def model_dict(info: pb.GetModelInfoResponse) -> dict[str, Any]:
    return {field.name: getattr(info, field.name) for field in info.DESCRIPTOR.fields} | {
        "drafts": list(info.drafts)
    }


def summarize_run(
    records: Sequence[RequestRecord], load: LoadShape, spec_first: bool
) -> dict[str, Any]:
    """One run's numbers: per arm, per category, and output agreement."""
    rate = None if math.isinf(load.request_rate) else load.request_rate
    return {
        "concurrency": load.max_concurrency,
        "request_rate": rate,
        "spec_first": spec_first,
        "modes": {
            arm: mode_summary([r for r in records if r.speculative == speculative])
            for arm, speculative in (("spec", True), ("no_spec", False))
        },
        "categories": category_rows(records),
        "agreement": output_agreement(records),
        "records": [asdict(r) for r in records],
    }


def load_tokenizer(name: str | None) -> PreTrainedTokenizerBase | None:
    """A local directory's tokenizer, or a registered model's from the store."""
    if name is None:
        return None
    path = Path(name).expanduser()
    return AutoTokenizer.from_pretrained(
        path if path.exists() else resolve_preferring(name, "bfloat16")
    )


def build_prompts(
    args: argparse.Namespace,
    info: pb.GetModelInfoResponse,
    tokenizer: PreTrainedTokenizerBase | None,
) -> tuple[list[BenchPrompt], int]:
    """Every prompt the run may send, and how many each level sends at least
    (``--num-prompts``, or the whole split, or 16 random). The list is longer
    when a concurrency level needs more: prompts are then cycled (shipped:
    ids suffixed ``#2``...) or drawn further (random)."""
    deepest = args.waves * max((load.max_concurrency or 0 for load in levels(args)), default=0)
    if args.dataset == RANDOM:
        vocab = vocab_size(tokenizer, info)
        base = args.num_prompts or 16
        count = max(base, deepest)
        return random_prompts(count, args.random_input_len, vocab, args.seed), base
    categories = args.categories.split(",") if args.categories else None
    split = None if args.split == "all" else args.split
    prompts = shipped_prompts(args.num_prompts, categories, split, args.seed, tokenizer)
    base = len(prompts)
    if deepest > base:
        prompts = shipped_prompts(deepest, categories, split, args.seed, tokenizer)
    return prompts, base


def vocab_size(tokenizer: PreTrainedTokenizerBase | None, info: pb.GetModelInfoResponse) -> int:
    """Token ids below this are safe to send: the tokenizer's, else the model's."""
    return tokenizer.vocab_size if tokenizer is not None else info.vocab_size


def level_prompts(
    prompts: list[BenchPrompt], base: int, load: LoadShape, waves: int = 1
) -> list[BenchPrompt]:
    """The prompts one level sends: the first ``base``, or ``waves`` times
    its concurrency cap when that is larger, so a level of concurrency c
    really has c requests in flight, and with several waves keeps them in
    flight as requests finish (the prompt set is cycled round-robin by
    category, so any prefix stays balanced). One wave's output over its
    span is its slowest request's pace; a closed loop over several is the
    server's sustained throughput."""
    return prompts[: max(base, waves * (load.max_concurrency or 0))]


def levels(args: argparse.Namespace) -> list[LoadShape]:
    """One load shape per run; neither a rate nor a cap means one at a time."""
    rate = args.request_rate if args.request_rate is not None else math.inf
    if args.sweep_concurrency:
        return [LoadShape(rate, c) for c in args.sweep_concurrency]
    cap = args.max_concurrency
    if cap is None and args.request_rate is None:
        cap = 1
    return [LoadShape(rate, cap)]


async def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Warm up, then run every load shape against the server at ``args.server``."""
    started_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    tokenizer = load_tokenizer(args.tokenizer)
    async with grpc.aio.insecure_channel(args.server) as channel:
        stub = pb_grpc.GenerationStub(channel)
        info = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=args.timeout)
        prompts, base = build_prompts(args, info, tokenizer)
        random_set = args.dataset == RANDOM
        options = RequestOptions(
            max_tokens=args.random_output_len if random_set else args.max_tokens,
            temperature=args.temperature,
            ignore_eos=args.ignore_eos or random_set,  # random: fixed output length, as vLLM
            seed=args.seed,
            num_speculative_tokens=args.num_speculative_tokens,
            timeout_s=args.timeout,
            fixed_speculation=args.fixed_speculation,
        )
        if args.warmup:  # one-off costs (allocation, kernel choice) stay out of the numbers
            # Prompts of their own: a drafter that caches finished outputs
            # (suffix) would draft a measured prompt from its warm-up's copy.
            vocab = vocab_size(tokenizer, info)
            fresh = warmup_prompts(args.warmup, vocab, args.seed)
            warm = ab_schedule(fresh, "pairs")
            await run_load(stub, warm, options, LoadShape(math.inf, 1), "warmup")
        runs = []
        primed: set[str] = set()
        for number, load in enumerate(levels(args)):
            spec_first = number % 2 == 0
            sent = level_prompts(prompts, base, load, args.waves)
            if args.prime_cache:
                await prime(stub, [p for p in sent if p.id not in primed], options, load)
                primed.update(p.id for p in sent)
            plan = ab_schedule(sent, args.ab_order, spec_first)
            # Phases: the second arm starts once the first has finished, so
            # no batch holds both (each arm then sees the same arrivals).
            parts = [plan[: len(sent)], plan[len(sent) :]] if args.ab_order == "phases" else [plan]
            records = []
            diagnostics: dict[str, Any] = {}
            # One read between parts: it ends one part's round count and
            # holds what the next part starts from.
            start = await read_diagnostics(channel, True, args.timeout)
            for arm, part in zip(arm_names(len(parts), spec_first), parts, strict=True):
                records += await run_load(stub, part, options, load, f"bench{number}")
                end = await read_diagnostics(channel, True, args.timeout)
                if start is not None and end is not None:
                    diagnostics[arm] = {"start": start, "end": end}
                start = end
            runs.append(summarize_run(records, load, spec_first) | {"diagnostics": diagnostics})
            failed = sum(not r.ok for r in records)
            print(
                f"run {number + 1}: {len(records)} requests ({failed} failed), concurrency "
                f"{load.max_concurrency}, rate {load.request_rate}",
                file=sys.stderr,
                flush=True,
            )
    gamma = args.num_speculative_tokens or info.max_num_speculative_tokens
    for measured in runs:
        attach_limit(measured["categories"], gamma, args.draft_cost, args.verify_cost)
    return {
        "command": reproduce_command(args),
        "started_at": started_at,
        "server": args.server,
        "label": args.label or ",".join(info.drafts) or "none",
        "model": model_dict(info),
        "settings": {key: getattr(args, key) for key in SETTINGS}
        | {"gamma": gamma, "prompts": [p.id for p in prompts[:base]]},
        "machine": machine_info(),
        "runs": runs,
    }


# ---------------------------------------------------------------- command line


def reproduce_command(args: argparse.Namespace) -> str:
    """The command line that repeats this run (every setting spelled out)."""
    words = ["specray", "bench", "serve", "--server", args.server]
    if args.label:
        words += ["--label", shlex.quote(args.label)]
    # Random prompts take their lengths from the random flags only.
    random_lengths = ("random_input_len", "random_output_len")
    unused = ("max_tokens",) if args.dataset == RANDOM else random_lengths
    for key in SETTINGS:
        value = getattr(args, key)
        if key in unused:
            continue
        flag = "--" + key.replace("_", "-")
        if key in ON_BY_DEFAULT:
            words.append(flag if value else flag.replace("--", "--no-", 1))
            continue
        if value is None or value is False:
            continue
        if value is True:
            words.append(flag)
        elif isinstance(value, list):
            words += [flag, ",".join(map(str, value))]
        else:
            words += [flag, shlex.quote(str(value))]
    if args.save_result:
        words += ["--save-result", str(args.save_result)]
    return " ".join(words)
