"""Read a DeepSeek-V4 ``config.json`` into :class:`ModelConfig`.

Accepts what transformers' ``DeepseekV4Config.save_pretrained`` writes and
the legacy keys DeepSeek's own releases carry (``compress_ratios``,
``compress_rate_csa`` / ``compress_rate_hca``, ``num_hash_layers``,
``qk_rope_head_dim``, a flat ``rope_scaling``), with transformers' defaults
(the V4-Flash architecture) for anything missing.
"""

from __future__ import annotations

from typing import Any

from specray.actors.model.config import ModelConfig, RopeConfig, UnsupportedModelError
from specray.actors.model.v4.params import (
    ATTENTION_TYPES,
    CSA,
    HASH_MOE,
    HCA,
    MLP_TYPES,
    MOE,
    SLIDING,
    CompressedAttentionConfig,
    HyperConnectionConfig,
    MoEConfig,
    PartialRope,
    YarnParams,
)

# Legacy per-layer compression ratios (0: no compressor).
_RATIO_TO_TYPE = {0: SLIDING, 4: CSA, 128: HCA}

# The model asks for transformers' top-level names; DeepSeek's releases use
# shorter ones. Names inside a layer are DeepSeek's in both.
WEIGHT_ALIASES = (
    ("model.embed_tokens.weight", "embed.weight"),
    ("lm_head.weight", "head.weight"),
    ("model.norm.weight", "norm.weight"),
    ("model.hc_head.hc_", "hc_head_"),
    ("model.layers.", "layers."),
)


def deepseek_v4_config(hf: dict[str, Any]) -> ModelConfig:
    num_layers = int(hf.get("num_hidden_layers", 43))
    hidden = int(hf.get("hidden_size", 4096))
    head_dim = int(hf.get("head_dim", 512))
    if int(hf.get("num_key_value_heads", 1)) != 1:
        raise UnsupportedModelError("DeepSeek-V4 attention shares one KV head")
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"activation {hf['hidden_act']!r} is not supported")
    quant = hf.get("quantization_config") or {}
    fp4_experts = quant.get("expert_dtype") or hf.get("expert_dtype")
    if (quant and quant.get("quant_method") != "fp8") or fp4_experts:
        raise UnsupportedModelError(
            f"quantization {quant!r} is not supported; block-scaled FP8 is (no FP4 experts)"
        )

    rates = {CSA: 4, HCA: 128, **(hf.get("compress_rates") or {})}
    if hf.get("compress_rate_csa") is not None:
        rates[CSA] = int(hf["compress_rate_csa"])
    if hf.get("compress_rate_hca") is not None:
        rates[HCA] = int(hf["compress_rate_hca"])
    num_mtp = int(hf.get("num_nextn_predict_layers", 1))
    layer_types, mtp_types = _attention_types(hf, num_layers, num_mtp)
    mlp_types = hf.get("mlp_layer_types")
    if mlp_types is None:
        num_hash = int(hf.get("num_hash_layers", 3))
        mlp_types = [HASH_MOE] * min(num_layers, num_hash) + [MOE] * max(0, num_layers - num_hash)
    mlp_types = list(mlp_types)[:num_layers]
    _check_types("layer_types", layer_types + mtp_types, ATTENTION_TYPES, num_layers + num_mtp)
    _check_types("mlp_layer_types", mlp_types, MLP_TYPES, num_layers)

    factor = hf.get("partial_rotary_factor")
    if factor is None:
        legacy = hf.get("qk_rope_head_dim")
        factor = legacy / head_dim if legacy is not None else 64 / 512
    rope_dim = int(head_dim * float(factor))
    main_rope, compress_rope = _ropes(hf, rope_dim)

    scoring = hf.get("scoring_func", "sqrtsoftplus")
    if scoring not in ("sqrtsoftplus", "sigmoid", "softmax"):
        raise UnsupportedModelError(f"scoring_func {scoring!r} is not supported")
    eos = hf.get("eos_token_id", 1)
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    window = int(hf.get("sliding_window", 128))
    return ModelConfig(
        model_type="deepseek_v4",
        vocab_size=int(hf.get("vocab_size", 129280)),
        hidden_size=hidden,
        intermediate_size=int(hf.get("moe_intermediate_size", 2048)),
        num_layers=num_layers,
        num_heads=int(hf.get("num_attention_heads", 64)),
        num_kv_heads=1,
        head_dim=head_dim,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 1048576)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=False,
        qk_norm=False,
        hidden_act="silu",
        attention_scale=head_dim**-0.5,
        rope_full=RopeConfig(theta=main_rope.theta),
        sliding_windows=(window,) * num_layers,
        eos_token_ids=eos_ids,
        bos_token_id=hf.get("bos_token_id", 0),
        attention_types=tuple(layer_types),
        mlp_types=tuple(mlp_types),
        compressed_attention=CompressedAttentionConfig(
            q_lora_rank=int(hf.get("q_lora_rank", 1024)),
            sliding_window=window,
            o_groups=int(hf.get("o_groups", 8)),
            o_lora_rank=int(hf.get("o_lora_rank", 1024)),
            main_rope=main_rope,
            compress_rope=compress_rope,
            csa_rate=int(rates[CSA]),
            hca_rate=int(rates[HCA]),
            index_heads=int(hf.get("index_n_heads", 64)),
            index_head_dim=int(hf.get("index_head_dim", 128)),
            index_topk=int(hf.get("index_topk", 512)),
        ),
        moe=MoEConfig(
            num_experts=int(hf.get("n_routed_experts", 256)),
            experts_per_token=int(hf.get("num_experts_per_tok", 6)),
            intermediate_size=int(hf.get("moe_intermediate_size", 2048)),
            num_shared_experts=int(hf.get("n_shared_experts", 1)),
            scoring=scoring,
            norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.5)),
            swiglu_limit=float(hf.get("swiglu_limit", 10.0)),
        ),
        hyper_connections=HyperConnectionConfig(
            streams=int(hf.get("hc_mult", 4)),
            sinkhorn_iters=int(hf.get("hc_sinkhorn_iters", 20)),
            eps=float(hf.get("hc_eps", 1e-6)),
        ),
        float32_norms=True,
        mtp_attention_types=tuple(mtp_types),
        weight_aliases=WEIGHT_ALIASES,
    )


