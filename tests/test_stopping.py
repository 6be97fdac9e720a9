"""StopChecker: cutting a request's output round by round, with streamed text."""

from __future__ import annotations

import functools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizer_helpers import byte_level_chars, train_byte_level_bpe
from transformers import PreTrainedTokenizerFast

from specray.actors.engine.detokenizer import IncrementalDetokenizer
from specray.actors.engine.stopping import StopChecker, StreamDelta
from specray.actors.sampling.params import StoppingCriteria

CORPUS = ["héllo wörld 你好 🙂", "the quick brown fox jumps over the lazy dog STOP"]
ALPHABET = "abST OP\n你好🙂"
EOS = 0


@functools.cache
def _tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = train_byte_level_bpe(CORPUS * 3, 350, ["<eos>"])
    assert tokenizer.eos_token_id == EOS
    return tokenizer


def _bytewise(text: str) -> list[int]:
    """One token per UTF-8 byte (GPT-2's byte-to-character map), so tokens split text."""
    chars = byte_level_chars()
    vocab = _tokenizer().get_vocab()
    return [vocab[chars[b]] for b in text.encode()]


def _checker(**criteria: Any) -> StopChecker:
    tokenizer = _tokenizer()
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("prompt:"))
    params = StoppingCriteria(eos_token_ids=(EOS,), **criteria)
    return StopChecker(params, detok)


def _run(checker: StopChecker, rounds: list[list[int]]) -> list[StreamDelta]:
    deltas = []
    for token_ids in rounds:
        deltas.append(checker.update(token_ids))
        if checker.finished:
            break
    return deltas


def _chunks(token_ids: list[int], size: int) -> list[list[int]]:
    return [token_ids[i : i + size] for i in range(0, len(token_ids), size)]


def test_stop_string_spanning_tokens_and_rounds() -> None:
    ids = _bytewise("hi STOP there")
    deltas = _run(_checker(stop=("STOP",)), _chunks(ids, 2))
    # Rounds: "hi", " S", "TO", "P " -> finished at the token "P".
    assert [d.text for d in deltas] == ["hi", " ", "", ""]
    assert [d.token_ids for d in deltas] == _chunks(ids[:7], 2)
    assert deltas[-1].finish_reason == "stop"
    assert deltas[-1].stop_reason == "STOP"
    assert [d.finished for d in deltas] == [False, False, False, True]


def test_held_back_prefix_is_released_once_ruled_out() -> None:
    checker = _checker(stop=("STOP",))
    assert checker.update(_bytewise("aST")).text == "a"
    assert checker.update(_bytewise("A")).text == "STA"
    assert checker.update(_bytewise("S")).text == ""
    assert checker.update(_bytewise("b")).text == "Sb"


def test_earliest_stop_string_wins() -> None:
    delta = _checker(stop=("cd", "bcd")).update(_bytewise("abcde"))
    assert (delta.text, delta.stop_reason, delta.num_tokens) == ("a", "bcd", 4)


def test_multibyte_stop_string() -> None:
    ids = _bytewise("a你好b")
    delta = _checker(stop=("你好",)).update(ids)
    assert (delta.text, delta.finish_reason, delta.token_ids) == ("a", "stop", ids[:7])


def test_eos_in_the_middle_of_a_round() -> None:
    ids = _bytewise("ab")
    checker = _checker()
    delta = checker.update([*ids, EOS, *_bytewise("cd")])
    assert delta.token_ids == [*ids, EOS]
    assert (delta.text, delta.finish_reason, delta.stop_reason) == ("ab", "stop", None)
    assert checker.num_output_tokens == 3
    with pytest.raises(RuntimeError, match="already finished"):
        checker.update(_bytewise("x"))


def test_stop_token_is_kept_but_its_text_is_not() -> None:
    newline = _bytewise("\n")[0]
    ids = _bytewise("ab\ncd")
    delta = _checker(stop_token_ids=(newline,)).update(ids)
    assert delta.token_ids == ids[:3]
    assert (delta.text, delta.finish_reason, delta.stop_reason) == ("ab", "stop", newline)


