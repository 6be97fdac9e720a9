"""Model figures the planner needs, public where public and labelled where assumed.

DeepSeek-V4 specs are read from a ``config.json`` (transformers'
``DeepseekV4Config`` fields, :mod:`specray.cluster.planning.v4_spec`): their
parameters are counted and their cache is V4's design. V4 Flash is
transformers' own default config. V4 Pro's config was not found: its preset
is a V4 config whose architecture fields are assumed (named in ``assumed``)
so that the counts land near the public 1.6T total / 49B activated. DeepSeek-V3
is MLA, from its public config; a YAML file of fields replaces any of them.

The split between routed experts and the always-active rest is derived, so
that the public totals hold exactly: with E routed experts, k per token and
M MoE layers, ``total − active = M·(E − k)·P`` gives one expert's
parameters P, and ``active − M·k·P`` is everything every token reads
(attention, shared experts, dense layers, embeddings).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from dataclasses import replace as dataclass_replace
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from specray.cluster.planning.v4_spec import CSA, HCA, V4Cache, count_parameters, load_v4_config

# Fields every preset takes from public figures; the rest are architecture.
PUBLIC_TOTALS = ("total_params", "active_params", "max_context")
MLA_FIELDS = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
_V3_ARCHITECTURE: dict[str, int] = dict(
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
    """A DeepSeek-style MoE model, as the planner sees it: MLA attention
    (V3) from its dimensions, or V4 with its attention counted and its
    cache (``cache``) from the config; V4 leaves the MLA fields 0."""

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
    counted_attention_params: float = 0.0  # V4: every layer's attention, counted
    cache: V4Cache | None = None  # V4's cache design; None: MLA's latent

    def __post_init__(self) -> None:
        optional = {"name", "public", "source", "q_lora_rank", "first_dense_layers"}
        optional |= {"counted_attention_params", "cache"}
        if self.cache is not None:
            optional |= set(MLA_FIELDS)
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in optional:
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
        """V4: counted, averaged over layers. MLA's projections: q (through
        its LoRA), the KV latent and RoPE key, kv_b, o."""
        if self.cache is not None:
            return self.counted_attention_params / self.num_layers
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
        """One context token's cache in an average layer. MLA caches the
        latent and the RoPE key, shared by every head; V4 its compressed
        entries and indexer keys (:class:`V4Cache`)."""
        if self.cache is not None:
            return self.cache.per_token / self.num_layers * kv_bytes
        return (self.kv_lora_rank + self.qk_rope_head_dim) * kv_bytes

    def request_cache_bytes(self, kv_bytes: float) -> float:
        """A request's cache whatever its context (V4's sliding windows and
        unclosed compressor rows, every layer); 0 for MLA."""
        return 0.0 if self.cache is None else self.cache.per_request * kv_bytes

    def kv_bytes_per_token(self, kv_bytes: float) -> float:
        return self.kv_bytes_per_token_layer(kv_bytes) * self.num_layers

    @property
    def assumed(self) -> tuple[str, ...]:
        """Fields not from public figures."""
        skip = {"name", "public", "source", "counted_attention_params", "cache"}
        if self.cache is not None:
            skip |= set(MLA_FIELDS)
        return tuple(f.name for f in fields(self) if f.name not in skip | set(self.public))


DEEPSEEK_V3 = ModelSpec(
    name="deepseek-v3",
    total_params=671e9,
    active_params=37e9,
    max_context=131072,
    public=(*PUBLIC_TOTALS, *_V3_ARCHITECTURE),
    source="DeepSeek-V3 technical report and config.json (all public)",
    **_V3_ARCHITECTURE,  # type: ignore[arg-type]  # every value an int field
)

# V4 Pro's config.json was not found: a V4 config with V3's width, depth, heads
# and query rank, 384 experts of 3072 (6 per token), counts 1573B total and
# 49.8B activated (public: 1.6T, 49B). Every architecture field is assumed.
V4_PRO_ASSUMED: dict[str, Any] = dict(
    hidden_size=_V3_ARCHITECTURE["hidden_size"],
    num_hidden_layers=_V3_ARCHITECTURE["num_layers"],
    num_attention_heads=_V3_ARCHITECTURE["num_heads"],
    q_lora_rank=_V3_ARCHITECTURE["q_lora_rank"],
    o_groups=16,
    n_routed_experts=384,
    moe_intermediate_size=3072,
    num_experts_per_tok=6,
)


def v4_flash() -> ModelSpec:
    """transformers' ``DeepseekV4Config()`` defaults, which are V4 Flash."""
    from transformers import DeepseekV4Config

    return spec_from_v4_config(DeepseekV4Config(), "deepseek-v4-flash", public=True)


