"""Reference outputs that share no code with the speculative round: a plain
no-cache greedy loop over our model (every step runs the whole sequence
from scratch), and Hugging Face ``generate()``. "Greedy equals target-only"
tests compare against these, never against the engine at k = 0, which runs
the same round code as the speculation under test."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from specray.actors.model.batch import ForwardBatch, SequenceInput
from specray.actors.model.decoder import DecoderModel
from specray.actors.model.loader import load_model


def greedy_no_cache(model: DecoderModel, prompt: Sequence[int], max_tokens: int) -> list[int]:
    """Greedy continuation of ``prompt``: each token is the argmax of the
    last position of a from-scratch forward over everything so far."""
    tokens = list(prompt)
    for _ in range(max_tokens):
        cache = model.new_cache(1, len(tokens))
        slot = cache.allocate()
        out = model(ForwardBatch.build([SequenceInput(slot, tokens, 0)]), cache)
        tokens.append(int(out.logits[-1].argmax()))
    return tokens[len(prompt) :]


def greedy_reference(
    model_dir: Path, prompts: dict[str, Sequence[int]], max_tokens: dict[str, int] | int
) -> dict[str, list[int]]:
    """:func:`greedy_no_cache` of each prompt (fp32), ignoring EOS."""
    model = load_model(model_dir, torch.float32)
    counts = max_tokens if isinstance(max_tokens, dict) else dict.fromkeys(prompts, max_tokens)
    return {rid: greedy_no_cache(model, p, counts[rid]) for rid, p in prompts.items()}


def hf_greedy(
    model_dir: Path, prompts: Sequence[Sequence[int]], max_tokens: int
) -> list[list[int]]:
    """Hugging Face ``generate()`` greedy continuations (fp32), ignoring EOS."""
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([list(prompt)])
            out = hf.generate(ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=None)
            outputs.append(out[0, len(prompt) :].tolist())
    return outputs
