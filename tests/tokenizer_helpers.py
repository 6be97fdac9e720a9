"""Byte-level BPE tokenizers trained here, offline, on a few strings, and
GPT-2's byte-to-character map that such tokenizers are built on."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast


def byte_level_chars() -> list[str]:
    """GPT-2's printable stand-in for each of the 256 bytes, by byte value:
    a printable byte stands for itself, the others for the characters from
    U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    unprintable = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(unprintable)}
    return [chars[b] for b in range(256)]


def train_byte_level_bpe(
    corpus: list[str], vocab_size: int, special_tokens: list[str]
) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``corpus``, every byte in its vocabulary;
    the first special token is EOS."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=special_tokens[0], clean_up_tokenization_spaces=False
    )
