"""Model configuration read from a Hugging Face ``config.json``.

One dataclass describes every supported family (Llama, Qwen2, Qwen3,
Gemma 3, DeepSeek-V4); the family only switches flags and per-layer block
kinds. There is no copy of the model per family.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from specray.actors.model.v4.params import (
    CompressedAttentionConfig,
    HyperConnectionConfig,
    MoEConfig,
)

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "gemma3_text", "gemma3", "deepseek_v4")


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or one of its options is not implemented."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one attention kind (full or sliding)."""

    theta: float
    rope_type: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_dict(cls, params: dict[str, Any], theta: float) -> RopeConfig:
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise UnsupportedModelError(f"rope_type {rope_type!r} is not supported")
        return cls(
            theta=float(params.get("rope_theta", theta)),
            rope_type=rope_type,
            factor=float(params.get("factor", 1.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                params.get("original_max_position_embeddings", 8192)
            ),
        )


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q/k/v (Qwen2)
    qk_norm: bool  # RMSNorm on each head of q and k (Qwen3, Gemma 3)
    hidden_act: str  # silu | gelu_pytorch_tanh
    attention_scale: float  # multiplies q·k
    rope_full: RopeConfig
    rope_sliding: RopeConfig | None = None
    # Per layer: None for full attention, else the window in tokens. A key at
    # position j is visible from query position i iff i - window < j <= i.
    sliding_windows: tuple[int | None, ...] = field(default=())
    # Gemma 3: RMSNorm scales by (1 + w), embeddings are scaled by
    # sqrt(hidden), and each block has post-attention / post-MLP norms.
    gemma_norms: bool = False
    final_logit_softcapping: float | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    # DeepSeek-V4 blocks (see specray.actors.model.v4). Per layer, the
    # attention type (params.ATTENTION_TYPES) and MLP type (params.MLP_TYPES);
    # empty: dense attention and a gated MLP in every layer.
    attention_types: tuple[str, ...] = ()
    mlp_types: tuple[str, ...] = ()
    compressed_attention: CompressedAttentionConfig | None = None
    moe: MoEConfig | None = None
    # None: a plain residual; else hyper-connection residual streams.
    hyper_connections: HyperConnectionConfig | None = None
    # Norm weights kept in float32 and applied in float32 (V4), not in the
    # activation dtype.
    float32_norms: bool = False
    # Multi-token-prediction blocks in the checkpoint and their attention types.
    mtp_attention_types: tuple[str, ...] = ()
    # (name prefix the model asks for, prefix the checkpoint may use instead).
    weight_aliases: tuple[tuple[str, str], ...] = ()

    @property
    def verifies_trees(self) -> bool:
        """Whether the model may verify token trees. Dense attention can: a
        node sees its ancestors through the mask and its rotary position is
        its depth. DeepSeek-V4's compressors pool every ``rate`` consecutive
        cache positions into one entry, which a tree's sibling branches would
        share, so V4 verifies chains only."""
        return self.hyper_connections is None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ModelConfig:
        with open(Path(model_dir) / "config.json") as f:
            return cls.from_hf(json.load(f))

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        model_type = hf.get("model_type", "")
        if model_type == "gemma3":
            # Multimodal wrapper config: the decoder lives in text_config.
            hf = {**hf["text_config"], "eos_token_id": hf.get("eos_token_id")}
            model_type = "gemma3_text"
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}"
            )
        if model_type == "deepseek_v4":
            # Imported here: the V4 parser builds a ModelConfig itself.
            from specray.actors.model.v4.hf_config import deepseek_v4_config

            return deepseek_v4_config(hf)
        gemma = model_type == "gemma3_text"
        hidden = int(hf["hidden_size"])
        num_heads = int(hf["num_attention_heads"])
        head_dim = int(hf.get("head_dim") or hidden // num_heads)
        num_layers = int(hf["num_hidden_layers"])
        if hf.get("attn_logit_softcapping") is not None:
            raise UnsupportedModelError("attn_logit_softcapping is not supported")

        rope_full, rope_sliding = _rope_configs(hf, gemma)
        windows: tuple[int | None, ...] = (None,) * num_layers
        layer_types = hf.get("layer_types")
        if layer_types and hf.get("sliding_window"):
            windows = tuple(
                int(hf["sliding_window"]) if kind == "sliding_attention" else None
                for kind in layer_types
            )
        if gemma:
            scale = float(hf.get("query_pre_attn_scalar", 256)) ** -0.5
        else:
            scale = 1.0 / math.sqrt(head_dim)
        act = hf.get("hidden_act") or hf.get("hidden_activation") or "silu"
        if act not in ("silu", "gelu_pytorch_tanh"):
            raise UnsupportedModelError(f"activation {act!r} is not supported")
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            model_type=model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
            attention_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            qk_norm=model_type in ("qwen3", "gemma3_text"),
            hidden_act=act,
            attention_scale=scale,
            rope_full=rope_full,
            rope_sliding=rope_sliding,
            sliding_windows=windows,
            gemma_norms=gemma,
            final_logit_softcapping=hf.get("final_logit_softcapping"),
            eos_token_ids=eos_ids,
            bos_token_id=hf.get("bos_token_id"),
        )


def _rope_configs(hf: dict[str, Any], gemma: bool) -> tuple[RopeConfig, RopeConfig | None]:
    """Read both the transformers 5 ``rope_parameters`` and the older layout."""
    params = hf.get("rope_parameters") or {}
    legacy_scaling = hf.get("rope_scaling") or {}
    if gemma:
        full = params.get("full_attention") or {**legacy_scaling}
        sliding = params.get("sliding_attention") or {}
        return (
            RopeConfig.from_dict(full, float(hf.get("rope_theta", 1_000_000.0))),
            RopeConfig.from_dict(sliding, float(hf.get("rope_local_base_freq", 10_000.0))),
        )
    merged = {**legacy_scaling, **params}
    return RopeConfig.from_dict(merged, float(hf.get("rope_theta", 10_000.0))), None
