"""Vocab-parallel token embedding and LM head.

The vocabulary is padded to a multiple of the group size and split in equal
contiguous ranges, one per rank. A tied LM head reuses the embedding's slice.
A quantized table keeps its codes and dequantizes only the rows looked up;
the LM head runs the low-bit matmul of its format.
"""

from __future__ import annotations

import torch
from torch import nn

from specray.actors.parallel.embedding_rows import GroupRows
from specray.actors.parallel.group import TPGroup
from specray.actors.parallel.linear_weights import DenseWeights, LinearWeights, linear_weights_from
from specray.actors.parallel.span import Span
from specray.actors.parallel.weight_loading import WeightSlice, load_linear, load_rows
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
        self.shard_rows = shard
        # Zeros: rows past the vocabulary stay 0.
        self.weights: DenseWeights | GroupRows = DenseWeights(
            torch.zeros(shard, hidden_size, dtype=dtype)
        )

    def load(self, source: WeightSource, name: str) -> None:
        part = WeightSlice(name, Span(0, self.vocab_start, self.vocab_end))
        self.weights = load_rows(source, part, self.weights, self.shard_rows)

    def linear_weights(self) -> LinearWeights:
        """The table as an LM head's weights (shared when dense)."""
        if isinstance(self.weights, DenseWeights):
            return self.weights
        dtype = self.weights.dtype
        return linear_weights_from([self.weights.group_affine()], dtype, self.weights.codes.device)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:  # [...] int64
        if self.group.size == 1:
            return self.weights.rows(token_ids)
        outside = (token_ids < self.vocab_start) | (token_ids >= self.vocab_end)
        local_ids = (token_ids - self.vocab_start).masked_fill(outside, 0)
        embedded = self.weights.rows(local_ids).masked_fill(outside.unsqueeze(-1), 0.0)
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
        self.tied_embedding = tied
        table = tied or VocabParallelEmbedding(vocab_size, hidden_size, group, dtype)
        self.vocab_start, self.vocab_end = table.vocab_start, table.vocab_end
        self.shard_rows = table.shard_rows
        self.weights: LinearWeights = table.linear_weights()

    def load(self, source: WeightSource, name: str) -> None:
        """A tied head takes the embedding's weights, so load that first."""
        if self.tied_embedding is not None:
            self.weights = self.tied_embedding.linear_weights()
            return
        part = WeightSlice(name, Span(0, self.vocab_start, self.vocab_end))
        self.weights = load_linear(source, [part], self.weights, self.shard_rows)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [..., hidden]
        logits = self.weights(hidden)
        if self.group.size > 1:
            logits = self.group.all_gather(logits, dim=-1)
        return logits[..., : self.vocab_size]