def _attention_types(
    hf: dict[str, Any], num_layers: int, num_mtp: int
) -> tuple[list[str], list[str]]:
    """Per decoder layer, and per MTP block (sliding unless the legacy
    ``compress_ratios`` lists it after the decoder layers)."""
    ratios = hf.get("compress_ratios")
    legacy = None
    if ratios is not None:
        unknown = sorted({int(r) for r in ratios} - set(_RATIO_TO_TYPE))
        if unknown:
            raise UnsupportedModelError(f"compress_ratios {unknown} are not supported")
        legacy = [_RATIO_TO_TYPE[int(r)] for r in ratios]
    layer_types = hf.get("layer_types")
    if layer_types is None and legacy is not None:
        layer_types = legacy
    if layer_types is None:
        interleave = [CSA if i % 2 else HCA for i in range(max(num_layers - 2, 0))]
        layer_types = [HCA] * min(num_layers, 2) + interleave
    mtp = (legacy or [])[num_layers : num_layers + num_mtp]
    mtp += [SLIDING] * (num_mtp - len(mtp))
    return list(layer_types)[:num_layers], mtp


def _check_types(key: str, types: list[str], allowed: tuple[str, ...], count: int) -> None:
    if len(types) != count:
        raise UnsupportedModelError(f"{key} has {len(types)} entries, expected {count}")
    bad = sorted(set(types) - set(allowed))
    if bad:
        raise UnsupportedModelError(f"{key} {bad} are not supported; supported: {allowed}")


def _ropes(hf: dict[str, Any], rope_dim: int) -> tuple[PartialRope, PartialRope]:
    """The sliding layers' plain RoPE and the compressed layers' (YaRN) RoPE."""
    params = hf.get("rope_parameters") or {}
    if isinstance(params.get("main"), dict) and isinstance(params.get("compress"), dict):
        main, compress = params["main"], params["compress"]
    else:
        flat = {**(hf.get("rope_scaling") or {}), **params}
        main = {"rope_theta": hf.get("rope_theta", 10000.0)}
        compress = {k: v for k, v in flat.items() if k not in ("main", "compress", "rope_theta")}
        compress["rope_theta"] = hf.get("compress_rope_theta", 160000.0)
    main_type = main.get("rope_type", main.get("type", "default"))
    if main_type != "default":
        raise UnsupportedModelError(f"sliding-layer rope_type {main_type!r} is not supported")
    main_rope = PartialRope(rope_dim, float(main.get("rope_theta", hf.get("rope_theta", 10000.0))))
    compress_theta = float(compress.get("rope_theta", hf.get("compress_rope_theta", 160000.0)))
    compress_type = compress.get("rope_type", compress.get("type", "default"))
    if compress_type == "default":
        return main_rope, PartialRope(rope_dim, compress_theta)
    if compress_type != "yarn":
        raise UnsupportedModelError(f"compressed-layer rope {compress_type!r} is not supported")
    if compress.get("attention_factor", 1.0) != 1.0:
        raise UnsupportedModelError("YaRN attention_factor other than 1.0 is not supported")
    original = int(compress["original_max_position_embeddings"])
    factor = compress.get("factor")
    if factor is None:
        factor = int(hf.get("max_position_embeddings", 1048576)) / original
    yarn = YarnParams(
        factor=float(factor),
        original_max_position_embeddings=original,
        beta_fast=float(compress.get("beta_fast") or 32.0),
        beta_slow=float(compress.get("beta_slow") or 1.0),
        truncate=bool(compress.get("truncate", True)),
    )
    return main_rope, PartialRope(rope_dim, compress_theta, yarn)
