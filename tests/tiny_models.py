"""Tiny random-weight checkpoints of each supported family, saved the way
Hugging Face saves real ones, so tests exercise the real loading path."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from specray.actors.store.random_qwen2 import TINY_QWEN2

VOCAB = 160


def family_configs() -> dict[str, PretrainedConfig]:
    # The store's tiny Qwen2 widths, in every family.
    common = TINY_QWEN2 | dict(
        vocab_size=VOCAB,
        num_hidden_layers=3,
        max_position_embeddings=512,
        eos_token_id=1,
        bos_token_id=2,
    )
    return {
        "llama": LlamaConfig(**common, tie_word_embeddings=True, rope_theta=10000.0),
        "qwen2": Qwen2Config(**common, tie_word_embeddings=False),
        "qwen3": Qwen3Config(**common, head_dim=16, tie_word_embeddings=False),
        "gemma3": Gemma3TextConfig(
            **{**common, "num_key_value_heads": 1, "num_hidden_layers": 4},
            head_dim=16,
            query_pre_attn_scalar=16,
            # A short window so tests cross it, and a mix of layer kinds.
            sliding_window=5,
            layer_types=[
                "sliding_attention",
                "full_attention",
                "sliding_attention",
                "full_attention",
            ],
        ),
    }


def repeating_prompts(seed: int, lengths: Iterable[int], vocab: int) -> list[list[int]]:
    """Random prompts of ids from 3 up (past the special ones), one of each
    of ``lengths`` plus a repeat of its first four tokens, so n-gram lookup
    finds matches."""
    gen = torch.Generator().manual_seed(seed)
    prompts = []
    for length in lengths:
        body = torch.randint(3, vocab, (length,), generator=gen).tolist()
        prompts.append(body + body[:4])
    return prompts


def save_tiny_model(family: str, directory: Path, seed: int = 0) -> Path:
    """Save a random-weight model of ``family`` to ``directory``."""
    torch.manual_seed(seed)
    config = family_configs()[family]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init leaves norms at 1 (or 0 for Gemma); perturb them so the
    # tests notice a norm applied the wrong way.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(directory)
    return directory
