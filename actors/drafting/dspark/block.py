"""One draft layer with target features injected into its keys and values.

KV injection (DFlash, kept by DSpark): the projected target features of the
context positions are not run through the draft layers; each layer turns
them into keys and values with its own projections and appends them, along
the sequence axis, to the keys and values of the draft block:

    K_i = [W_i^K H_ctx ; W_i^K H_block],   V_i = [W_i^V H_ctx ; W_i^V H_block]

Every block query attends to the visible context keys and to every key of
its own block (bidirectional). Which keys are visible is an explicit mask, so
the same layer serves drafting (a cache of context keys, one block per
request) and training (the whole sequence as context, many blocks).

:class:`DraftBlock` is what the drafter needs from a layer; :class:`DenseBlock`
builds it from the dense families' decoder layer (Llama, Qwen2, Qwen3,
Gemma 3 by config). A :class:`DraftFamily` bundles a layer kind with the
rope it rotates by, the residual it carries between layers and where its
tensors live in a checkpoint: :data:`DENSE` here, the DeepSeek-V4 one in
:mod:`.v4_block`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from specray.actors.model.attend import attend
from specray.actors.model.config import ModelConfig
from specray.actors.model.layers import DecoderLayer
from specray.actors.model.rotary import RotaryEmbedding
from specray.actors.parallel.group import TPGroup
from specray.actors.parallel.weights import WeightSource

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin: [..., 1, head_dim]


class DraftBlock(Protocol):
    """A draft layer as the DSpark model drives it."""

    @property
    def local_kv_heads(self) -> int: ...

    def load(self, source: WeightSource, prefix: str) -> None: ...

    def context_kv(
        self,
        features: torch.Tensor,  # [..., hidden]: projected, normed target features
        rope: Rope,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[..., local kv heads, head_dim]`` of context rows."""
        ...

    def __call__(
        self,
        x: torch.Tensor,  # [batch, queries, ...]: the draft blocks in the family's residual
        rope: Rope,  # the family's rope at the queries' positions
        context_keys: torch.Tensor,  # [batch, kv heads, context, head_dim]
        context_values: torch.Tensor,  # [batch, kv heads, context, head_dim]
        mask: torch.Tensor,  # [batch, 1, queries, context + queries] bool
    ) -> torch.Tensor:  # shaped as x
        ...


# (decoder shapes, draft layer index, TP group, dtype) -> a draft layer
BlockFactory = Callable[[ModelConfig, int, TPGroup, torch.dtype], DraftBlock]


class DenseBlock(nn.Module):
    """The dense decoder layer (its weights, norms and MLP), attending with
    injected context."""

    def __init__(self, config: ModelConfig, index: int, group: TPGroup, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer = DecoderLayer(config, index, group, dtype)

    @property
    def local_kv_heads(self) -> int:
        return self.layer.self_attn.local_kv_heads

    def load(self, source: WeightSource, prefix: str) -> None:
        self.layer.load(source, prefix)

    def context_kv(self, features: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layer.self_attn.project_kv(features, rope)

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope,
        context_keys: torch.Tensor,
        context_values: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        attn = self.layer.self_attn

        def attend_with_context(normed: torch.Tensor) -> torch.Tensor:
            bsz, queries, _ = normed.shape
            q, k, v = attn.project(normed, rope)  # each [batch, queries, heads, head_dim]
            keys = torch.cat([context_keys, k.transpose(1, 2).to(context_keys.dtype)], dim=2)
            values = torch.cat([context_values, v.transpose(1, 2).to(context_values.dtype)], dim=2)
            out = attend(q.transpose(1, 2), keys, values, mask, attn.scale)
            return attn.o_proj(out.transpose(1, 2).reshape(bsz, queries, -1))

        return self.layer.around(x, attend_with_context)


def dense_block(config: ModelConfig, index: int, group: TPGroup, dtype: torch.dtype) -> DenseBlock:
    return DenseBlock(config, index, group, dtype)


class Residual(Protocol):
    """What a family carries between draft layers: ``enter`` turns embeddings
    ``[batch, queries, hidden]`` into it, ``leave`` turns it back before the
    final norm. An ``nn.Module`` (its weights load with the drafter's)."""

    def load(self, source: WeightSource, prefix: str) -> None: ...

    def enter(self, x: torch.Tensor) -> torch.Tensor: ...

    def leave(self, x: torch.Tensor) -> torch.Tensor: ...


class PlainResidual(nn.Module):
    """One hidden state per token between layers: nothing to enter or leave."""

    def load(self, source: WeightSource, prefix: str) -> None:
        pass

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def leave(self, x: torch.Tensor) -> torch.Tensor:
        return x


@dataclass(frozen=True)
class DraftFamily:
    """What a family's drafter is built from, and where its checkpoint keeps it."""

    block: BlockFactory
    # decoder shapes -> a module: (positions [...], dtype) -> the rope its blocks take
    rope: Callable[[ModelConfig], nn.Module]
    residual: Callable[[ModelConfig], Residual]  # decoder shapes -> its residual
    prefix: str  # of the drafter's own tensors (fc, norms, heads)
    layer_prefix: str  # of draft layer i: f"{layer_prefix}{i}"


DENSE = DraftFamily(
    dense_block,
    lambda d: RotaryEmbedding(d.rope_full, d.head_dim),
    lambda d: PlainResidual(),
    prefix="",
    layer_prefix="layers.",
)
