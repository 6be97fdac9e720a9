"""Prompt ids through a tokenizer's chat template: one user turn, and a
whole conversation (what multi-turn benchmarks resend)."""

from __future__ import annotations

from pathlib import Path

from specray.actors.engine.tokenizer import chat_ids, conversation_ids, load_tokenizer
from specray.actors.store.chat_tokenizer import save_chat_tokenizer

CORPUS = ("def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.")


def test_a_conversation_is_the_template_over_every_turn(tmp_path: Path) -> None:
    save_chat_tokenizer(tmp_path, CORPUS)
    tokenizer = load_tokenizer(tmp_path)
    user = {"role": "user", "content": "def add(a, b):"}
    assert conversation_ids(tokenizer, [user]) == chat_ids(tokenizer, user["content"])
    turns = [user, {"role": "assistant", "content": "return a + b"}, user]
    ids = conversation_ids(tokenizer, turns)
    expected = tokenizer.apply_chat_template(
        turns, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert ids == list(expected) and all(isinstance(t, int) for t in ids)
