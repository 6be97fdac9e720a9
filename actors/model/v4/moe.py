"""Mixture of experts: routed SwiGLU experts plus an always-on shared expert.

A router scores every expert per token (``sqrtsoftplus``, ``sigmoid`` or
``softmax`` of a linear map) and picks ``experts_per_token`` of them: by
score plus a learned selection bias (``moe``), or from a frozen token id ->
experts table (``hash_moe``). The chosen experts' scores, optionally
renormalised to sum to 1 and times ``routed_scaling_factor``, weight their
outputs.

Routed experts live in :class:`RoutedExperts`, indexed by global expert id
with an owned range, so an expert-parallel rank can hold a subset and sum
its partial output over the group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from specray.actors.model.context import ForwardContext
from specray.actors.model.v4.params import MoEConfig
from specray.actors.parallel.group import TPGroup
from specray.actors.parallel.linear import MergedColumnParallelLinear, RowParallelLinear
from specray.actors.parallel.weights import WeightSource


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """``silu(gate) * up``, with gate clamped above and up on both sides at
    ``limit`` (when positive)."""
    if limit > 0:
        gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
    return F.silu(gate) * up


class Router(nn.Module):
    """Per token, which experts and with which weights."""

    def __init__(
        self, config: MoEConfig, hidden: int, vocab_size: int, hashed: bool, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.config = config
        self.hashed = hashed
        self.weight = nn.Parameter(torch.empty(config.num_experts, hidden, dtype=dtype), False)
        if hashed:
            table = torch.zeros(vocab_size, config.experts_per_token, dtype=torch.int64)
            self.register_buffer("token_experts", table)
            self.token_experts: torch.Tensor
        else:
            bias = torch.zeros(config.num_experts, dtype=torch.float32)
            self.register_buffer("selection_bias", bias)
            self.selection_bias: torch.Tensor

    def load(self, source: WeightSource, prefix: str) -> None:
        self.weight.copy_(source.read(f"{prefix}.weight"))
        if self.hashed:
            self.token_experts.copy_(source.read(f"{prefix}.tid2eid"))
        else:
            self.selection_bias.copy_(source.read(f"{prefix}.bias"))

    def forward(
        self,
        x: torch.Tensor,  # [tokens, hidden]
        token_ids: torch.Tensor,  # [tokens] int64
    ) -> tuple[torch.Tensor, torch.Tensor]:  # experts [tokens, k] int64, weights [tokens, k]
        logits = F.linear(x, self.weight)
        scoring = self.config.scoring
        if scoring == "softmax":
            scores = logits.softmax(dim=-1)
        elif scoring == "sigmoid":
            scores = logits.sigmoid()
        else:
            scores = F.softplus(logits).sqrt()
        if self.hashed:
            experts = self.token_experts[token_ids]
        else:
            ranked = scores + self.selection_bias
            experts = ranked.topk(self.config.experts_per_token, dim=-1).indices
        weights = scores.gather(1, experts)
        if self.config.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return experts, weights * self.config.routed_scaling_factor


class RoutedExperts(nn.Module):
    """SwiGLU experts ``[first, last)`` of the layer's global expert ids."""

    def __init__(
        self, config: MoEConfig, hidden: int, dtype: torch.dtype, owned: tuple[int, int]
    ) -> None:
        super().__init__()
        self.first, self.last = owned
        count, inter = self.last - self.first, config.intermediate_size
        self.limit = config.swiglu_limit
        self.gate_up = nn.Parameter(torch.empty(count, 2 * inter, hidden, dtype=dtype), False)
        self.down = nn.Parameter(torch.empty(count, hidden, inter, dtype=dtype), False)

    def load(self, source: WeightSource, prefix: str) -> None:
        inter = self.down.shape[-1]
        for local, expert in enumerate(range(self.first, self.last)):
            name = f"{prefix}.{expert}"
            self.gate_up[local, :inter].copy_(source.read(f"{name}.w1.weight"))
            self.gate_up[local, inter:].copy_(source.read(f"{name}.w3.weight"))
            self.down[local].copy_(source.read(f"{name}.w2.weight"))

    def forward(
        self,
        x: torch.Tensor,  # [tokens, hidden]
        experts: torch.Tensor,  # [tokens, k] int64 global ids
        weights: torch.Tensor,  # [tokens, k]
    ) -> torch.Tensor:  # [tokens, hidden]: the owned experts' share of the output
        out = torch.zeros_like(x)
        for expert in torch.unique(experts).tolist():
            if not self.first <= expert < self.last:
                continue
            tokens, choice = torch.where(experts == expert)
            gate, up = F.linear(x[tokens], self.gate_up[expert - self.first]).chunk(2, dim=-1)
            y = F.linear(swiglu(gate, up, self.limit), self.down[expert - self.first])
            out.index_add_(0, tokens, (y * weights[tokens, choice, None]).to(out.dtype))
        return out


class SharedExpert(nn.Module):
    """The always-on SwiGLU expert, its intermediate dim split by rank."""

    def __init__(self, config: MoEConfig, hidden: int, group: TPGroup, dtype: torch.dtype) -> None:
        super().__init__()
        inter = config.intermediate_size * config.num_shared_experts
        self.limit = config.swiglu_limit
        self.gate_up = MergedColumnParallelLinear(hidden, (inter, inter), group, dtype)
        self.down = RowParallelLinear(inter, hidden, False, group, dtype)

    def load(self, source: WeightSource, prefix: str) -> None:
        self.gate_up.load(source, (f"{prefix}.w1", f"{prefix}.w3"))
        self.down.load(source, f"{prefix}.w2")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [tokens, hidden]
        gate, up = self.gate_up(x)
        return self.down(swiglu(gate, up, self.limit))


class MoE(nn.Module):
    """Routed experts plus the shared expert; ``hashed`` routes by token id."""

    def __init__(
        self,
        config: MoEConfig,
        hidden: int,
        vocab_size: int,
        hashed: bool,
        group: TPGroup,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.gate = Router(config, hidden, vocab_size, hashed, dtype)
        self.experts = RoutedExperts(config, hidden, dtype, (0, config.num_experts))
        self.shared_experts = SharedExpert(config, hidden, group, dtype)

    def load(self, source: WeightSource, prefix: str) -> None:
        self.gate.load(source, f"{prefix}.gate")
        self.experts.load(source, f"{prefix}.experts")
        self.shared_experts.load(source, f"{prefix}.shared_experts")

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:  # [tokens, hidden]
        experts, weights = self.gate(x, ctx.batch.packed_token_ids)
        return self.experts(x, experts, weights) + self.shared_experts(x)
