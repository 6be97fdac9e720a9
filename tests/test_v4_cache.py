"""The V4 cache under speculative verify and rollback.

After every round (feed the uncached committed tokens plus γ drafts, accept
a random number of them, roll back) the cache must hold exactly the state a
fresh prefill of the committed tokens leaves: the sliding-window keys, each
compressor's per-token rows (its partial window and CSA's overlap state) and
its pooled entries, and the indexer's, compared tensor by tensor. The
rounds cross sliding-window, CSA (4) and HCA (8) boundaries, including
rounds whose rejected drafts closed a window.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
import torch
from tiny_v4 import VOCAB, assert_logits_close, save_tiny_v4

from specray.actors.engine.target import LocalTarget, VerifyInput
from specray.actors.model.batch import ForwardBatch, SequenceInput
from specray.actors.model.decoder import DecoderModel
from specray.actors.model.loader import load_model
from specray.actors.model.v4.state import CompressedKVCache

MAX_LEN = 96


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny V4 forwards are many small ops: one thread spares OpenMP's
    spinning on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> DecoderModel:
    return load_model(save_tiny_v4(tmp_path_factory.mktemp("v4cache"), seed=5))


def _fresh_state(model: DecoderModel, tokens: list[int]) -> dict[str, torch.Tensor]:
    cache = model.new_cache(1, MAX_LEN)
    assert isinstance(cache, CompressedKVCache)
    slot = cache.allocate()
    model(ForwardBatch.build([SequenceInput(slot, tokens, 0)]), cache)
    return cache.valid_state(slot)


def _assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("seed", [0, 1])
def test_rollback_leaves_the_state_of_the_accepted_tokens(model: DecoderModel, seed: int) -> None:
    rng = random.Random(seed)
    target = LocalTarget(model, num_slots=2, max_len=MAX_LEN)
    cache = target.cache
    assert isinstance(cache, CompressedKVCache)
    committed = [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 30))]
    cached = 0  # the target's cache is valid for committed[:cached]
    closed_by_rejected = 0
    while len(committed) < 72:
        drafts = [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 8))]
        target.verify([VerifyInput("r", cached, committed[cached:] + drafts, len(drafts) + 1)])
        accepted = rng.randint(0, len(drafts))
        fed_end = len(committed) + len(drafts)
        cached = len(committed) + accepted
        # Did the rejected drafts complete a CSA or HCA window?
        closed_by_rejected += any(fed_end // r > cached // r for r in (4, 8))
        committed += [*drafts[:accepted], rng.randrange(3, VOCAB)]
        slot = target._slots["r"]
        cache.truncate(slot, cached)  # what the next verify does first
        _assert_same_state(cache.valid_state(slot), _fresh_state(model, committed[:cached]))
    assert closed_by_rejected >= 3  # the test did roll back over closed windows

    # And the next verify after all those rollbacks equals one on a fresh cache.
    tail = [rng.randrange(3, VOCAB) for _ in range(5)]
    feed = committed[cached:] + tail
    rolled = target.verify([VerifyInput("r", cached, feed, len(feed))])[0].full_logits()
    fresh = LocalTarget(model, num_slots=1, max_len=MAX_LEN)
    reference = fresh.verify([VerifyInput("r", 0, committed + tail, len(feed))])[0].full_logits()
    assert_logits_close(rolled, reference)


def test_slots_do_not_share_state(model: DecoderModel) -> None:
    """Two requests interleaved in one cache each match their own prefill."""
    target = LocalTarget(model, num_slots=3, max_len=MAX_LEN)
    first, second = list(range(3, 40)), list(range(50, 75))
    target.verify([VerifyInput("a", 0, first[:13], 1), VerifyInput("b", 0, second[:22], 1)])
    target.verify([VerifyInput("a", 13, first[13:], 1), VerifyInput("b", 22, second[22:], 3)])
    cache = target.cache
    assert isinstance(cache, CompressedKVCache)
    _assert_same_state(cache.valid_state(target._slots["a"]), _fresh_state(model, first))
    _assert_same_state(cache.valid_state(target._slots["b"]), _fresh_state(model, second))
