"""NgramDrafter: prompt-lookup proposals from an incremental n-gram index."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specray.actors.drafting.base import Drafter, DraftRequest, DraftUpdate
from specray.actors.drafting.ngram import NgramDrafter
from specray.actors.sampling.params import SamplingParams

GREEDY = SamplingParams()


def _propose(drafter: NgramDrafter, request_id: str, num_tokens: int) -> list[int]:
    (proposal,) = drafter.propose([DraftRequest(request_id, num_tokens)])
    assert proposal.draft_probs is None
    return proposal.token_ids


def _reference(tokens: list[int], num_tokens: int, min_ngram: int, max_ngram: int) -> list[int]:
    """Brute force: scan the whole context for the latest earlier match, longest n first."""
    length = len(tokens)
    for n in range(max_ngram, min_ngram - 1, -1):
        if n > length:
            continue
        suffix = tokens[length - n :]
        for start in range(length - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                # Copy on from the match; the copy may read what it just wrote.
                extended = list(tokens)
                for i in range(num_tokens):
                    extended.append(extended[start + n + i])
                return extended[length:]
    return []


def test_satisfies_drafter_protocol() -> None:
    drafter: Drafter = NgramDrafter()
    assert drafter.name == "ngram"
    assert drafter.hidden_layers == ()


def test_proposes_continuation_of_latest_match() -> None:
    drafter = NgramDrafter(max_ngram=2, min_ngram=1)
    # "7 8" occurs twice before the suffix; the later one is followed by 30 31.
    drafter.start("r", [7, 8, 10, 11, 7, 8, 30, 31, 5, 7, 8], GREEDY)
    assert _propose(drafter, "r", 2) == [30, 31]


def test_prefers_longest_matching_ngram() -> None:
    drafter = NgramDrafter(max_ngram=3, min_ngram=1)
    # The 3-gram "1 2 3" matches only at the start; the 1-gram "3" matches later.
    drafter.start("r", [1, 2, 3, 40, 41, 9, 3, 50, 51, 1, 2, 3], GREEDY)
    assert _propose(drafter, "r", 2) == [40, 41]
    (proposal,) = drafter.propose([DraftRequest("r", 2)])
    assert proposal.evidence == "ngram"  # one kind, whatever the n-gram's size
    assert proposal.confidence == [0.75, 1.0]  # ranked by it: 3 / (3 + 1) first


def test_a_one_token_match_states_less_confidence_than_a_longer_one() -> None:
    drafter = NgramDrafter(max_ngram=3, min_ngram=1)
    drafter.start("short", [5, 60, 61, 9, 5], GREEDY)
    drafter.start("long", [4, 5, 60, 61, 9, 4, 5], GREEDY)
    short, long = drafter.propose([DraftRequest("short", 2), DraftRequest("long", 2)])
    assert short.token_ids == long.token_ids == [60, 61]
    assert short.confidence is not None and long.confidence is not None
    assert short.confidence[0] == 0.5 < long.confidence[0] == pytest.approx(2 / 3)


def test_respects_num_tokens_per_request() -> None:
    drafter = NgramDrafter()
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2]
    drafter.start("a", prompt, GREEDY)
    drafter.start("b", prompt, GREEDY)
    proposals = drafter.propose([DraftRequest("a", 3), DraftRequest("b", 5)])
    assert [p.token_ids for p in proposals] == [[3, 4, 5], [3, 4, 5, 6, 7]]
    assert _propose(drafter, "a", 0) == []


def test_empty_when_nothing_matches() -> None:
    drafter = NgramDrafter(max_ngram=3, min_ngram=1)
    drafter.start("r", [1, 2, 3, 4], GREEDY)
    # The suffix occurs only as itself, which must not count as a match.
    assert _propose(drafter, "r", 4) == []
    drafter.start("empty", [], GREEDY)
    assert _propose(drafter, "empty", 4) == []


def test_min_ngram_ignores_short_matches() -> None:
    drafter = NgramDrafter(max_ngram=3, min_ngram=2)
    drafter.start("r", [5, 1, 2, 9, 5], GREEDY)
    assert _propose(drafter, "r", 2) == []


def test_continuation_into_end_of_context_repeats_the_period() -> None:
    drafter = NgramDrafter(max_ngram=3, min_ngram=1)
    drafter.start("r", [9, 1, 2, 3, 1, 2, 3], GREEDY)
    assert _propose(drafter, "r", 7) == [1, 2, 3, 1, 2, 3, 1]
    drafter.start("run", [4, 4], GREEDY)
    assert _propose(drafter, "run", 5) == [4, 4, 4, 4, 4]


def test_accept_extends_the_context() -> None:
    drafter = NgramDrafter(max_ngram=2, min_ngram=1)
    drafter.start("r", [1, 2, 3, 4], GREEDY)
    assert _propose(drafter, "r", 3) == []
    drafter.accept(DraftUpdate("r", 0, [1]))
    assert _propose(drafter, "r", 3) == [2, 3, 4]
    drafter.accept(DraftUpdate("r", 1, [2, 7]))  # 2 accepted, 7 recovered
    assert drafter.context("r") == [1, 2, 3, 4, 1, 2, 7]
    assert _propose(drafter, "r", 3) == []
    drafter.accept(DraftUpdate("r", 0, [1, 2]))
    # "1 2" last occurred just before 7.
    assert _propose(drafter, "r", 3) == [7, 1, 2]


def test_unknown_request_ids_raise() -> None:
    drafter = NgramDrafter()
    with pytest.raises(KeyError, match="does not track request 'nope'"):
        drafter.propose([DraftRequest("nope", 2)])
    with pytest.raises(KeyError, match="nope"):
        drafter.accept(DraftUpdate("nope", 0, [1]))
    drafter.start("r", [1, 2], GREEDY)
    drafter.finish("r")
    with pytest.raises(KeyError, match="'r'"):
        drafter.finish("r")
    with pytest.raises(KeyError):
        drafter.propose([DraftRequest("r", 1)])


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="min_ngram"):
        NgramDrafter(max_ngram=2, min_ngram=3)
    with pytest.raises(ValueError, match="min_ngram"):
        NgramDrafter(max_ngram=2, min_ngram=0)
    drafter = NgramDrafter()
    drafter.start("r", [1], GREEDY)
    with pytest.raises(ValueError, match="already tracks"):
        drafter.start("r", [1], GREEDY)
    with pytest.raises(ValueError, match="num_accepted"):
        drafter.accept(DraftUpdate("r", 3, [1, 2]))


@settings(max_examples=150, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 3), max_size=60),
    prompt_len=st.integers(0, 60),
    chunk_sizes=st.lists(st.integers(1, 5), min_size=1, max_size=8),
    sizes=st.tuples(st.integers(1, 4), st.integers(0, 3)),
    num_tokens=st.integers(0, 8),
)
def test_incremental_index_matches_brute_force(
    tokens: list[int],
    prompt_len: int,
    chunk_sizes: list[int],
    sizes: tuple[int, int],
    num_tokens: int,
) -> None:
    min_ngram, extra = sizes
    drafter = NgramDrafter(max_ngram=min_ngram + extra, min_ngram=min_ngram)
    committed = tokens[:prompt_len]
    drafter.start("r", committed, GREEDY)
    rest = tokens[prompt_len:]
    step = 0
    while True:
        expected = _reference(committed, num_tokens, min_ngram, min_ngram + extra)
        assert _propose(drafter, "r", num_tokens) == expected
        if not rest:
            break
        size = chunk_sizes[step % len(chunk_sizes)]
        step += 1
        chunk, rest = rest[:size], rest[size:]
        drafter.accept(DraftUpdate("r", len(chunk) - 1, chunk))
        committed = committed + chunk
    assert drafter.context("r") == tokens
