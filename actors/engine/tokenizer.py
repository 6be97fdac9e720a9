"""A target's tokenizer and the token ids that end its sequences."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from specray.actors.model.config import ModelConfig


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(model_dir)


def has_tokenizer(model_dir: Path) -> bool:
    """Whether the directory carries a tokenizer (test checkpoints may not:
    those stream token ids only)."""
    return any((model_dir / name).exists() for name in ("tokenizer.json", "tokenizer_config.json"))


def eos_token_ids(
    config: ModelConfig, tokenizer: PreTrainedTokenizerBase | None
) -> tuple[int, ...]:
    """A model's end-of-sequence ids: its config's, plus its tokenizer's where
    that one differs (chat models end a turn with a token of their own)."""
    eos = tuple(config.eos_token_ids)
    tok_eos = tokenizer.eos_token_id if tokenizer is not None else None
    if tok_eos is not None and tok_eos not in eos:
        eos += (int(tok_eos),)
    return eos


def chat_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """``text`` as one user turn of the tokenizer's chat template, ready for
    the assistant's answer."""
    return conversation_ids(tokenizer, [{"role": "user", "content": text}])


def conversation_ids(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]]
) -> list[int]:
    """``messages`` (role, content) through the tokenizer's chat template,
    ready for the assistant's answer."""
    ids = tokenizer.apply_chat_template(
        [dict(message) for message in messages],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
        raise TypeError(f"chat template gave {type(ids).__name__}, expected a list of ids")
    return [t for t in ids if isinstance(t, int)]
