"""Attention and MLP blocks built from the parallel layers."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from specray.actors.model.attend import attend, attend_packed
from specray.actors.model.config import ModelConfig
from specray.actors.model.context import ForwardContext
from specray.actors.model.kv_cache import KVCache
from specray.actors.model.norm import RMSNorm
from specray.actors.model.rotary import apply_rotary
from specray.actors.parallel.group import TPGroup
from specray.actors.parallel.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from specray.actors.parallel.weights import WeightSource


class Attention(nn.Module):
    """Grouped-query attention over the KV cache, heads split by rank."""

    def __init__(self, config: ModelConfig, layer: int, group: TPGroup, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer = layer
        self.head_dim = config.head_dim
        self.scale = config.attention_scale
        self.window = config.sliding_windows[layer] if config.sliding_windows else None
        self.rope_name = "full" if self.window is None else "sliding"
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
            config.attention_bias,
            group,
            dtype,
        )
        self.o_proj = RowParallelLinear(config.q_size, config.hidden_size, False, group, dtype)
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if config.qk_norm:
            eps, gemma = config.rms_norm_eps, config.gemma_norms
            self.q_norm = RMSNorm(config.head_dim, eps, dtype, gemma)
            self.k_norm = RMSNorm(config.head_dim, eps, dtype, gemma)

    @property
    def local_kv_heads(self) -> int:
        return self.qkv_proj.local_kv_heads

    def load(self, source: WeightSource, prefix: str) -> None:
        self.qkv_proj.load(source, prefix)
        self.o_proj.load(source, f"{prefix}.o_proj")
        if self.q_norm is not None and self.k_norm is not None:
            self.q_norm.load(source, f"{prefix}.q_norm")
            self.k_norm.load(source, f"{prefix}.k_norm")

    def project(
        self,
        x: torch.Tensor,  # [..., hidden]
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin: [..., 1, head_dim]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # each [..., local heads, head_dim]
        """Queries, keys and values of ``x``: normed (QK-norm families) and rotated."""
        cos, sin = rope
        if self.q_norm is None and self.k_norm is None:
            # One rotary call over query and key heads together: the same
            # elementwise arithmetic, half the operators of a decode step's rope.
            qk, v = self.qkv_proj.heads(x)
            q, k = apply_rotary(qk, cos, sin).split(
                (self.qkv_proj.local_heads, self.qkv_proj.local_kv_heads), dim=-2
            )
            return q, k, v
        q, k, v = self.qkv_proj(x)
        q = q.unflatten(-1, (-1, self.head_dim))
        k = k.unflatten(-1, (-1, self.head_dim))
        v = v.unflatten(-1, (-1, self.head_dim))
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def project_kv(
        self,
        x: torch.Tensor,  # [..., hidden]
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin: [..., 1, head_dim]
    ) -> tuple[torch.Tensor, torch.Tensor]:  # each [..., local kv heads, head_dim]
        """Keys and values only (no query matmul), as :meth:`project` makes them."""
        k, v = self.qkv_proj.kv(x)
        k = k.unflatten(-1, (-1, self.head_dim))
        v = v.unflatten(-1, (-1, self.head_dim))
        if self.k_norm is not None:
            k = self.k_norm(k)
        cos, sin = rope
        return apply_rotary(k, cos, sin), v

    def forward(
        self,
        x: torch.Tensor,  # [num_tokens, hidden], packed
        ctx: ForwardContext,
    ) -> torch.Tensor:
        batch, cache = ctx.batch, ctx.cache
        assert isinstance(cache, KVCache), "dense attention keeps its keys in a KVCache"
        tokens = x.shape[0]
        q, k, v = self.project(x, ctx.rope(self.rope_name))

        cache.write(self.layer, batch.flat_slots, batch.flat_positions, k, v)
        mask = ctx.mask(self.window)
        keys, values = cache.layer(self.layer)
        out = attend_packed(q, batch.flat_index, keys, values, ctx.slot_index(), mask, self.scale)
        if out is None:
            keys, values = cache.read(self.layer, batch.slots, batch.context_len)
            padded = attend(batch.pad(q).transpose(1, 2), keys, values, mask, self.scale)
            out = batch.unpad(padded.transpose(1, 2))
        return self.o_proj(out.reshape(tokens, -1))


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with the intermediate dim split by rank."""

    def __init__(self, config: ModelConfig, group: TPGroup, dtype: torch.dtype) -> None:
        super().__init__()
        inter = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, (inter, inter), group, dtype
        )
        self.down_proj = RowParallelLinear(inter, config.hidden_size, False, group, dtype)
        self.gelu = config.hidden_act == "gelu_pytorch_tanh"

    def load(self, source: WeightSource, prefix: str) -> None:
        self.gate_up_proj.load(source, (f"{prefix}.gate_proj", f"{prefix}.up_proj"))
        self.down_proj.load(source, f"{prefix}.down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., hidden]
        gate, up = self.gate_up_proj(x)
        act = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down_proj(act * up)


class DecoderLayer(nn.Module):
    """Pre-norm block; Gemma 3 also norms each branch's output."""

    def __init__(self, config: ModelConfig, layer: int, group: TPGroup, dtype: torch.dtype) -> None:
        super().__init__()
        eps, gemma = config.rms_norm_eps, config.gemma_norms
        hidden = config.hidden_size
        self.gemma = gemma
        self.self_attn = Attention(config, layer, group, dtype)
        self.mlp = GatedMLP(config, group, dtype)
        self.input_layernorm = RMSNorm(hidden, eps, dtype, gemma)
        self.post_attention_layernorm = RMSNorm(hidden, eps, dtype, gemma)
        if gemma:
            self.pre_feedforward_layernorm = RMSNorm(hidden, eps, dtype, gemma)
            self.post_feedforward_layernorm = RMSNorm(hidden, eps, dtype, gemma)

    def load(self, source: WeightSource, prefix: str) -> None:
        self.self_attn.load(source, f"{prefix}.self_attn")
        self.mlp.load(source, f"{prefix}.mlp")
        norms = ["input_layernorm", "post_attention_layernorm"]
        if self.gemma:
            norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        for name in norms:
            getattr(self, name).load(source, f"{prefix}.{name}")

    def forward(
        self,
        x: torch.Tensor,  # [num_tokens, hidden], packed
        ctx: ForwardContext,
    ) -> torch.Tensor:
        return self.around(x, lambda normed: self.self_attn(normed, ctx))

    def around(
        self,
        x: torch.Tensor,  # [..., hidden]
        attention: Callable[[torch.Tensor], torch.Tensor],  # normed x -> attention output
    ) -> torch.Tensor:
        """The block around its attention (norms, residuals, MLP), so another
        way to attend (a drafter's injected context) reuses the same wiring."""
        attn = attention(self.input_layernorm(x))
        if self.gemma:
            x = x + self.post_attention_layernorm(attn)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))
