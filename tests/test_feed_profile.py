"""A drafter with a cache of its own times its feeds, so the router can price
a catch-up (a new request's prompt, a stretch without drafts)."""

from __future__ import annotations

import time

from specray.actors.drafting.base import CatchesUp, DraftPaths
from specray.actors.drafting.draft_model import DraftModelDrafter
from specray.actors.drafting.feed_profile import profile_feeds
from specray.actors.drafting.hybrid import HybridDrafter
from specray.actors.drafting.ngram import NgramDrafter
from specray.actors.drafting.spec import DrafterSpec
from specray.actors.model.loader import load_model
from specray.actors.workers.draft_worker import DraftWorker, DraftWorkerSpec


def test_feed_profile_times_growing_feeds_and_frees_its_slot(tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    drafter = DraftModelDrafter(load_model(tiny_dir_factory("qwen2", 7)), 1, 64)
    assert isinstance(drafter, CatchesUp)
    points = drafter.feed_profile([1, 8, 32, 1000])
    assert [size for size, _ in points] == [1, 8, 32]  # 1000 does not fit the cache
    assert all(seconds > 0 for _, seconds in points)
    assert drafter.cache.num_free_slots == 1
    hybrid = HybridDrafter(NgramDrafter(max_ngram=4), drafter, min_match=3)
    assert [size for size, _ in hybrid.feed_profile([2, 4])] == [2, 4]
    assert not isinstance(NgramDrafter(), CatchesUp)


def test_worker_reports_its_drafter_profile(tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    model = DrafterSpec("model", str(tiny_dir_factory("qwen2", 7)))
    spec = DraftWorkerSpec(model, num_slots=2, max_len=128)
    worker = DraftWorker(spec)
    assert model.paths == worker.drafter.paths == DraftPaths(model=True, lookup=False)
    assert [size for size, _ in worker.feed_profile([1, 4])] == [1, 4]
    lookup = DraftWorker(DraftWorkerSpec())
    assert lookup.drafter.paths == DraftWorkerSpec().drafter.paths == DraftPaths(False, True)
    assert lookup.feed_profile([1, 4]) == []  # copies feed nothing


def test_a_size_stops_repeating_once_its_feeds_took_enough(tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    """Long feeds are steady: timing them three times over is most of a
    start-up on a small CPU, so a size whose runs took ``enough_s`` moves on."""
    cache = DraftModelDrafter(load_model(tiny_dir_factory("qwen2", 7)), 1, 64).cache
    fed: list[int] = []

    def feed(slot: int, size: int) -> None:
        fed.append(size)
        time.sleep(0.002 * size)

    profile_feeds(cache, [1, 16], feed, repeats=3, enough_s=0.025)
    assert fed == [1, 1, 1, 16]  # 1 token: 3 runs under 25 ms; 16: one of 32 ms
    fed.clear()
    assert [size for size, _ in profile_feeds(cache, [1, 16], feed, enough_s=1e9)] == [1, 16]
    assert fed == [1, 1, 1, 16, 16, 16] and cache.num_free_slots == 1
