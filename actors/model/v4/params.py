"""Architecture parameters of the DeepSeek-V4 blocks, as :class:`ModelConfig`
carries them (parsed in :mod:`specray.actors.model.v4.hf_config`)."""

from __future__ import annotations

from dataclasses import dataclass

SLIDING = "sliding_attention"
CSA = "compressed_sparse_attention"  # overlapping windows of `csa_rate` + Lightning Indexer
HCA = "heavily_compressed_attention"  # disjoint windows of `hca_rate`, all entries visible
ATTENTION_TYPES = (SLIDING, CSA, HCA)
MOE = "moe"  # learned top-k routing
HASH_MOE = "hash_moe"  # frozen token id -> experts table
MLP_TYPES = (MOE, HASH_MOE)


@dataclass(frozen=True)
class YarnParams:
    """YaRN frequency interpolation (no attention scaling: V4 applies none)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True


@dataclass(frozen=True)
class PartialRope:
    """Interleaved RoPE on the last ``dim`` channels of each head."""

    dim: int
    theta: float
    yarn: YarnParams | None = None


@dataclass(frozen=True)
class CompressedAttentionConfig:
    """Shared-KV multi-query attention over a sliding window plus, per layer
    type, compressed entries of the whole past."""

    q_lora_rank: int
    sliding_window: int  # keys at positions p - window < j <= p
    o_groups: int
    o_lora_rank: int
    main_rope: PartialRope  # sliding-only layers
    compress_rope: PartialRope  # layers with a compressor (their queries, keys and entries)
    csa_rate: int
    hca_rate: int
    index_heads: int
    index_head_dim: int
    index_topk: int

    def rate(self, attention_type: str) -> int:
        """Tokens per compressed entry; 0 for sliding-only layers."""
        return {SLIDING: 0, CSA: self.csa_rate, HCA: self.hca_rate}[attention_type]


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int
    experts_per_token: int
    intermediate_size: int  # of each routed and of the shared expert
    num_shared_experts: int
    scoring: str  # sqrtsoftplus | sigmoid | softmax
    norm_topk_prob: bool  # renormalise the chosen experts' weights to sum to 1
    routed_scaling_factor: float
    swiglu_limit: float  # clamp of gate (above) and up (both sides); 0: none


@dataclass(frozen=True)
class HyperConnectionConfig:
    """Manifold-constrained hyper-connections: ``streams`` residual streams."""

    streams: int
    sinkhorn_iters: int
    eps: float
