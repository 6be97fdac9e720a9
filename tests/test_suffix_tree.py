"""Suffix tree, speculation and the LRU cache against brute-force scans."""

from __future__ import annotations

import random
import tracemalloc
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from suffix_reference import brute_count, brute_next, brute_speculate

from specray.actors.drafting.suffix.cache import SuffixCache
from specray.actors.drafting.suffix.speculate import SpeculationParams, speculate
from specray.actors.drafting.suffix.tree import SuffixTree

ALPHABET = 3  # few symbols: many repeats, deep shared paths, many splits and merges

token_lists = st.lists(st.integers(0, ALPHABET - 1), max_size=30)


def build(seqs: Sequence[Sequence[int]], max_depth: int, chunk_seed: int = 0) -> SuffixTree:
    """A tree over ``seqs``, each appended in random chunks (as rounds commit)."""
    rng = random.Random(chunk_seed)
    tree = SuffixTree(max_depth)
    for seq in seqs:
        seq_id = tree.new_sequence()
        pos = 0
        while pos < len(seq):
            step = rng.randint(1, 4)
            tree.extend(seq_id, seq[pos : pos + step])
            pos += step
        tree.close(seq_id)
    return tree


def patterns(seqs: Sequence[Sequence[int]], max_depth: int) -> set[tuple[int, ...]]:
    """Every substring of at most ``max_depth`` tokens, and one token more of each
    (most of which do not occur)."""
    found = {
        tuple(s[i : i + n])
        for s in seqs
        for n in range(1, max_depth + 1)
        for i in range(len(s) - n + 1)
    }
    longer = {(*p, t) for p in found if len(p) < max_depth for t in range(ALPHABET)}
    return found | longer | {(t,) for t in range(ALPHABET)}


def assert_counts_match(tree: SuffixTree, seqs: Sequence[Sequence[int]]) -> None:
    tree.check()
    assert tree.num_tokens == sum(len(s) for s in seqs)
    for pattern in patterns(seqs, tree.max_depth):
        assert tree.count(pattern) == brute_count(seqs, pattern), pattern
        assert (tree.locate(pattern) is not None) == (brute_count(seqs, pattern) > 0)
        assert tree.next_counts(pattern) == brute_next(seqs, pattern, tree.max_depth), pattern


@settings(max_examples=60, deadline=None)
@given(st.lists(token_lists, max_size=4), st.integers(2, 7), st.integers(0, 99))
def test_counts_equal_brute_force(seqs: list[list[int]], max_depth: int, seed: int) -> None:
    assert_counts_match(build(seqs, max_depth, seed), seqs)


@settings(max_examples=40, deadline=None)
@given(st.lists(token_lists, min_size=1, max_size=6), st.integers(2, 6), st.data())
def test_removing_least_recent_sequences_equals_a_fresh_build(
    seqs: list[list[int]], max_depth: int, data: st.DataObject
) -> None:
    tree = build(seqs, max_depth)
    order = list(range(len(seqs)))  # least recently used first
    for _ in range(len(seqs)):
        if order and data.draw(st.booleans()):
            used = data.draw(st.sampled_from(order))
            tree.refresh(used)
            order.remove(used)
            order.append(used)
        oldest = order.pop(0)
        tree.remove(oldest)
        kept = [seqs[i] for i in order]
        assert_counts_match(tree, kept)


def test_growing_sequence_is_searchable_after_every_token() -> None:
    rng = random.Random(5)
    seq = [rng.randrange(ALPHABET) for _ in range(40)]
    tree = SuffixTree(5)
    seq_id = tree.new_sequence()
    for n in range(len(seq)):
        tree.extend(seq_id, seq[n : n + 1])
        if n % 7 == 0:
            assert_counts_match(tree, [seq[: n + 1]])


def test_counts_of_a_known_text() -> None:
    tree = build([[1, 2, 3, 1, 2, 4, 1, 2, 3]], max_depth=4)
    assert tree.count([1, 2]) == 3
    assert tree.next_counts([1, 2]) == {3: 2, 4: 1}
    assert tree.next_counts([1, 2, 3]) == {1: 1}  # the last 1 2 3 has no next token
    assert tree.next_counts([1, 2, 3, 1]) == {}  # max_depth tokens: no continuation
    assert tree.locate([3, 3]) is None
    with pytest.raises(ValueError):
        tree.count([1] * 5)


SPEC_PARAMS = [
    SpeculationParams(),
    SpeculationParams(max_spec_factor=2.0, max_spec_offset=1.0, min_token_prob=0.0),
    SpeculationParams(max_spec_factor=0.5, min_token_prob=0.3),
]


