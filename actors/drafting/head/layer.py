"""The head's one decoder layer, with two ways to attend.

``forward_cached`` drafts: keys and values go to a position-indexed
:class:`KVCache`, so rollback is ``truncate``. ``forward_unrolled`` trains:
EAGLE-3's training-time test, where draft step ``k`` at anchor ``a`` (the
last position whose target hidden state is known) sits at position
``a + k - 1`` and sees the step-1 keys at positions ``<= a`` plus its own
chain's keys of steps ``2..k`` -- exactly what the cache holds when it
drafts. Both paths share every weight, so the trained layer is the served
one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from specray.actors.drafting.head.config import HeadConfig
from specray.actors.model.batch import ForwardBatch
from specray.actors.model.kv_cache import KVCache
from specray.actors.model.norm import RMSNorm
from specray.actors.model.rotary import apply_rotary

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin: [batch, seq, 1, head_dim]


def trainable_norm(dim: int, eps: float) -> RMSNorm:
    """A Llama-flavour RMSNorm starting at weight 1, with a trainable weight."""
    norm = RMSNorm(dim, eps, torch.float32)
    norm.weight = nn.Parameter(torch.ones(dim))
    return norm


@dataclass
class UnrolledKV:
    """Keys and values of one training-time test so far, heads expanded.

    ``keys``/``values`` are step 1's, one per position; ``chain_*`` hold one
    entry per later step, each a key/value per anchor.
    """

    keys: torch.Tensor  # [batch, heads, T, head_dim]
    values: torch.Tensor  # [batch, heads, T, head_dim]
    visible: torch.Tensor  # [T, T] bool: anchor a sees step-1 key t iff t <= a
    chain_keys: list[torch.Tensor] = field(default_factory=list)  # each [batch, heads, T, d]
    chain_values: list[torch.Tensor] = field(default_factory=list)


class HeadAttention(nn.Module):
    """Grouped-query attention (Qwen2/Llama layout, optional q/k/v bias)."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        hidden, dim = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_heads,
            config.num_kv_heads,
            dim,
        )
        self.scale = dim**-0.5
        bias = config.attention_bias
        self.q_proj = nn.Linear(hidden, config.num_heads * dim, bias=bias)
        self.k_proj = nn.Linear(hidden, config.num_kv_heads * dim, bias=bias)
        self.v_proj = nn.Linear(hidden, config.num_kv_heads * dim, bias=bias)
        self.o_proj = nn.Linear(config.num_heads * dim, hidden, bias=False)

    def _project(
        self, x: torch.Tensor, rope: Rope
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        bsz, seq, _ = x.shape
        q = self.q_proj(x).view(bsz, seq, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(bsz, seq, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(bsz, seq, self.num_kv_heads, self.head_dim)
        cos, sin = rope
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward_cached(
        self,
        x: torch.Tensor,  # [batch, max_new, hidden]
        rope: Rope,
        mask: torch.Tensor,  # [batch, 1, max_new, context_len] bool
        batch: ForwardBatch,
        cache: KVCache,
    ) -> torch.Tensor:
        bsz, seq, _ = x.shape
        q, k, v = self._project(x, rope)
        flat_k = k.reshape(-1, self.num_kv_heads, self.head_dim).index_select(0, batch.flat_index)
        flat_v = v.reshape(-1, self.num_kv_heads, self.head_dim).index_select(0, batch.flat_index)
        cache.write(0, batch.flat_slots, batch.flat_positions, flat_k, flat_v)
        keys, values = cache.read(0, batch.slots, batch.context_len)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=mask, scale=self.scale, enable_gqa=True
        )
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seq, -1))

    def forward_unrolled(
        self, x: torch.Tensor, rope: Rope, context: UnrolledKV | None
    ) -> tuple[torch.Tensor, UnrolledKV]:
        """One training-time-test step for every anchor at once; ``context``
        is None on step 1 (whose keys become the context)."""
        bsz, seq, _ = x.shape
        q, k, v = self._project(x, rope)
        groups = self.num_heads // self.num_kv_heads
        q = q.transpose(1, 2)  # [batch, heads, T, d]
        k = k.transpose(1, 2).repeat_interleave(groups, dim=1)
        v = v.transpose(1, 2).repeat_interleave(groups, dim=1)
        if context is None:
            visible = torch.ones(seq, seq, dtype=torch.bool, device=x.device).tril()
            context = UnrolledKV(k, v, visible)
        else:
            context.chain_keys.append(k)
            context.chain_values.append(v)
        scores = (q @ context.keys.transpose(-1, -2)) * self.scale
        scores = scores.masked_fill(~context.visible, -torch.inf)
        chain_scores = [(q * key).sum(-1, keepdim=True) * self.scale for key in context.chain_keys]
        weights = torch.softmax(torch.cat([scores, *chain_scores], dim=-1), dim=-1)
        out = weights[..., :seq] @ context.values
        for j, value in enumerate(context.chain_values):
            out = out + weights[..., seq + j : seq + j + 1] * value
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seq, -1)), context


class HeadMLP(nn.Module):
    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        hidden, inter = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.gelu = config.hidden_act == "gelu_pytorch_tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)
        act = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down_proj(act * self.up_proj(x))


class HeadLayer(nn.Module):
    """Pre-norm attention + gated MLP, the same block as a Qwen2/Llama layer."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.self_attn = HeadAttention(config)
        self.mlp = HeadMLP(config)
        self.input_layernorm = trainable_norm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = trainable_norm(config.hidden_size, config.rms_norm_eps)

    def forward_cached(
        self,
        x: torch.Tensor,
        rope: Rope,
        mask: torch.Tensor,
        batch: ForwardBatch,
        cache: KVCache,
    ) -> torch.Tensor:
        x = x + self.self_attn.forward_cached(self.input_layernorm(x), rope, mask, batch, cache)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_unrolled(
        self, x: torch.Tensor, rope: Rope, context: UnrolledKV | None
    ) -> tuple[torch.Tensor, UnrolledKV]:
        attn, context = self.self_attn.forward_unrolled(self.input_layernorm(x), rope, context)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), context