def v4_pro() -> ModelSpec:
    from transformers import DeepseekV4Config

    n = V4_PRO_ASSUMED["num_hidden_layers"]
    config = DeepseekV4Config(
        **V4_PRO_ASSUMED,
        layer_types=[HCA if i % 2 == 0 else CSA for i in range(n)],
        mlp_layer_types=["hash_moe"] * 3 + ["moe"] * (n - 3),
    )
    spec = spec_from_v4_config(config, "deepseek-v4-pro", public=False)
    source = "V4 config, architecture assumed (Pro's config.json not found); parameters counted"
    return dataclass_replace(spec, source=source)


def spec_from_v4_config(config: Any, name: str, public: bool) -> ModelSpec:
    """A V4 spec counted from ``config``; ``public``: every field is the config's."""
    counts = count_parameters(config)
    experts, k = config.n_routed_experts, config.num_experts_per_tok
    spec = ModelSpec(
        name=name,
        total_params=counts.total,
        active_params=counts.total - counts.routed * (experts - k) / experts,
        max_context=config.max_position_embeddings,
        num_layers=config.num_hidden_layers,
        first_dense_layers=0,  # every V4 layer is MoE (hash-routed or learned)
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        q_lora_rank=config.q_lora_rank,
        **dict.fromkeys(MLA_FIELDS, 0),  # type: ignore[arg-type]  # V4 is not MLA
        routed_experts=experts,
        experts_per_token=k,
        source="config.json (DeepseekV4Config fields), parameters counted",
        counted_attention_params=counts.attention,
        cache=V4Cache.from_config(config),
    )
    given = tuple(f.name for f in fields(ModelSpec)) if public else PUBLIC_TOTALS
    return dataclass_replace(spec, public=given)


PRESETS: dict[str, Callable[[], ModelSpec]] = {
    "v4-pro": v4_pro,
    "v4-flash": v4_flash,
    "v3": lambda: DEEPSEEK_V3,
}


@cache
def preset(name: str) -> ModelSpec:
    return PRESETS[name]()


def load_model_spec(value: str) -> ModelSpec:
    """A preset name, or a YAML/JSON file of ModelSpec fields.

    A file may set ``base: v4-pro`` (a preset) and override any fields;
    every field it sets counts as given, not assumed. A V4 ``config.json``
    (or a checkpoint directory holding one) is read as V4.
    """
    if value in PRESETS:
        return preset(value)
    path = Path(value)
    if path.is_dir() or path.suffix == ".json":
        config = load_v4_config(path)
        named = path if path.is_dir() or path.name != "config.json" else path.parent
        name = named.stem or "deepseek-v4"
        return spec_from_v4_config(config, name, public=True)
    if not path.is_file():
        raise ValueError(
            f"--model must be one of {sorted(PRESETS)}, a V4 config.json or a YAML file, "
            f"got {value!r}"
        )
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of model fields, got {type(data).__name__}")
    return spec_from_dict(data, str(path))


def spec_from_dict(data: dict[str, Any], where: str = "model") -> ModelSpec:
    known = {f.name for f in fields(ModelSpec)} - {"public", "source", "cache"}
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
        base_spec = preset(base_name)
        base = {name: getattr(base_spec, name) for name in known}
        public = base_spec.public
    missing = sorted(known - set(base) - set(data))
    if missing:
        raise ValueError(f"{where}: missing model fields {missing} (or set `base: v4-pro`)")
    given = tuple(dict.fromkeys((*public, *(k for k in data if k != "name"))))
    cache_design = preset(base_name).cache if base_name is not None else None
    return ModelSpec(**{**base, **data}, public=given, source=f"{where}", cache=cache_design)
