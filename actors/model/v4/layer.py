"""A pre-norm decoder block on hyper-connection residual streams."""

from __future__ import annotations

import torch
from torch import nn

from specray.actors.model.config import ModelConfig
from specray.actors.model.context import ForwardContext
from specray.actors.model.norm import RMSNorm
from specray.actors.model.v4.attention import CompressedAttention
from specray.actors.model.v4.hyper import HyperConnection, merge_streams
from specray.actors.model.v4.moe import MoE
from specray.actors.model.v4.params import HASH_MOE
from specray.actors.model.v4.state import AttentionState
from specray.actors.parallel.group import TPGroup
from specray.actors.parallel.weights import WeightSource


class HyperDecoderLayer(nn.Module):
    """Attention then MoE, each entered and left through a
    :class:`HyperConnection`. Checkpoint names follow DeepSeek's release
    (``attn``, ``ffn``, ``attn_norm``, ``ffn_norm``, ``hc_attn_*``, ``hc_ffn_*``)."""

    def __init__(
        self,
        config: ModelConfig,
        attention_type: str,
        mlp_type: str,
        state_index: int,
        group: TPGroup,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        hyper, moe = config.hyper_connections, config.moe
        assert hyper is not None and moe is not None, "a V4 layer needs hyper and moe parameters"
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = CompressedAttention(config, attention_type, state_index, group, dtype)
        self.mlp = MoE(moe, hidden, config.vocab_size, mlp_type == HASH_MOE, group, dtype)
        self.input_layernorm = RMSNorm(hidden, eps, dtype, float_weight=True)
        self.post_attention_layernorm = RMSNorm(hidden, eps, dtype, float_weight=True)
        self.attn_hc = HyperConnection(hyper, hidden, eps)
        self.ffn_hc = HyperConnection(hyper, hidden, eps)

    def load(self, source: WeightSource, prefix: str) -> None:
        self.self_attn.load(source, f"{prefix}.attn")
        self.mlp.load(source, f"{prefix}.ffn")
        self.input_layernorm.load(source, f"{prefix}.attn_norm")
        self.post_attention_layernorm.load(source, f"{prefix}.ffn_norm")
        self.attn_hc.load(source, f"{prefix}.hc_attn")
        self.ffn_hc.load(source, f"{prefix}.hc_ffn")

    def new_state(
        self, num_slots: int, max_len: int, dtype: torch.dtype, device: torch.device | None
    ) -> AttentionState:
        return self.self_attn.new_state(num_slots, max_len, dtype, device)

    def forward(
        self,
        streams: torch.Tensor,  # [num_tokens, streams, hidden], packed
        ctx: ForwardContext,
    ) -> torch.Tensor:
        post, comb, collapsed = self.attn_hc(streams)
        attn = self.self_attn(self.input_layernorm(collapsed), ctx)
        streams = merge_streams(streams, attn, post, comb)
        post, comb, collapsed = self.ffn_hc(streams)
        mlp = self.mlp(self.post_attention_layernorm(collapsed), ctx)
        return merge_streams(streams, mlp, post, comb)
