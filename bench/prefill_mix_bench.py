"""A long prompt arriving among decoding requests, with and without chunked
prefill: how long the decoders stall, and how soon a short request that
arrives right after the long one gets its first token.

Each trial runs the in-process engine (n-gram drafting, one process,
``--threads`` threads): ``--decoders`` short requests decode; once each has
its first token, a ``--long-tokens`` prompt arrives and right behind it a
short newcomer (in one process a request cannot arrive mid-round: one that
arrives while a whole prompt prefills waits for that round, as here). The
trial ends when the newcomer has finished and the long prompt has its first
token. Measured per trial: the long prompt's time to
first token (its prefill, shared with everything else), the newcomer's time
to first token, and the decoders' longest gap between chunks in that window.
Trials alternate the round budget (``--chunk`` tokens, then whole prompts)
so load drift hits both alike; the medians are reported.

    python -m specray.bench.prefill_mix_bench --target qwen2.5-coder-0.5b-instruct \\
        --dtype float32 --long-tokens 3000

Writes ``prefill_mix_<target>_<dtype>.{json,md}`` under ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from specray.actors.drafting.ngram import NgramDrafter
from specray.actors.engine.engine import EngineConfig, SpecEngine
from specray.actors.engine.request import GenerationRequest
from specray.actors.engine.target import LocalTarget
from specray.actors.model.decoder import DecoderModel
from specray.actors.model.loader import load_model
from specray.actors.sampling.params import StoppingCriteria
from specray.bench.common import bench_parser, resolve_preferring
from specray.bench.run_report import Cell, column_report, publish_run, run_title

COLUMNS: dict[str, Cell] = {
    "round budget": lambda row: (
        "whole prompts" if row["chunk"] is None else f"{row['chunk']} tokens"
    ),
    "long prompt TTFT s": "long_ttft_s",
    "newcomer TTFT s": "new_ttft_s",
    "newcomer ÷ long": "new_ttft_over_long_prefill",
    "decoders' longest gap s": "decoder_max_gap_s",
}


def trial(model: DecoderModel, chunk: int | None, args: argparse.Namespace, seed: int) -> dict:
    """One arrival of the long prompt; seconds measured from the wall clock."""
    gen = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(100, 20000, (n,), generator=gen).tolist()

    slots = args.decoders + 2
    target = LocalTarget(model, slots, args.long_tokens + 64)
    config = EngineConfig(max_batch=slots, num_speculative_tokens=4, max_batched_tokens=chunk)
    engine = SpecEngine(target, NgramDrafter(max_ngram=3), None, (), config)
    forever = StoppingCriteria(max_tokens=args.long_tokens, ignore_eos=True)
    decoders = [GenerationRequest(f"d{i}", ids(32), stopping=forever) for i in range(4)]
    for request in decoders[: args.decoders]:
        engine.add_request(request)
    started: set[str] = set()
    while len(started) < args.decoders:
        started |= {o.request_id for o in engine.step() if o.token_ids}
    long = GenerationRequest("long", ids(args.long_tokens), stopping=StoppingCriteria(1))
    newcomer = GenerationRequest("new", ids(16), stopping=StoppingCriteria(8, ignore_eos=True))
    engine.add_request(long)
    engine.add_request(newcomer)
    arrived = dict.fromkeys(("long", "new"), time.perf_counter())
    last_chunk = dict.fromkeys(started, arrived["long"])
    first: dict[str, float] = {}
    gaps: list[float] = []
    new_finished = False
    rounds = 0
    # The newcomer may finish before the long prompt's first token (a small
    # round budget prefills the short prompt first): wait for both, in any order.
    while "long" not in first or not new_finished:
        if not engine.has_work:
            raise RuntimeError(f"the engine went idle before the trial ended: {first}")
        outputs = engine.step()
        now = time.perf_counter()
        rounds += 1
        for out in outputs:
            if out.request_id in last_chunk and out.token_ids:
                gaps.append(now - last_chunk[out.request_id])
                last_chunk[out.request_id] = now
            if out.request_id in arrived and out.token_ids and out.request_id not in first:
                first[out.request_id] = now - arrived[out.request_id]
        new_finished |= any(o.request_id == "new" and o.finished for o in outputs)
    engine.close()
    return {
        "chunk": chunk,
        "long_ttft_s": first["long"],
        "new_ttft_s": first["new"],
        "decoder_max_gap_s": max(gaps),
        "rounds": rounds,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(resolve_preferring(args.target, args.dtype), args.dtype)
    trial(model, args.chunk, argparse.Namespace(**{**vars(args), "long_tokens": 256}), 99)
    arms: dict[str, list[dict[str, Any]]] = {"chunked": [], "whole": []}
    for seed in range(args.repeats):
        for arm, chunk in (("chunked", args.chunk), ("whole", None)):
            arms[arm].append(trial(model, chunk, args, seed))
            print(arm, arms[arm][-1])
    rows = []
    for arm, trials in arms.items():
        row: dict[str, Any] = {"arm": arm, "chunk": trials[0]["chunk"]}
        for key in ("long_ttft_s", "new_ttft_s", "decoder_max_gap_s"):
            row[key] = round(statistics.median(t[key] for t in trials), 2)
        row["new_ttft_over_long_prefill"] = round(row["new_ttft_s"] / row["long_ttft_s"], 3)
        rows.append(row)
    flags = ("target", "dtype", "threads", "long_tokens", "decoders", "repeats")
    return publish_run(
        "specray.bench.prefill_mix_bench", "prefill_mix", argv, args, flags, markdown,
        rows=rows, trials=arms,
    )  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    subject = f"A {result['long_tokens']}-token prompt among {result['decoders']} decoding requests"
    title = run_title(subject, result, "n-gram", f"median of {result['repeats']}")
    return column_report(title, result, COLUMNS)


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser(__doc__)
    p.add_argument("--long-tokens", type=int, default=3000)
    p.add_argument("--decoders", type=int, default=3, choices=range(1, 5))
    p.add_argument("--chunk", type=int, default=512, help="the chunked arm's round budget")
    p.add_argument("--repeats", type=int, default=2)
    return p


if __name__ == "__main__":
    main()
