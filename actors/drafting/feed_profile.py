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
) -> list[tuple[int, float]]:
    """Best-of-``repeats`` seconds of ``feed(slot, n)`` from an empty slot of
    ``cache``, for each ``n`` in ``sizes`` that fits in it. The slot is
    borrowed and freed again."""
    slot = cache.allocate()
    try:
        points = []
        for size in sorted({n for n in sizes if 0 < n <= cache.max_len}):
            best = float("inf")
            for _ in range(repeats):
                cache.truncate(slot, 0)
                began = time.perf_counter()
                feed(slot, size)
                best = min(best, time.perf_counter() - began)
            points.append((size, best))
        return points
    finally:
        cache.free(slot)
