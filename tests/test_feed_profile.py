"""A drafter with a cache of its own times its feeds, so the router can price
a catch-up (a new request's prompt, a stretch without drafts)."""

from __future__ import annotations

from specray.actors.drafting.base import CatchesUp, DraftPaths
from specray.actors.drafting.draft_model import DraftModelDrafter
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
