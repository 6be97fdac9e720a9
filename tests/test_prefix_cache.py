"""Prefix caching in process: the tree's pins and eviction, exact restores of
dense and V4 state (compressed entries included, for block sizes that cut
compression windows), drafts that never reach a shared block, and greedy
output with the cache equal to the no-cache reference across shared and
diverging prefixes, with n-gram and draft-model speculation, concurrency
and eviction, on dense and V4 targets."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from references import greedy_reference
from tiny_models import VOCAB
from tiny_v4 import save_tiny_v4

from specray.actors.drafting.base import Drafter
from specray.actors.drafting.draft_model import DraftModelDrafter
from specray.actors.drafting.ngram import NgramDrafter
from specray.actors.engine.engine import EngineConfig, SpecEngine
from specray.actors.engine.request import GenerationRequest
from specray.actors.engine.target import LocalTarget, VerifyInput
from specray.actors.model.batch import ForwardBatch, SequenceInput
from specray.actors.model.decoder import DecoderModel
from specray.actors.model.kv_cache import SlotCache
from specray.actors.model.loader import load_model
from specray.actors.model.prefix_cache import PrefixCache, PrefixHold
from specray.actors.model.prefix_tree import PrefixTree
from specray.actors.sampling.params import StoppingCriteria


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def v4_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_v4(tmp_path_factory.mktemp("v4prefix"), seed=3)


def _tokens(length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (length,), generator=gen).tolist()


def _state(cache: SlotCache, slot: int, length: int) -> list[torch.Tensor]:
    """Every per-position tensor of ``slot`` a forward from ``length`` may read."""
    return [r.tensor[slot, : length // r.rate].clone() for r in cache.position_rows()]


def _feed(model: DecoderModel, cache: SlotCache, slot: int, tokens: list[int], chunk: int) -> None:
    for start in range(cache.length(slot), len(tokens), chunk):
        piece = tokens[start : start + chunk]
        model(ForwardBatch.build([SequenceInput(slot, piece, start, 0)]), cache)


# -- the tree ------------------------------------------------------------------


def test_the_tree_evicts_unpinned_leaves_least_recently_used_first() -> None:
    tree = PrefixTree(num_blocks=3, block_size=2)
    a = tree.add(tree.root, (1, 2))
    assert a is not None
    tree.pin([a])
    b = tree.add(a, (3, 4))
    assert b is not None
    tree.pin([b])
    c = tree.add(tree.root, (5, 6))
    assert c is not None and tree.num_used == 3
    d = tree.add(tree.root, (7, 8))  # full: the only unpinned leaf, c, goes
    assert d is not None and d.block == c.block and tree.evicted == 1
    assert [n.tokens for n in tree.match([1, 2, 3, 4, 9], limit=5)] == [(1, 2), (3, 4)]
    assert tree.match([1, 2, 3, 4], limit=3) == [a]  # never the whole offer's last token
    tree.pin([d])
    assert tree.add(d, (9, 9)) is None  # every block is pinned: nothing to evict
    tree.unpin([d])
    tree.unpin([a, b])  # a's chain is now more recent than d
    assert tree.num_pins == 0
    e = tree.add(tree.root, (9, 10))
    assert e is not None and e.block == d.block  # d: the least recent unpinned leaf
    f = tree.add(tree.root, (11, 12))  # then b, then a (a leaf once b is gone)
    g = tree.add(tree.root, (13, 14))
    assert f is not None and g is not None and {f.block, g.block} == {a.block, b.block}
    assert tree.match([1, 2], limit=2) == [] and tree.evicted == 4


# -- exact restores --------------------------------------------------------------


@pytest.mark.parametrize(("which", "block_size"), [("qwen2", 4), ("v4", 6), ("v4", 16)])
def test_an_attached_prefix_is_the_state_its_tokens_left(
    which: str,
    block_size: int,
    tiny_dir_factory,  # type: ignore[no-untyped-def]
    v4_dir: Path,
) -> None:
    """Blocks copied out of one slot and into another hold, bit for bit, the
    rows and compressed entries (rates 4 and 8: blocks of 6 cut windows)
    the first slot had at that length, and both slots then decode alike."""
    model = load_model(v4_dir if which == "v4" else tiny_dir_factory(which))
    cache = model.new_cache(2, 96)
    prefix = PrefixCache(cache, 96, block_size)
    tokens = _tokens(45, 1)
    source = cache.allocate()
    _feed(model, cache, source, tokens, chunk=7)
    hold = PrefixHold()
    prefix.extend(hold, source, tokens, committed=len(tokens))
    shared = len(tokens) // block_size * block_size
    assert prefix.length(hold) == shared

    copy = cache.allocate()
    attached = prefix.attach(copy, [*tokens, 5])
    assert prefix.length(attached) == shared == cache.length(copy)
    for got, want in zip(_state(cache, copy, shared), _state(cache, source, shared), strict=True):
        assert torch.equal(got, want)
    cache.truncate(source, shared)
    rest = _tokens(9, 2)
    logits = [
        model(ForwardBatch.build([SequenceInput(s, rest, shared, len(rest))]), cache).logits
        for s in (source, copy)
    ]
    assert torch.equal(logits[0], logits[1])
    prefix.release(hold)
    prefix.release(attached)
    assert prefix.num_pins == 0


def test_rejected_drafts_never_reach_a_shared_block(tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    """A verify's drafts fill whole blocks past the committed tokens; they
    are rejected. Offering exactly those draft tokens as a new prompt finds
    only the committed blocks, whose state is a clean prefill's."""
    model = load_model(tiny_dir_factory("qwen2"))
    target = LocalTarget(model, num_slots=2, max_len=64, prefix_tokens=64, block_size=4)
    prompt, drafts = _tokens(8, 3), _tokens(8, 4)
    out = target.verify([VerifyInput("a", 0, prompt + drafts, 9, lookup_ids=tuple(prompt))])[0]
    assert out.prefix_hit == 0 and out.num_rows == 9
    bonus = int(out.greedy_ids()[0])  # drafts[0] rejected unless it is the greedy token
    target.verify([VerifyInput("a", 8, [bonus], 1)])  # the rollback rides on the next verify

    offer = (*prompt, *drafts, 7)
    hit = target.verify([VerifyInput("b", 0, list(offer), 1, lookup_ids=offer)])[0].prefix_hit
    assert hit == (12 if drafts[0] == bonus else 8)
    clean = model.new_cache(1, 64)
    _feed(model, clean, clean.allocate(), prompt, chunk=8)
    b = target.slot_of("b")
    for got, want in zip(_state(target.cache, b, 8), _state(clean, 0, 8), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    target.release("a")
    target.release("b")
    assert target.prefix_pins == 0 and target.num_active == 0


def _cached_prompt(model_dir: Path) -> tuple[LocalTarget, list[int]]:
    """A target whose prefix cache holds a finished request's 30-token prompt."""
    target = LocalTarget(
        load_model(model_dir), num_slots=2, max_len=64, prefix_tokens=64, block_size=4
    )
    prompt = _tokens(30, 5)
    target.verify([VerifyInput("a", 0, prompt, 1, lookup_ids=tuple(prompt))])
    target.release("a")
    return target, prompt


def test_a_fully_cached_chunk_feeds_nothing_and_reports_the_hit(tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    target, prompt = _cached_prompt(tiny_dir_factory("qwen2"))
    chunk = target.verify([VerifyInput("b", 0, prompt[:8], 0, lookup_ids=tuple(prompt))])[0]
    assert chunk.prefix_hit == 28 and chunk.num_rows == 0
    assert target.cache.length(target.slot_of("b")) == 28
    # Without an offer there is no lookup, and nothing is shared.
    plain = target.verify([VerifyInput("c", 0, prompt, 1)])[0]
    assert plain.prefix_hit is None
    target.release("b")
    target.release("c")
    assert target.prefix_pins == 0


def test_a_peek_reports_the_cached_prefix_and_holds_nothing(tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    target, prompt = _cached_prompt(tiny_dir_factory("qwen2"))
    asked = [VerifyInput("b", 0, [], 0, lookup_ids=tuple(prompt[:21]), peek=True)]
    peek = target.verify(asked)[0]
    assert peek.prefix_hit == 20 and peek.num_rows == 0
    assert target.num_active == 0 and target.prefix_pins == 0
    # Without a prefix cache the answer is None: nothing to ask again.
    plain = LocalTarget(target.model, num_slots=1, max_len=64)
    assert plain.verify(asked)[0].prefix_hit is None and plain.num_active == 0
    with pytest.raises(ValueError, match="a peek offers lookup_ids and feeds no tokens"):
        VerifyInput("b", 0, [1], 0, lookup_ids=(1,), peek=True)


# -- greedy output with the cache equals the reference ------------------------------


def _conversations(system: list[int]) -> list[list[list[int]]]:
    """Three chats: two share a system prompt and diverge after it, one
    shares nothing; each turn's user message, in order."""
    return [
        [system + _tokens(5, 10), _tokens(4, 11), _tokens(6, 12)],
        [system + _tokens(7, 20), _tokens(3, 21)],
        [_tokens(19, 30), _tokens(5, 31)],
    ]


@pytest.mark.parametrize(
    ("family", "drafter_name"),
    [
        ("qwen2", "ngram"),
        ("qwen2", "draft model"),
        ("gemma3", "ngram"),
        ("v4", "ngram"),
        ("v4", "draft model"),
    ],
)
def test_multi_turn_chats_with_the_prefix_cache_equal_the_reference(
    family: str,
    drafter_name: str,
    tiny_dir_factory,  # type: ignore[no-untyped-def]
    v4_dir: Path,
) -> None:
    """Each turn resends the conversation (earlier turns' output included)
    while the other chats run beside it; the pool holds fewer blocks than
    the chats fill, so blocks are evicted; prompts prefill in chunks of 8,
    so a cached prefix spans several chunks."""
    model_dir = v4_dir if family == "v4" else tiny_dir_factory(family)
    max_tokens = 7
    chats = _conversations(_tokens(21, 9))
    # Each turn's prompt: the previous turn's prompt and (reference) output, then the message.
    prompts: dict[str, list[int]] = {}
    expected: dict[str, list[int]] = {}
    for turn in range(max(len(c) for c in chats)):
        asked = {}
        for i, chat in enumerate(chats):
            if turn < len(chat):
                before = prompts[f"c{i}t{turn - 1}"] + expected[f"c{i}t{turn - 1}"] if turn else []
                asked[f"c{i}t{turn}"] = before + chat[turn]
        prompts |= asked
        expected |= greedy_reference(model_dir, asked, max_tokens)

    target = LocalTarget(load_model(model_dir), 3, 128, prefix_tokens=96, block_size=4)
    drafter: Drafter = NgramDrafter(max_ngram=3)
    if drafter_name == "draft model":
        draft_dir = save_tiny_v4(model_dir.parent / "draft", seed=8) if family == "v4" else None
        drafter = DraftModelDrafter(
            load_model(draft_dir or tiny_dir_factory(family, 7)), 3, 128, prefix_tokens=64
        )
    config = EngineConfig(
        max_batch=3, num_speculative_tokens=3, adaptive=False, max_batched_tokens=8
    )
    engine = SpecEngine(target, drafter, None, (), config)
    stopping = StoppingCriteria(max_tokens=max_tokens, ignore_eos=True)
    outputs: dict[str, list[int]] = {rid: [] for rid in prompts}
    cached: dict[str, int] = {}
    for turn in range(3):  # a turn's chats run together; the next turn follows
        requests = [
            GenerationRequest(rid, prompt, stopping=stopping)
            for rid, prompt in prompts.items()
            if rid.endswith(f"t{turn}")
        ]
        for chunk in engine.generate(requests):
            outputs[chunk.request_id] += chunk.token_ids
            cached[chunk.request_id] = chunk.stats.cached_tokens
    assert outputs == expected
    # Later turns found their earlier turns, the second chat the shared
    # system prompt; the pool was too small to keep everything.
    assert cached["c1t0"] >= 20 and cached["c0t1"] >= 24 and cached["c1t1"] >= 24
    assert cached["c0t2"] >= 20
    assert engine.prefix_hits >= sum(cached.values()) and engine.prefix_queries > 0
    assert target.prefix is not None and target.prefix.tree.evicted > 0
    assert target.prefix_pins == 0 and target.num_active == 0
    if isinstance(drafter, DraftModelDrafter):
        assert drafter.prefix is not None and drafter.prefix.hit_tokens >= 20
        assert drafter.prefix_pins == 0
