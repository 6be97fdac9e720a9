"""Timing our decoder the way the model benchmarks do: a prefilled prompt,
then a feed of ``k`` tokens after it, rolled back before every run; the
rounds against transformers summed up and tabled."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from specray.actors.model.batch import ForwardBatch, SequenceInput
from specray.actors.model.decoder import DecoderModel
from specray.bench.common import table


def median_seconds(fn: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class CachedFeeds:
    """``model`` with one cache slot holding ``prompt``: :meth:`prefill`
    computes it, :meth:`feed` returns a run of ``k`` more tokens (a verify of
    ``k`` rows; ``k = 1`` is a decode step) from the prompt's end."""

    def __init__(self, model: DecoderModel, prompt: Sequence[int], max_k: int) -> None:
        self.model = model
        self.prompt = list(prompt)
        self.cache = model.new_cache(1, len(self.prompt) + max_k + 1)
        self.slot = self.cache.allocate()

    def prefill(self) -> None:
        self.cache.truncate(self.slot, 0)
        self.model(ForwardBatch.build([SequenceInput(self.slot, self.prompt, 0)]), self.cache)

    def feed(self, k: int) -> Callable[[], None]:
        context = len(self.prompt)

        def run() -> None:
            self.cache.truncate(self.slot, context)  # rollback is free
            batch = ForwardBatch.build([SequenceInput(self.slot, [7] * k, context, k)])
            self.model(batch, self.cache)

        return run


def best_of_rounds(runs: dict[str, list[dict[str, Any]]], prefill_key: str) -> dict[str, Any]:
    """Each side's measures over its interleaved rounds, and our decode time
    as a multiple of transformers'. Times keep the fastest round (load only
    slows a run down); cost ratios the median (a ratio of two noisy times can
    err either way)."""
    best = {
        name: {
            "decode_ms_per_token": min(r["decode_ms_per_token"] for r in rounds),
            prefill_key: min(r[prefill_key] for r in rounds),
            "verify_cost_ratio": {
                k: statistics.median(r["verify_cost_ratio"][k] for r in rounds)
                for k in rounds[0]["verify_cost_ratio"]
            },
        }
        for name, rounds in runs.items()
    }
    decode = {name: side["decode_ms_per_token"] for name, side in best.items()}
    return {**best, "decode_vs_transformers": decode["specray"] / decode["transformers"]}


def versus_transformers(
    ours: dict[str, Any], ref: dict[str, Any], rows: Sequence[tuple[str, str, str]]
) -> list[str]:
    """The two-column table of both models' timings: ``rows`` (label and
    both cells) first, then each measured verify cost(k)/cost(1)."""
    verify = [
        (f"verify cost({k})/cost(1)", f"{ours['verify_cost_ratio'][k]:.2f}",
         f"{ref['verify_cost_ratio'][k]:.2f}")
        for k in ours["verify_cost_ratio"]
    ]  # fmt: skip
    return table(["", "specray", "transformers"], [*rows, *verify])
