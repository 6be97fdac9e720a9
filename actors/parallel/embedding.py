"""Vocab-parallel token embedding and LM head.

The vocabulary is padded to a multiple of the group size and split in equal
contiguous ranges, one per rank. A tied LM head reuses the embedding's slice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from specray.actors.parallel.group import TPGroup
from specray.actors.parallel.weights import WeightSource


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (token ids) are split across ranks."""

    def __init__(
        self, vocab_size: int, hidden_size: int, group: TPGroup, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.group = group
        self.vocab_size = vocab_size
        shard = -(-vocab_size // group.size)
        self.vocab_start = group.rank * shard
        self.vocab_end = min(self.vocab_start + shard, vocab_size)
        self.weight = nn.Parameter(
            torch.zeros(shard, hidden_size, dtype=dtype), requires_grad=False
        )

    def load(self, source: WeightSource, name: str) -> None:
        rows = self.vocab_end - self.vocab_start
        self.weight[:rows].copy_(source.read(name, 0, self.vocab_start, self.vocab_end))

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:  # [...] int64
        if self.group.size == 1:
            return F.embedding(token_ids, self.weight)
        outside = (token_ids < self.vocab_start) | (token_ids >= self.vocab_end)
        local_ids = (token_ids - self.vocab_start).masked_fill(outside, 0)
        embedded = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return self.group.all_reduce(embedded)


class ParallelLMHead(nn.Module):
    """Hidden states to full-vocabulary logits, computed by vocab slice.

    Every rank computes its slice of the logits; the slices are gathered so
    the caller gets ``[..., vocab_size]``.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        group: TPGroup,
        dtype: torch.dtype,
        tied: VocabParallelEmbedding | None = None,
    ) -> None:
        super().__init__()
        self.group = group
        self.vocab_size = vocab_size
        self.tied = tied is not None
        if tied is not None:
            self.weight = tied.weight
            self.vocab_start, self.vocab_end = tied.vocab_start, tied.vocab_end
        else:
            own = VocabParallelEmbedding(vocab_size, hidden_size, group, dtype)
            self.weight = own.weight
            self.vocab_start, self.vocab_end = own.vocab_start, own.vocab_end

    def load(self, source: WeightSource, name: str) -> None:
        if self.tied:
            return
        rows = self.vocab_end - self.vocab_start
        self.weight[:rows].copy_(source.read(name, 0, self.vocab_start, self.vocab_end))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [..., hidden]
        logits = F.linear(hidden, self.weight)
        if self.group.size > 1:
            logits = self.group.all_gather(logits, dim=-1)
        return logits[..., : self.vocab_size]
