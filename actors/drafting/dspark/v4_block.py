"""DSpark's draft layer for a DeepSeek-V4 target: the V4 block (shared-KV
attention with sinks over a sliding window, routed MoE, hyper-connection
residual streams) with the target's features injected into its keys.

DeepSeek's V4 drafter is three such layers on 128-token sliding-window
attention, stored beside the target under ``mtp.*`` (γ = 5). Each layer is a
:class:`HyperDecoderLayer` of the ``sliding_attention`` type (no compressor,
no indexer) under ``mtp.{i}``, so its tensors carry the target's own layer
names. The context features go through the layer's ``wkv`` projection,
KV norm and partial rope, as DSpark's dense layers put them through their
K and V projections; V4's one KV head is both key and value.

The residual between layers is V4's ``n`` streams: the block's embeddings
enter as ``n`` copies, and :class:`HyperResidual` collapses them with the
drafter's own hyper head before the final norm.
"""

from __future__ import annotations

import torch
from torch import nn

from specray.actors.drafting.dspark.block import DENSE, DraftFamily
from specray.actors.model.config import ModelConfig
from specray.actors.model.v4.attention import attend_with_sinks
from specray.actors.model.v4.hyper import HyperHead, merge_streams
from specray.actors.model.v4.layer import HyperDecoderLayer
from specray.actors.model.v4.params import MOE, SLIDING
from specray.actors.model.v4.rotary import PartialRotary
from specray.actors.parallel.group import TPGroup
from specray.actors.parallel.weights import WeightSource

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin: [..., rope_dim / 2]


class V4Block(nn.Module):
    """One V4 draft layer attending with injected context."""

    def __init__(self, config: ModelConfig, index: int, group: TPGroup, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer = HyperDecoderLayer(config, SLIDING, MOE, 0, group, dtype)

    @property
    def local_kv_heads(self) -> int:
        return 1

    def load(self, source: WeightSource, prefix: str) -> None:
        self.layer.load(source, prefix)

    def context_kv(self, features: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        _, _, kv, _ = self.layer.self_attn.project(features, rope)
        kv = kv.unsqueeze(-2)  # [..., 1, head_dim]: the one KV head
        return kv, kv

    def forward(
        self,
        streams: torch.Tensor,  # [batch, queries, n, hidden]
        rope: Rope,  # cos, sin: [batch, queries, rope_dim / 2]
        context_keys: torch.Tensor,  # [batch, 1, context, head_dim], also the values
        context_values: torch.Tensor,  # the same tensor (V4 shares key and value)
        mask: torch.Tensor,  # [batch, 1, queries, context + queries] bool
    ) -> torch.Tensor:  # [batch, queries, n, hidden]
        layer, attn = self.layer, self.layer.self_attn
        bsz, queries, n, hidden = streams.shape
        flat = streams.reshape(bsz * queries, n, hidden)
        post, comb, collapsed = layer.attn_hc(flat)
        normed = layer.input_layernorm(collapsed).view(bsz, queries, hidden)
        _, query, kv, _ = attn.project(normed, rope)  # [b, q, heads, d], [b, q, d]
        keys = torch.cat([context_keys[:, 0], kv.to(context_keys.dtype)], dim=1)
        out = attend_with_sinks(query, keys, mask[:, 0], attn.sinks, attn.head_dim**-0.5)
        cos, sin = (part.flatten(0, 1) for part in rope)
        flat = merge_streams(flat, attn.output(out.flatten(0, 1), (cos, sin)), post, comb)
        post, comb, collapsed = layer.ffn_hc(flat)
        # Routed, not hashed, experts: no token ids to route by.
        no_ids = torch.zeros(bsz * queries, dtype=torch.int64, device=flat.device)
        mlp = layer.mlp.mix(layer.post_attention_layernorm(collapsed), no_ids)
        return merge_streams(flat, mlp, post, comb).view(bsz, queries, n, hidden)


def v4_block(config: ModelConfig, index: int, group: TPGroup, dtype: torch.dtype) -> V4Block:
    return V4Block(config, index, group, dtype)


def v4_rope(config: ModelConfig) -> nn.Module:
    """The sliding layers' partial rope (no YaRN)."""
    assert config.compressed_attention is not None
    return PartialRotary(config.compressed_attention.main_rope)


class HyperResidual(nn.Module):
    """The embeddings enter as ``n`` streams; the hyper head collapses them."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hyper = config.hyper_connections
        assert hyper is not None, "a V4 drafter needs hyper-connection parameters"
        self.streams = hyper.streams
        self.head = HyperHead(hyper, config.hidden_size, config.rms_norm_eps)

    def load(self, source: WeightSource, prefix: str) -> None:
        self.head.load(source, f"{prefix}hc_head_")

    def enter(self, x: torch.Tensor) -> torch.Tensor:  # [b, q, hidden] -> [b, q, n, hidden]
        return x.unsqueeze(-2).expand(*x.shape[:-1], self.streams, x.shape[-1]).contiguous()

    def leave(self, streams: torch.Tensor) -> torch.Tensor:  # [b, q, n, hidden] -> [b, q, hidden]
        bsz, queries, n, hidden = streams.shape
        return self.head(streams.reshape(bsz * queries, n, hidden)).view(bsz, queries, hidden)


def v4_residual(config: ModelConfig) -> HyperResidual:
    return HyperResidual(config)


V4 = DraftFamily(v4_block, v4_rope, v4_residual, prefix="mtp.", layer_prefix="mtp.")


def family_of(decoder: ModelConfig) -> DraftFamily:
    """The V4 family for a decoder with hyper-connections, else the dense one."""
    return V4 if decoder.hyper_connections is not None else DENSE
