"""A tiny byte-level BPE tokenizer with a chat template, trained on the spot
for the random checkpoints that tests, benchmarks and ``specray models``
write: real tokenization and chat formatting, without a download."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOKENIZER_VOCAB = 400


def save_chat_tokenizer(directory: Path, corpus: Sequence[str]) -> int:
    """Train on ``corpus`` (ids below :data:`TOKENIZER_VOCAB`), save to
    ``directory``; returns the EOS id."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        list(corpus) * 4, vocab_size=TOKENIZER_VOCAB, special_tokens=SPECIAL_TOKENS
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.save_pretrained(directory)
    eos = tokenizer.eos_token_id
    if not isinstance(eos, int):
        raise RuntimeError("the trained tokenizer has no EOS id")
    return eos
