"""A drafter that fell behind (rounds without drafts) catches up ahead of its
next proposal: the proposals are the same as feeding lazily, and the
proposal itself then feeds one token per request."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_models import VOCAB

from specray.actors.drafting.base import CatchesUp, DraftRequest
from specray.actors.drafting.draft_model import DraftModelDrafter
from specray.actors.engine.round import DraftUpdate
from specray.actors.model.loader import load_model
from specray.actors.sampling.params import SamplingParams
from specray.actors.workers.draft_worker import DraftWorker, DraftWorkerSpec


def _prompt(seed: int, length: int) -> list[int]:
    return torch.randint(
        3, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)
    ).tolist()


def test_catch_up_drafts_what_a_lazy_feed_drafts(tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    draft_dir: Path = tiny_dir_factory("qwen2", 7)
    lazy = DraftModelDrafter(load_model(draft_dir), 3, 128)
    eager = DraftModelDrafter(load_model(draft_dir), 3, 128)
    assert isinstance(eager, CatchesUp)
    prompts = {"a": _prompt(1, 21), "b": _prompt(2, 5)}
    for drafter in (lazy, eager):
        for request_id, prompt in prompts.items():
            drafter.start(request_id, prompt, SamplingParams())
    eager.catch_up(["a", "b"])
    assert [eager.cache.length(s.slot) for s in eager._states.values()] == [20, 4]
    asks = [DraftRequest("a", 3), DraftRequest("b", 2)]
    first = eager.propose(asks)
    assert [p.token_ids for p in first] == [p.token_ids for p in lazy.propose(asks)]
    # Two rounds without drafts, then a catch-up: still the lazy drafts.
    for drafter in (lazy, eager):
        drafter.accept("a", 1, [first[0].token_ids[0], 9])
        drafter.accept("b", 0, [4])
        drafter.accept("a", 0, [12])
        drafter.accept("b", 0, [13])
    eager.catch_up(["a", "b", "a"])
    again = eager.propose(asks)
    assert [p.token_ids for p in again] == [p.token_ids for p in lazy.propose(asks)]
    lengths = [eager.cache.length(s.slot) for s in eager._states.values()]
    eager.catch_up(["a"])  # in step: nothing to feed
    assert [eager.cache.length(s.slot) for s in eager._states.values()] == lengths


def test_feed_profile_times_growing_feeds_and_frees_its_slot(tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    drafter = DraftModelDrafter(load_model(tiny_dir_factory("qwen2", 7)), 1, 64)
    points = drafter.feed_profile([1, 8, 32, 1000])
    assert [size for size, _ in points] == [1, 8, 32]  # 1000 does not fit the cache
    assert all(seconds > 0 for _, seconds in points)
    assert drafter.cache.num_free_slots == 1


def test_worker_catch_up_applies_verdicts_first(tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    """The router sends the verdicts it holds with a catch-up; the next
    proposal (with no verdicts left to send) drafts as a lazy replica does."""
    draft_dir: Path = tiny_dir_factory("qwen2", 7)
    spec = DraftWorkerSpec("model", str(draft_dir), num_slots=2, max_len=128)
    eager, lazy = DraftWorker(spec), DraftWorker(spec)
    prompt = _prompt(3, 9)
    for worker in (eager, lazy):
        worker.start("a", prompt, SamplingParams())
    updates = [DraftUpdate("a", 0, [7], None), DraftUpdate("a", 0, [11], None)]
    eager.catch_up(["a", "gone"], updates)
    ask = [DraftRequest("a", 3)]
    assert eager.propose(ask)[0].token_ids == lazy.propose(ask, updates)[0].token_ids
    assert eager.stats().catch_up_s > 0
    assert [size for size, _ in eager.feed_profile([1, 4])] == [1, 4]
    assert DraftWorker(DraftWorkerSpec()).feed_profile([1, 4]) == []  # lookup: nothing to feed