def test_ignore_eos_ignores_only_eos() -> None:
    newline = _bytewise("\n")[0]
    checker = _checker(ignore_eos=True, stop_token_ids=(newline,))
    delta = checker.update([*_bytewise("a"), EOS, *_bytewise("b\nc")])
    assert delta.text == "ab"
    assert delta.num_tokens == 4
    assert delta.stop_reason == newline
    # An EOS id also listed as a stop token still stops.
    explicit = _checker(ignore_eos=True, stop_token_ids=(EOS,)).update([*_bytewise("a"), EOS])
    assert (explicit.finish_reason, explicit.stop_reason) == ("stop", EOS)


def test_max_tokens_reached_mid_round() -> None:
    ids = _bytewise("abcdefg")
    deltas = _run(_checker(max_tokens=5), [ids[:3], ids[3:]])
    assert [d.token_ids for d in deltas] == [ids[:3], ids[3:5]]
    assert [d.text for d in deltas] == ["abc", "de"]
    assert [d.finish_reason for d in deltas] == [None, "length"]


def test_length_releases_held_back_text() -> None:
    delta = _checker(max_tokens=3, stop=("STOP",)).update(_bytewise("aST"))
    assert (delta.text, delta.finish_reason) == ("aST", "length")


def test_length_releases_an_incomplete_character() -> None:
    ids = _bytewise("a🙂")[:3]
    delta = _checker(max_tokens=3).update(ids)
    assert delta.text == _tokenizer().decode(ids)
    assert delta.finish_reason == "length"


def test_stop_wins_over_length_on_the_same_token() -> None:
    by_string = _checker(max_tokens=4, stop=("OP",)).update(_bytewise("STOPx"))
    assert (by_string.text, by_string.finish_reason, by_string.num_tokens) == ("ST", "stop", 4)
    by_eos = _checker(max_tokens=2).update([*_bytewise("a"), EOS])
    assert (by_eos.text, by_eos.finish_reason) == ("a", "stop")


def test_without_decoder_only_tokens_count() -> None:
    checker = StopChecker(StoppingCriteria(max_tokens=3, eos_token_ids=(EOS,)))
    assert checker.update([5, 6]) == StreamDelta([5, 6], "", None)
    assert checker.update([7, 8]) == StreamDelta([7], "", "length")
    with pytest.raises(ValueError, match="need a decoder"):
        StopChecker(StoppingCriteria(stop=("x",)))


def test_rejects_bad_criteria() -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        _checker(max_tokens=0)
    with pytest.raises(ValueError, match="non-empty"):
        _checker(stop=("",))


@settings(max_examples=80, deadline=None)
@given(
    text=st.text(alphabet=ALPHABET, max_size=24),
    stops=st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=3), max_size=2),
    bytewise=st.booleans(),
    chunk=st.integers(1, 5),
)
def test_streamed_text_is_the_text_before_the_first_stop_string(
    text: str, stops: list[str], bytewise: bool, chunk: int
) -> None:
    tokenizer = _tokenizer()
    ids = _bytewise(text) if bytewise else tokenizer.encode(text)
    checker = _checker(stop=tuple(stops), max_tokens=len(ids) or 1)
    deltas = _run(checker, _chunks(ids, chunk))
    streamed = "".join(d.text for d in deltas)
    kept = [t for d in deltas for t in d.token_ids]
    assert not any("\ufffd" in d.text for d in deltas)

    cuts = [text.find(s) for s in stops if s in text]
    if not cuts:
        assert streamed == text
        assert kept == ids
        assert checker.finish_reason == ("length" if ids else None)
        return
    assert checker.finish_reason == "stop"
    # The kept tokens are exactly those up to the first one whose text completes a stop.
    first_done = next(
        k for k in range(1, len(ids) + 1) if any(s in tokenizer.decode(ids[:k]) for s in stops)
    )
    assert kept == ids[:first_done]
    # Generation ends there, so a stop that starts earlier but would complete
    # later never completes: the cut is the earliest stop in the text so far.
    so_far = tokenizer.decode(ids[:first_done])
    assert streamed == so_far[: min(so_far.find(s) for s in stops if s in so_far)]
