"""Greedy decoding on our model's KV cache as serving runs it: the prompt
prefilled in one forward, then one forward per new token. Tests compare it
with Hugging Face's greedy ``generate()`` on the same weights."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from specray.actors.model.batch import ForwardBatch, SequenceInput
from specray.actors.model.decoder import DecoderModel


@dataclass(frozen=True)
class CachedGreedy:
    prompt_logits: torch.Tensor  # [prompt_rows, vocab]: the prefill's last rows
    tokens: list[int]


def cached_greedy(
    model: DecoderModel,
    prompt: Sequence[int],
    max_tokens: int,
    max_len: int,
    prompt_rows: int = 1,
) -> CachedGreedy:
    """``max_tokens`` greedy tokens after ``prompt`` in a one-slot cache of
    ``max_len`` positions, and the prefill's logits of the prompt's last
    ``prompt_rows`` positions."""
    cache = model.new_cache(1, max_len)
    slot = cache.allocate()
    prefill = model(ForwardBatch.build([SequenceInput(slot, prompt, 0, prompt_rows)]), cache)
    tokens = [int(prefill.logits[-1].argmax())]
    while len(tokens) < max_tokens:
        fed = SequenceInput(slot, tokens[-1:], cache.length(slot))
        tokens.append(int(model(ForwardBatch.build([fed]), cache).logits[-1].argmax()))
    return CachedGreedy(prefill.logits, tokens)
