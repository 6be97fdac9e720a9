"""Model figures the planner needs, public where public and labelled where assumed.

DeepSeek publishes total and activated parameter counts and the context
length for V4 Pro and V4 Flash; their layer counts, widths, expert counts
and MLA dimensions were not public when this was written. The presets take
those from DeepSeek-V3 (whose config is public) and say so; a YAML file with
the same fields replaces any of them.

The split between routed experts and the always-active rest is derived, so
that the public totals hold exactly: with E routed experts, k per token and
M MoE layers, ``total − active = M·(E − k)·P`` gives one expert's
parameters P, and ``active − M·k·P`` is everything every token reads
(attention, shared experts, dense layers, embeddings).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

# Fields every preset takes from public figures; the rest are architecture.
PUBLIC_TOTALS = ("total_params", "active_params", "max_context")
_V3_ARCHITECTURE = dict(
    num_layers=61,
    first_dense_layers=3,
    hidden_size=7168,
    num_heads=128,
    q_lora_rank=1536,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    routed_experts=256,
    experts_per_token=8,
)


@dataclass(frozen=True)
class ModelSpec:
    """A DeepSeek-style MoE model with MLA attention, as the planner sees it."""

    name: str
    total_params: float
    active_params: float
    max_context: int
    num_layers: int
    first_dense_layers: int  # dense-FFN layers before the MoE layers
    hidden_size: int
    num_heads: int
    q_lora_rank: int  # 0: queries projected directly
    kv_lora_rank: int  # MLA's compressed KV latent, cached per token and layer
    qk_nope_head_dim: int
    qk_rope_head_dim: int  # the decoupled RoPE key, cached next to the latent
    v_head_dim: int
    routed_experts: int
    experts_per_token: int
    public: tuple[str, ...] = ()  # fields from public figures; the others are assumptions
    source: str = ""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("name", "public", "source", "q_lora_rank", "first_dense_layers"):
                continue
            if value <= 0:
                raise ValueError(f"model {self.name}: {f.name} must be > 0, got {value}")
        if self.active_params >= self.total_params:
            raise ValueError(
                f"model {self.name}: active_params ({self.active_params:g}) must be below "
                f"total_params ({self.total_params:g})"
            )
        if not 0 <= self.first_dense_layers < self.num_layers:
            raise ValueError(
                f"model {self.name}: first_dense_layers must be in [0, num_layers="
                f"{self.num_layers}), got {self.first_dense_layers}"
            )
        if self.experts_per_token >= self.routed_experts:
            raise ValueError(
                f"model {self.name}: experts_per_token ({self.experts_per_token}) must be below "
                f"routed_experts ({self.routed_experts})"
            )
        if self.other_dense_params < 0:
            raise ValueError(
                f"model {self.name}: with routed_experts={self.routed_experts} and "
                f"experts_per_token={self.experts_per_token}, the routed experts alone activate "
                f"{self.moe_layers * self.experts_per_token * self.expert_params / 1e9:.1f}B "
                f"parameters and attention {self.attention_params / 1e9:.1f}B, more than "
                f"active_params ({self.active_params / 1e9:.1f}B); use more experts per layer"
            )

    @property
    def moe_layers(self) -> int:
        return self.num_layers - self.first_dense_layers

    @property
    def attention_params_per_layer(self) -> float:
        """MLA's projections: q (through its LoRA), the KV latent and RoPE key, kv_b, o."""
        h, heads = self.hidden_size, self.num_heads
        qk_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        q = (
            h * self.q_lora_rank + self.q_lora_rank * heads * qk_dim
            if self.q_lora_rank
            else h * heads * qk_dim
        )
        kv_a = h * (self.kv_lora_rank + self.qk_rope_head_dim)
        kv_b = self.kv_lora_rank * heads * (self.qk_nope_head_dim + self.v_head_dim)
        o = heads * self.v_head_dim * h
        return float(q + kv_a + kv_b + o)

    @property
    def attention_params(self) -> float:
        return self.num_layers * self.attention_params_per_layer

    @property
    def expert_params(self) -> float:
        """One routed expert of one layer (derived from the public totals)."""
        idle = self.routed_experts - self.experts_per_token
        return (self.total_params - self.active_params) / (self.moe_layers * idle)

    @property
    def routed_params(self) -> float:
        return self.moe_layers * self.routed_experts * self.expert_params

    @property
    def always_active_params(self) -> float:
        """What every token reads: all but the routed experts."""
        return self.total_params - self.routed_params

    @property
    def other_dense_params(self) -> float:
        """Shared experts, dense FFN layers, embeddings, head, norms."""
        return self.always_active_params - self.attention_params

    def kv_bytes_per_token_layer(self, kv_bytes: float) -> float:
        """MLA caches the latent and the RoPE key, shared by every head."""
        return (self.kv_lora_rank + self.qk_rope_head_dim) * kv_bytes

    def kv_bytes_per_token(self, kv_bytes: float) -> float:
        return self.kv_bytes_per_token_layer(kv_bytes) * self.num_layers

    @property
    def assumed(self) -> tuple[str, ...]:
        """Fields not from public figures."""
        skip = {"name", "public", "source"}
        return tuple(f.name for f in fields(self) if f.name not in skip | set(self.public))


