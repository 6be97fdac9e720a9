"""The head's architecture, written next to its weights as ``config.json``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from specray.actors.drafting.drafter_config import (
    CONFIG_NAME,
    SizeCheck,
    check_fits_target,
    config_path,
)
from specray.actors.drafting.target_layers import layers_out_of_range
from specray.actors.model.config import ModelConfig

WEIGHTS_NAME = "head.safetensors"
FORMAT = "specray-draft-head-v1"


def default_hidden_layers(num_layers: int) -> tuple[int, ...]:
    """Low, middle and top decoder layers whose outputs the head reads.

    EAGLE-3 fuses an early, a middle and a late layer: the early one still
    carries the token identities, the late one the next-token prediction.
    We take the very last layer as the late one, since the head's own
    output stands in for it when it chains (both then sit just before the
    final norm and LM head).
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    picks = (min(2, num_layers - 1), num_layers // 2, num_layers - 1)
    return tuple(sorted(set(picks)))


@dataclass(frozen=True)
class HeadConfig:
    """Shapes of a draft head and what it was trained against."""

    target: str  # the target's registered name or directory, to load its frozen parts
    target_vocab_size: int
    target_num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    hidden_layers: tuple[int, ...]
    draft_vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    attention_bias: bool
    hidden_act: str = "silu"
    embed_scale: float | None = None  # Gemma scales embeddings by sqrt(hidden)
    format: str = FORMAT

    def __post_init__(self) -> None:
        bad = layers_out_of_range("hidden_layers", self.hidden_layers, self.target_num_layers)
        if bad:
            raise ValueError(
                f"hidden_layers {bad} out of range for a {self.target_num_layers}-layer target"
            )
        if not 1 <= self.draft_vocab_size <= self.target_vocab_size:
            raise ValueError(
                f"draft_vocab_size must be in [1, {self.target_vocab_size}], "
                f"got {self.draft_vocab_size}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} not a multiple of {self.num_kv_heads}")

    @property
    def fused_size(self) -> int:
        """Width of the concatenated target hidden states the head reads."""
        return len(self.hidden_layers) * self.hidden_size

    @classmethod
    def for_target(
        cls,
        target: str,
        config: ModelConfig,
        draft_vocab_size: int,
        hidden_layers: tuple[int, ...] | None = None,
        intermediate_size: int | None = None,
    ) -> HeadConfig:
        """A head shaped like one layer of ``config`` (so it can start from one)."""
        return cls(
            target=target,
            target_vocab_size=config.vocab_size,
            target_num_layers=config.num_layers,
            hidden_size=config.hidden_size,
            num_heads=config.num_heads,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            intermediate_size=intermediate_size or config.intermediate_size,
            hidden_layers=hidden_layers or default_hidden_layers(config.num_layers),
            draft_vocab_size=draft_vocab_size,
            rms_norm_eps=config.rms_norm_eps,
            rope_theta=config.rope_full.theta,
            attention_bias=config.attention_bias,
            hidden_act=config.hidden_act,
            embed_scale=config.hidden_size**0.5 if config.gemma_norms else None,
        )

    def check_target(self, config: ModelConfig) -> None:
        """Raise if ``config`` is not the kind of target this head was trained on."""
        check_fits_target(
            "draft head",
            (
                SizeCheck("vocab_size", self.target_vocab_size, config.vocab_size),
                SizeCheck("num_layers", self.target_num_layers, config.num_layers),
                SizeCheck("hidden_size", self.hidden_size, config.hidden_size),
            ),
        )

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, directory: Path) -> HeadConfig:
        path = config_path(directory, "draft-head")
        raw: dict[str, Any] = json.loads(path.read_text())
        if raw.get("format") != FORMAT:
            raise ValueError(f"{path}: format {raw.get('format')!r} is not {FORMAT!r}")
        known = {f.name for f in fields(cls)}
        raw = {k: v for k, v in raw.items() if k in known}
        raw["hidden_layers"] = tuple(raw["hidden_layers"])
        return cls(**raw)
