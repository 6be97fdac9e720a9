"""IncrementalDetokenizer: streamed deltas with a real (offline-trained) byte-level BPE."""

from __future__ import annotations

import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizer_helpers import byte_level_chars, train_byte_level_bpe
from transformers import PreTrainedTokenizerFast

from specray.actors.engine.detokenizer import IncrementalDetokenizer

CORPUS = [
    "héllo wörld 你好 🙂",
    "the quick brown fox jumps over the lazy dog",
    "def main():\n    return 42\n",
    "naïve café — 你好世界 🙂🙂 ünïcödé",
]
# Characters of 1 to 4 UTF-8 bytes, some merged into tokens by the trainer.
ALPHABET = "ab fox\nhéllo wörld你好世界🙂—"


@functools.cache
def _tokenizer() -> PreTrainedTokenizerFast:
    return train_byte_level_bpe(CORPUS * 3, 400, ["<eos>", "<stop>"])


@functools.cache
def _byte_token_ids() -> list[int]:
    """Token id of each single byte, via GPT-2's byte-to-character map."""
    vocab = _tokenizer().get_vocab()
    return [vocab[char] for char in byte_level_chars()]


def _bytewise(text: str) -> list[int]:
    """One token per UTF-8 byte: every multi-byte character is split across tokens."""
    table = _byte_token_ids()
    return [table[b] for b in text.encode()]


def _stream(prompt: str, token_ids: list[int], chunk: int) -> list[str]:
    tokenizer = _tokenizer()
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(prompt))
    deltas = [detok.extend(token_ids[i : i + chunk]) for i in range(0, len(token_ids), chunk)]
    deltas.append(detok.flush())
    return deltas


def test_bytewise_tokens_round_trip() -> None:
    text = "héllo 你好 🙂"
    ids = _bytewise(text)
    assert len(ids) == len(text.encode())
    assert _tokenizer().decode(ids) == text


def test_split_characters_are_held_until_complete() -> None:
    tokenizer = _tokenizer()
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("hi"))
    emoji = _bytewise("🙂")
    assert [detok.append(t) for t in emoji] == ["", "", "", "🙂"]
    assert detok.extend(_bytewise("a你")) == "a你"
    assert detok.num_output_tokens == 4 + 1 + 3


def test_leading_space_of_first_output_token_is_kept() -> None:
    tokenizer = _tokenizer()
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("the quick"))
    assert detok.extend(tokenizer.encode(" brown fox")) == " brown fox"


def test_special_tokens_are_skipped() -> None:
    tokenizer = _tokenizer()
    detok = IncrementalDetokenizer(tokenizer, [])
    eos = tokenizer.eos_token_id
    assert detok.extend([*tokenizer.encode("ab"), eos, *tokenizer.encode(" fox")]) == "ab fox"
    kept = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False)
    assert kept.extend([*tokenizer.encode("ab"), eos]) == "ab<eos>"


def test_flush_releases_an_incomplete_character_like_a_full_decode() -> None:
    tokenizer = _tokenizer()
    ids = _bytewise("a🙂")[:3]  # "a" and half of the emoji
    detok = IncrementalDetokenizer(tokenizer, [])
    assert detok.extend(ids) == "a"
    assert detok.flush() == tokenizer.decode(ids)[1:]
    assert "\ufffd" in tokenizer.decode(ids)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7])
def test_stream_of_natural_tokens_equals_full_decode(chunk: int) -> None:
    tokenizer = _tokenizer()
    text = "naïve café — 你好世界 🙂🙂 the lazy dog\n    return 42"
    ids = tokenizer.encode(text)
    deltas = _stream("def main():", ids, chunk)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


@settings(max_examples=60, deadline=None)
@given(
    text=st.text(alphabet=ALPHABET, max_size=30),
    prompt=st.text(alphabet=ALPHABET, max_size=10),
    bytewise=st.booleans(),
    chunk=st.integers(1, 6),
)
def test_streamed_deltas_concatenate_to_decode_and_never_hold_fffd(
    text: str, prompt: str, bytewise: bool, chunk: int
) -> None:
    tokenizer = _tokenizer()
    ids = _bytewise(text) if bytewise else tokenizer.encode(text)
    deltas = _stream(prompt, ids, chunk)
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
