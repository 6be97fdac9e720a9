"""Mixture of experts: routed SwiGLU experts plus an always-on shared expert.

A router scores every expert per token (``sqrtsoftplus``, ``sigmoid`` or
``softmax`` of a linear map) and picks ``experts_per_token`` of them: by
score plus a learned selection bias (``moe``), or from a frozen token id ->
experts table (``hash_moe``). The chosen experts' scores, optionally
renormalised to sum to 1 and times ``routed_scaling_factor``, weight their
outputs.

Each rank holds the share of the experts its :class:`ExpertShard` names
(a range of expert ids, a column slice of each, a slice of the shared
expert) and the router whole; the layer's output is one all-reduce of the
shares over the target group (see :mod:`specray.actors.parallel.expert`).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from specray.actors.model.context import ForwardContext
from specray.actors.model.v4.params import MoEConfig
from specray.actors.parallel.expert import ExpertShard
from specray.actors.parallel.group import TPGroup
from specray.actors.parallel.linear import MergedColumnParallelLinear, RowParallelLinear
from specray.actors.parallel.linear_weights import DenseWeights, LinearWeights
from specray.actors.parallel.span import Span
from specray.actors.parallel.weight_loading import WeightSlice, load_linear
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


class Expert(nn.Module):
    """One routed SwiGLU expert: columns ``[start, end)`` of its intermediate
    dim. Its weights are :class:`LinearWeights`, so they run on the kernel
    measured fastest for their shape, as every other linear does."""

    def __init__(
        self, hidden: int, columns: tuple[int, int], limit: float, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.start, self.end = columns
        inter = self.end - self.start
        self.limit = limit
        self.gate_up: LinearWeights = DenseWeights.empty(2 * inter, hidden, dtype)
        self.down: LinearWeights = DenseWeights.empty(hidden, inter, dtype)

    def load(self, source: WeightSource, prefix: str) -> None:
        """Reads only this shard's columns of ``{prefix}.w1`` / ``w3`` / ``w2``."""
        rows, cols = Span(0, self.start, self.end), Span(1, self.start, self.end)
        gate, up = (WeightSlice(f"{prefix}.{w}.weight", rows) for w in ("w1", "w3"))
        self.gate_up = load_linear(source, [gate, up], self.gate_up)
        down = WeightSlice(f"{prefix}.w2.weight", cols)
        self.down = load_linear(source, [down], self.down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [tokens, hidden]
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(swiglu(gate, up, self.limit))


class RoutedExperts(nn.Module):
    """Experts ``[first, last)`` of the layer's global expert ids, columns
    ``[start, end)`` of each one's intermediate dim."""

    def __init__(
        self,
        config: MoEConfig,
        hidden: int,
        dtype: torch.dtype,
        owned: tuple[int, int],
        columns: tuple[int, int],
    ) -> None:
        super().__init__()
        self.first, self.last = owned
        self.owned = nn.ModuleList(
            Expert(hidden, columns, config.swiglu_limit, dtype) for _ in range(*owned)
        )

    def load(self, source: WeightSource, prefix: str) -> None:
        """Reads only the owned experts' slices."""
        for expert in range(self.first, self.last):
            self.expert(expert).load(source, f"{prefix}.{expert}")

    def expert(self, expert: int) -> Expert:
        """The owned expert with global id ``expert``."""
        return cast(Expert, self.owned[expert - self.first])

    def forward(
        self,
        x: torch.Tensor,  # [tokens, hidden]
        experts: torch.Tensor,  # [tokens, k] int64 global ids
        weights: torch.Tensor,  # [tokens, k]
    ) -> torch.Tensor:  # [tokens, hidden]: this rank's share of the routed output
        out = torch.zeros_like(x)
        for expert in torch.unique(experts).tolist():
            if not self.first <= expert < self.last:
                continue
            tokens, choice = torch.where(experts == expert)
            y = self.expert(expert)(x[tokens])
            out.index_add_(0, tokens, (y * weights[tokens, choice, None]).to(out.dtype))
        return out


class SharedExpert(nn.Module):
    """The always-on SwiGLU expert, its intermediate dim split by rank of
    ``group`` (whose all-reduce sums the slices)."""

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
    """Routed experts plus the shared expert; ``hashed`` routes by token id.
    ``shard``: this rank's share (default: plain TP over ``group``)."""

    def __init__(
        self,
        config: MoEConfig,
        hidden: int,
        vocab_size: int,
        hashed: bool,
        group: TPGroup,
        dtype: torch.dtype,
        shard: ExpertShard | None = None,
    ) -> None:
        super().__init__()
        shard = shard or ExpertShard.tensor_parallel(group)
        self.combine = shard.combine
        self.gate = Router(config, hidden, vocab_size, hashed, dtype)
        owned = shard.owned_experts(config.num_experts)
        columns = shard.expert_columns(config.intermediate_size)
        self.experts = RoutedExperts(config, hidden, dtype, owned, columns)
        self.shared_experts = SharedExpert(config, hidden, shard.partial, dtype)

    def load(self, source: WeightSource, prefix: str) -> None:
        self.gate.load(source, f"{prefix}.gate")
        self.experts.load(source, f"{prefix}.experts")
        self.shared_experts.load(source, f"{prefix}.shared_experts")

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:  # [tokens, hidden]
        return self.mix(x, ctx.batch.packed_token_ids)

    def mix(
        self,
        x: torch.Tensor,  # [tokens, hidden]
        token_ids: torch.Tensor,  # [tokens] int64: what hashed routing routes by
    ) -> torch.Tensor:  # [tokens, hidden]
        experts, weights = self.gate(x, token_ids)
        share = self.experts(x, experts, weights) + self.shared_experts(x)
        return self.combine.all_reduce(share)