@settings(max_examples=80, deadline=None)
@given(
    st.lists(token_lists, min_size=1, max_size=3),
    st.lists(st.integers(0, ALPHABET - 1), min_size=1, max_size=10),
    st.integers(0, 8),
    st.sampled_from(SPEC_PARAMS),
    st.booleans(),
    st.integers(3, 8),
)
def test_speculation_equals_brute_force(
    seqs: list[list[int]],
    context: list[int],
    ceiling: int,
    params: SpeculationParams,
    as_tree: bool,
    max_depth: int,
) -> None:
    tree = build(seqs, max_depth)
    context = context[-(max_depth - 1) :]
    draft = speculate(tree, context, ceiling, params, as_tree)
    expected = brute_speculate(seqs, context, ceiling, params, max_depth, as_tree)
    assert (draft.token_ids, draft.parents, draft.probs, draft.match_len) == (
        expected.token_ids,
        expected.parents,
        expected.probs,
        expected.match_len,
    )
    assert len(draft) <= min(ceiling, params.max_tokens(draft.match_len, ceiling))
    assert all(p >= params.min_token_prob for p in draft.probs)
    assert all(-1 <= p < i for i, p in enumerate(draft.parents))


def test_draft_length_grows_with_the_match_length() -> None:
    # A text that repeats verbatim: matching m tokens allows m tokens of draft.
    text = list(range(10, 40))
    tree = build([text], max_depth=64)
    for m in (1, 3, 8, 15):
        draft = speculate(tree, text[:m], 16, SpeculationParams())
        assert draft.match_len == m
        assert draft.token_ids == text[m : 2 * m]
        assert draft.probs == [1.0] * m
    assert speculate(tree, [99], 16, SpeculationParams()).token_ids == []


def test_tree_holds_the_alternatives_and_the_path_the_most_frequent() -> None:
    tree = build([[5, 1, 2, 5, 1, 2, 5, 1, 3, 5, 1, 4]], max_depth=8)
    params = SpeculationParams(max_spec_factor=4.0, min_token_prob=0.1)
    # After "5 1": 2 twice (then "5 1" again), 3 once, 4 once.
    path = speculate(tree, [0, 5, 1], 4, params)
    assert path.match_len == 2
    assert path.token_ids == [2, 5, 1, 2]
    assert path.probs == [0.5, 0.5, 0.5, 0.25]  # after "5 1 2 5 1": 2 or 3, once each
    branching = speculate(tree, [0, 5, 1], 4, params, as_tree=True)
    assert branching.token_ids == [2, 5, 1, 3]
    assert branching.parents == [-1, 0, 1, -1]
    assert branching.probs == [0.5, 0.5, 0.5, 0.25]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, ALPHABET - 1), min_size=1, max_size=25), max_size=12),
    st.integers(1, 60),
    st.lists(st.integers(0, 11), max_size=12),
)
def test_cache_stays_within_budget_and_counts_what_it_keeps(
    seqs: list[list[int]], budget: int, uses: list[int]
) -> None:
    cache = SuffixCache(max_tokens=budget, max_depth=5)
    added: dict[int, list[int]] = {}
    for step, seq in enumerate(seqs):
        seq_id = cache.add(seq)
        assert seq_id is not None
        added[seq_id] = seq[-budget:]
        if step < len(uses) and uses[step] in cache.sequence_ids():
            cache.use(uses[step])
        kept = cache.sequence_ids()
        assert seq_id in kept  # the newest always stays
        assert cache.num_tokens == sum(len(added[i]) for i in kept) <= budget
        assert_counts_match(cache.tree, [added[i] for i in kept])


def test_cache_evicts_least_recently_used_first() -> None:
    cache = SuffixCache(max_tokens=12, max_depth=4)
    first, second, third = (cache.add([n] * 4) for n in (1, 2, 3))
    assert cache.sequence_ids() == [first, second, third]
    assert first is not None
    cache.use(first)  # two newer of three: in the older half, so refreshed
    assert cache.sequence_ids() == [second, third, first]
    fourth = cache.add([4] * 4)
    assert cache.sequence_ids() == [third, first, fourth]
    assert cache.tree.count([2]) == 0 and cache.tree.count([1]) == 4
    assert cache.evicted_sequences == 1
    assert cache.add([9] * 20) is not None  # longer than the budget: its tail only
    assert cache.num_tokens == 12 and cache.tree.count([9]) == 12


def test_bytes_per_cached_token() -> None:
    """Python memory of a cache of code-like token streams: the figure the
    cache's docstring states, kept from drifting far."""
    rng = random.Random(0)
    lines = [[rng.randrange(30_000) for _ in range(rng.randint(3, 12))] for _ in range(300)]
    # Outputs repeat earlier lines with edits, as code edits do.
    outputs = [
        [t for _ in range(40) for t in [*rng.choice(lines), rng.randrange(30000)]]
        for _ in range(40)
    ]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    cache = SuffixCache(max_tokens=1 << 30, max_depth=32)
    for output in outputs:
        cache.add(output)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    per_token = used / cache.num_tokens
    print(f"{per_token:.0f} bytes per cached token over {cache.num_tokens} tokens")
    assert 50 < per_token < 600
