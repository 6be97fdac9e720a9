"""A random-weight dense checkpoint (Qwen2), tiny unless told otherwise, for
the benchmarks and tests whose subject is the machinery around a model:
serving, restarts, liveness. Saved by transformers, so it loads the way a
real one does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

# Small enough that loading and running it are all overhead; fewer KV heads
# than query heads, so grouped-query attention is on the path.
TINY_QWEN2: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def write_random_qwen2(directory: Path, seed: int = 0, **overrides: Any) -> Path:
    """Save a float32 Qwen2 with weights drawn from ``seed`` to ``directory``;
    ``overrides`` replace :data:`TINY_QWEN2`'s or any other config field."""
    config = Qwen2Config(**(TINY_QWEN2 | overrides))
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(directory)
    return directory
