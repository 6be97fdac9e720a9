"""Build a :class:`DecoderModel` from a checkpoint directory."""

from __future__ import annotations

from pathlib import Path

import torch

from specray.actors.model.config import ModelConfig
from specray.actors.model.decoder import DecoderModel
from specray.actors.parallel.group import SingleGroup, TPGroup
from specray.actors.parallel.weights import WeightSource

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}") from None


def load_model(
    model_dir: str | Path,
    dtype: str | torch.dtype = torch.float32,
    group: TPGroup | None = None,
) -> DecoderModel:
    """Load safetensors from ``model_dir``; with a TP group, only this rank's
    slices are read."""
    config = ModelConfig.from_pretrained(model_dir)
    model = DecoderModel(config, parse_dtype(dtype), group or SingleGroup())
    with WeightSource(model_dir, config.weight_aliases) as source:
        model.load(source)
    return model.eval()
