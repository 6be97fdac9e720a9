"""A DSpark drafter's architecture, read from DeepSpec's ``config.json``.

DeepSpec writes a drafter's config as a copy of its target's Hugging Face
config with the draft's own fields set: ``num_hidden_layers`` is the draft's
depth, and ``block_size``, ``mask_token_id``, ``target_layer_ids``,
``markov_rank``, ``markov_head_type``, ``enable_confidence_head`` and
``confidence_head_with_markov`` describe the method. The decoder shapes
therefore read through the same :class:`ModelConfig` as any target.

A DeepSeek-V4 checkpoint carries its drafter under ``mtp.*`` beside the
target, so its ``config.json`` is the target's with the same DSpark fields
added: the draft's depth is ``num_nextn_predict_layers`` (the target keeps
``num_hidden_layers``), every draft layer is a sliding-window layer with
routed experts, and each injected layer is its ``n`` residual streams, so
the features are ``n`` times as wide.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specray.actors.drafting.drafter_config import SizeCheck, check_fits_target, config_path
from specray.actors.drafting.target_layers import layers_out_of_range
from specray.actors.model.config import ModelConfig, UnsupportedModelError
from specray.actors.model.v4.params import MOE, SLIDING

MARKOV_HEAD_TYPES = ("vanilla",)


@dataclass(frozen=True)
class DSparkConfig:
    """Shapes of a DSpark drafter and what it reads from its target."""

    decoder: ModelConfig  # the draft layers' shapes; num_layers is the draft's depth
    block_size: int  # γ: draft tokens per forward (the anchor plus γ - 1 mask tokens)
    mask_token_id: int
    target_layer_ids: tuple[int, ...]  # target decoder layers whose outputs are injected
    num_target_layers: int
    markov_rank: int  # 0: no Markov head (a pure parallel drafter)
    confidence_head: bool
    confidence_with_markov: bool  # the confidence head also reads the Markov embedding

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        bad = layers_out_of_range("target_layer_ids", self.target_layer_ids, self.num_target_layers)
        if bad:
            # DeepSpec allows -1 (the target's embedding output); our targets
            # ship decoder-layer outputs only.
            raise UnsupportedModelError(
                f"target_layer_ids {bad} outside [0, {self.num_target_layers})"
            )
        if not 0 <= self.mask_token_id < self.decoder.vocab_size:
            raise ValueError(f"mask_token_id {self.mask_token_id} outside the vocabulary")
        if self.confidence_with_markov and not (self.confidence_head and self.markov_rank):
            raise ValueError("confidence_with_markov needs a confidence head and a Markov head")

    @property
    def fused_size(self) -> int:
        """Width of the concatenated target hidden states the drafter reads
        (a V4 layer's output is its residual streams, flattened)."""
        hyper = self.decoder.hyper_connections
        streams = hyper.streams if hyper is not None else 1
        return len(self.target_layer_ids) * streams * self.decoder.hidden_size

    @property
    def sliding_window(self) -> int | None:
        """The draft layers' attention window (V4's), None for full attention."""
        attention = self.decoder.compressed_attention
        return attention.sliding_window if attention is not None else None

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> DSparkConfig:
        missing = [k for k in ("block_size", "mask_token_id", "target_layer_ids") if k not in hf]
        if missing:
            raise ValueError(f"not a DSpark config: no {', '.join(missing)}")
        markov_rank = int(hf.get("markov_rank", 0))
        head_type = str(hf.get("markov_head_type", "vanilla")).lower()
        if markov_rank and head_type not in MARKOV_HEAD_TYPES:
            raise UnsupportedModelError(
                f"markov_head_type {head_type!r} is not supported; supported: {MARKOV_HEAD_TYPES}"
            )
        confidence = bool(hf.get("enable_confidence_head", False))
        decoder = ModelConfig.from_hf(hf)
        num_target_layers = int(hf.get("num_target_layers", max(hf["target_layer_ids"]) + 1))
        if decoder.hyper_connections is not None:
            decoder, num_target_layers = _v4_drafter(decoder, hf), decoder.num_layers
        elif any(window is not None for window in decoder.sliding_windows):
            raise UnsupportedModelError("sliding-window draft layers are not supported")
        return cls(
            decoder=decoder,
            block_size=int(hf["block_size"]),
            mask_token_id=int(hf["mask_token_id"]),
            target_layer_ids=tuple(int(i) for i in hf["target_layer_ids"]),
            num_target_layers=num_target_layers,
            markov_rank=markov_rank,
            confidence_head=confidence,
            confidence_with_markov=confidence and bool(hf.get("confidence_head_with_markov")),
        )

    @classmethod
    def load(cls, directory: str | Path) -> DSparkConfig:
        path = config_path(directory, "DSpark checkpoint")
        return cls.from_hf(json.loads(path.read_text()))

    def check_target(self, target: ModelConfig) -> None:
        """Raise if ``target`` is not the kind of model this drafter was trained for."""
        check_fits_target(
            "DSpark drafter",
            (
                SizeCheck("vocab_size", self.decoder.vocab_size, target.vocab_size),
                SizeCheck("num_target_layers", self.num_target_layers, target.num_layers),
                SizeCheck("hidden_size", self.decoder.hidden_size, target.hidden_size),
            ),
        )


def _v4_drafter(target: ModelConfig, hf: dict[str, Any]) -> ModelConfig:
    """A V4 target's decoder shapes cut to its drafter's ``mtp`` layers."""
    depth = int(hf.get("num_nextn_predict_layers", 1))
    assert target.compressed_attention is not None
    return dataclasses.replace(
        target,
        num_layers=depth,
        attention_types=(SLIDING,) * depth,
        mlp_types=(MOE,) * depth,
        sliding_windows=(target.compressed_attention.sliding_window,) * depth,
        mtp_attention_types=(),
    )


def dspark_hf_config(
    target_hf: dict[str, Any],
    *,
    num_layers: int,
    block_size: int,
    mask_token_id: int,
    target_layer_ids: tuple[int, ...],
    markov_rank: int = 256,
    confidence_head: bool = True,
    num_anchors: int = 512,
) -> dict[str, Any]:
    """DeepSpec's draft config for a target: its config with the draft's fields.

    What DeepSpec's ``build_draft_config`` writes, so a drafter we train loads
    in DeepSpec (and in servers that read its format) as one of its own.
    """
    hf = dict(target_hf)
    if hf.get("model_type") == "gemma3" and "text_config" in hf:
        hf = {**hf["text_config"], "eos_token_id": hf.get("eos_token_id")}
    family = str(hf.get("model_type", "")).capitalize()
    hf.update(
        architectures=[f"{family}DSparkModel"],
        num_target_layers=int(hf["num_hidden_layers"]),
        num_hidden_layers=num_layers,
        block_size=block_size,
        tie_word_embeddings=False,
        layer_types=["full_attention"] * num_layers,
        mask_token_id=mask_token_id,
        target_layer_ids=list(target_layer_ids),
        num_anchors=num_anchors,
        enable_confidence_head=confidence_head,
        markov_rank=markov_rank,
    )
    hf.pop("sliding_window_pattern", None)
    if confidence_head:
        hf["confidence_head_with_markov"] = markov_rank > 0
    if markov_rank:
        hf["markov_head_type"] = "vanilla"
    return hf


def default_target_layers(num_layers: int, count: int = 5) -> tuple[int, ...]:
    """``count`` target layers spread from the second to the third-from-last,
    as DeepSpec's configs pick them (``[1, 9, 17, 25, 33]`` of Qwen3-4B's 36).
    The last layers are left out: the draft's own output stands in for them."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    first, last = min(1, num_layers - 1), max(min(1, num_layers - 1), num_layers - 3)
    if count <= 1 or first == last:
        return (first,)
    step = (last - first) / (count - 1)
    return tuple(sorted({round(first + i * step) for i in range(count)}))
