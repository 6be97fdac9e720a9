"""A new, untrained DSpark drafter for a target (to train, or to test with).

The drafter's layers take the target's shapes (as DeepSpec's draft config
is a copy of the target's); its embedding and LM head are copies of the
target's and stay frozen; everything else starts as DeepSpec's models do
after ``post_init``: weights ~ N(0, init_std), biases 0, norms neutral.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from specray.actors.drafting.dspark.config import (
    DSparkConfig,
    default_target_layers,
    dspark_hf_config,
)
from specray.actors.drafting.dspark.model import DSparkModel
from specray.actors.model.config import ModelConfig, UnsupportedModelError
from specray.actors.parallel.weights import WeightSource

FROZEN = ("embed_tokens.", "lm_head.")


def default_mask_token(vocab_size: int, tokenizer_size: int | None) -> int:
    """The first id past the tokenizer's tokens (an embedding row the target
    never reads), as DeepSpec picks 151669 for Qwen3; else the last id."""
    if tokenizer_size is not None and tokenizer_size < vocab_size:
        return tokenizer_size
    return vocab_size - 1


def fresh_dspark(
    target_dir: str | Path,
    *,
    num_layers: int = 1,
    block_size: int = 5,
    target_layer_ids: tuple[int, ...] | None = None,
    markov_rank: int = 256,
    confidence_head: bool = True,
    mask_token_id: int | None = None,
    init_std: float = 0.02,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[DSparkModel, dict[str, Any]]:
    """The model and its DeepSpec ``config.json`` contents."""
    target_dir = Path(target_dir)
    target_hf = json.loads((target_dir / "config.json").read_text())
    target = ModelConfig.from_hf(target_hf)
    if target.hyper_connections is not None:
        # Its drafter is saved into the target's own checkpoint (mtp.*), a
        # layout our saver does not write; serving one works (v4_block.py).
        raise UnsupportedModelError(
            "training a DSpark drafter for a DeepSeek-V4 target is not supported; "
            "serve one stored under mtp.* with --draft dspark:DIR"
        )
    layers = target_layer_ids or default_target_layers(target.num_layers)
    hf = dspark_hf_config(
        target_hf,
        num_layers=num_layers,
        block_size=block_size,
        mask_token_id=default_mask_token(target.vocab_size, None)
        if mask_token_id is None
        else mask_token_id,
        target_layer_ids=layers,
        markov_rank=markov_rank,
        confidence_head=confidence_head,
    )
    model = DSparkModel(DSparkConfig.from_hf(hf), dtype)
    init_weights(model, init_std, seed)
    with WeightSource(target_dir) as source:
        model.embed_tokens.load(source, "model.embed_tokens.weight")
        tied = "lm_head.weight" not in source
        model.lm_head.load(source, "model.embed_tokens.weight" if tied else "lm_head.weight")
    return model, hf


def init_weights(model: DSparkModel, std: float, seed: int) -> None:
    """Matrices ~ N(0, std), biases 0, norms 1 (Gemma's ``1 + w`` norms: 0)."""
    gen = torch.Generator().manual_seed(seed)
    gemma = model.config.decoder.gemma_norms
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(FROZEN):
                continue
            if "norm" in name:
                param.fill_(0.0 if gemma else 1.0)
            elif param.dim() == 1:
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def trainable_parameters(model: DSparkModel) -> list[torch.nn.Parameter]:
    """Everything but the frozen embedding and LM head, switched to train."""
    params = []
    for name, param in model.named_parameters():
        train = not name.startswith(FROZEN)
        param.requires_grad_(train)
        if train:
            params.append(param)
    return params