DEEPSEEK_V3 = ModelSpec(
    name="deepseek-v3",
    total_params=671e9,
    active_params=37e9,
    max_context=131072,
    public=(*PUBLIC_TOTALS, *_V3_ARCHITECTURE),
    source="DeepSeek-V3 technical report and config.json (all public)",
    **_V3_ARCHITECTURE,
)

# V4 Pro's public active share (49/1600 ≈ 3.1%) is far below V3's (37/671 ≈ 5.5%):
# with V3's 256 experts, 8 active, the routed experts alone would activate
# 50B > 49B. 384 experts (8 active) leaves a V3-sized always-active part (16B).
DEEPSEEK_V4_PRO = ModelSpec(
    name="deepseek-v4-pro",
    total_params=1.6e12,
    active_params=49e9,
    max_context=1 << 20,
    public=PUBLIC_TOTALS,
    source="public: 1.6T total, 49B activated, 1M context; architecture assumed V3-like",
    **{**_V3_ARCHITECTURE, "routed_experts": 384},
)

# Context length not stated for Flash: assumed the Pro's. Architecture: a
# V3-style layout narrowed to 4096 hidden, which with the public 284B / 13B
# gives experts of 26M parameters (3 × 4096 × ~2100), close to V3's shape.
DEEPSEEK_V4_FLASH = ModelSpec(
    name="deepseek-v4-flash",
    total_params=284e9,
    active_params=13e9,
    max_context=1 << 20,
    num_layers=43,
    first_dense_layers=1,
    hidden_size=4096,
    num_heads=64,
    q_lora_rank=1024,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    routed_experts=256,
    experts_per_token=8,
    public=("total_params", "active_params"),
    source="public: 284B total, 13B activated; context and architecture assumed",
)

PRESETS = {
    "v4-pro": DEEPSEEK_V4_PRO,
    "v4-flash": DEEPSEEK_V4_FLASH,
    "v3": DEEPSEEK_V3,
}


def load_model_spec(value: str) -> ModelSpec:
    """A preset name, or a YAML/JSON file of ModelSpec fields.

    A file may set ``base: v4-pro`` (a preset) and override any fields;
    every field it sets counts as given, not assumed.
    """
    if value in PRESETS:
        return PRESETS[value]
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"--model must be one of {sorted(PRESETS)} or a YAML file, got {value!r}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of model fields, got {type(data).__name__}")
    return spec_from_dict(data, str(path))


def spec_from_dict(data: dict[str, Any], where: str = "model") -> ModelSpec:
    known = {f.name for f in fields(ModelSpec)} - {"public", "source"}
    data = dict(data)
    base_name = data.pop("base", None)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown model fields {unknown}; known: {sorted(known)}")
    if base_name is not None and base_name not in PRESETS:
        raise ValueError(f"{where}: base must be one of {sorted(PRESETS)}, got {base_name!r}")
    base: dict[str, Any] = {}
    public: tuple[str, ...] = ()
    if base_name is not None:
        preset = PRESETS[base_name]
        base = {name: getattr(preset, name) for name in known}
        public = preset.public
    missing = sorted(known - set(base) - set(data))
    if missing:
        raise ValueError(f"{where}: missing model fields {missing} (or set `base: v4-pro`)")
    given = tuple(dict.fromkeys((*public, *(k for k in data if k != "name"))))
    return ModelSpec(**{**base, **data}, public=given, source=f"{where}")
