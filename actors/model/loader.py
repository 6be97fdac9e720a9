"""Build a :class:`DecoderModel` from a checkpoint directory."""

from __future__ import annotations

from pathlib import Path

import torch

from specray.actors.model.config import ModelConfig
from specray.actors.model.decoder import DecoderModel
from specray.actors.model.gguf_source import GGUFWeightSource
from specray.actors.parallel.block_kernel import block_kernel_reason
from specray.actors.parallel.expert import ExpertShard
from specray.actors.parallel.group import SingleGroup, TPGroup
from specray.actors.parallel.int8_kernels import choose_int8_kernels
from specray.actors.parallel.row_kernels import choose_row_kernels
from specray.actors.parallel.weights import WeightSource

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Where the weights come from: the safetensors in the model dtype ("dense"),
# or the GGUF file's quantized blocks run by low-bit kernels ("gguf").
WEIGHT_SOURCES = ("dense", "gguf")


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}") from None


def find_gguf(model_dir: str | Path) -> Path:
    """The one GGUF file in ``model_dir``."""
    found = sorted(Path(model_dir).glob("*.gguf"))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise FileNotFoundError(
            f"{model_dir} holds {what} .gguf files; low-bit loading needs exactly one "
            "(the store keeps it beside the converted weights: specray.actors.store.fetch_gguf)"
        )
    return found[0]


def load_model(
    model_dir: str | Path,
    dtype: str | torch.dtype = torch.float32,
    group: TPGroup | None = None,
    experts: ExpertShard | None = None,
    weights: str = "dense",
) -> DecoderModel:
    """Load ``model_dir``; with a TP group (and an expert shard), only this
    rank's slices (and experts) are read.

    ``weights="gguf"`` reads the directory's GGUF file instead of its
    safetensors: 4-bit blocks run as int4, wider ones as per-channel int8
    (see :func:`~specray.actors.parallel.linear_weights.linear_weights_from`),
    with activations, scales and dense tensors in ``dtype``.
    """
    if weights not in WEIGHT_SOURCES:
        raise ValueError(f"weights must be one of {WEIGHT_SOURCES}, got {weights!r}")
    config = ModelConfig.from_pretrained(model_dir)
    model = DecoderModel(config, parse_dtype(dtype), group or SingleGroup(), experts)
    source = (
        GGUFWeightSource(find_gguf(model_dir), config)
        if weights == "gguf"
        else WeightSource(model_dir, config.weight_aliases)
    )
    with source:
        model.load(source)
    if torch.get_default_device().type == "cpu":  # a GPU shard sets its device as default
        # Every CPU forward runs the compiled kernels (attention rows, norms,
        # rotary, cache rows): build them now, within the start-up deadline,
        # not in the first forward, which a verify deadline bounds (a build
        # takes about a minute of one core).
        block_kernel_reason()
    choose_row_kernels(model)
    choose_int8_kernels(model)
    return model.eval()
