"""Timing a drafter's feed of ``n`` tokens, for the router's draft cost model."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from specray.actors.model.kv_cache import SlotCache


def profile_feeds(
    cache: SlotCache,
    sizes: Sequence[int],
    feed: Callable[[int, int], object],
    repeats: int = 3,
    enough_s: float = 0.5,
) -> list[tuple[int, float]]:
    """Best-of-``repeats`` seconds of ``feed(slot, n)`` from an empty slot of
    ``cache``, for each ``n`` in ``sizes`` that fits in it. A size stops
    repeating once its runs took ``enough_s``: a long feed is compute-bound
    and steady, and three of each up to 256 tokens were 211 of a 270 s
    router start with a bf16 0.5B draft model on an AVX2-only machine
    (bench/results/startup_default_config_accounted.md). The slot
    is borrowed and freed again."""
    slot = cache.allocate()
    try:
        points = []
        for size in sorted({n for n in sizes if 0 < n <= cache.max_len}):
            best, spent = float("inf"), 0.0
            for _ in range(repeats):
                cache.truncate(slot, 0)
                began = time.perf_counter()
                feed(slot, size)
                took = time.perf_counter() - began
                best, spent = min(best, took), spent + took
                if spent >= enough_s:
                    break
            points.append((size, best))
        return points
    finally:
        cache.free(slot)
