"""The Markov head: DSpark's lightweight sequential stage.

The parallel backbone gives base logits ``U_k`` for every block position at
once; the Markov head adds a first-order transition bias from the token
drafted just before, with a low-rank ``V x V`` matrix ``W1 W2``:

    B(x_{k-1}, .) = W2 W1[x_{k-1}]          (W1: [vocab, rank], W2: [vocab, rank])
    p_k(v) = softmax(U_k + B(x_{k-1}, .))(v)

``x_0`` is the anchor (the last committed token), so drafting samples left
to right, one cheap ``rank x vocab`` matmul per position. Each ``p_k`` is an
exact softmax of known logits, so the probability of every drafted token is
known and rejection sampling stays lossless.

Weights as DeepSpec names them: ``markov_w1.weight`` ``[vocab, rank]`` (an
embedding) and ``markov_w2.weight`` ``[vocab, rank]`` (a linear from rank to
vocab).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from specray.actors.parallel.weights import WeightSource


class MarkovHead(nn.Module):
    def __init__(self, vocab_size: int, rank: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.rank = rank
        self.markov_w1 = nn.Parameter(torch.empty(vocab_size, rank, dtype=dtype), False)
        self.markov_w2 = nn.Parameter(torch.empty(vocab_size, rank, dtype=dtype), False)

    def load(self, source: WeightSource, prefix: str) -> None:
        self.markov_w1.copy_(source.read(f"{prefix}.markov_w1.weight"))
        self.markov_w2.copy_(source.read(f"{prefix}.markov_w2.weight"))

    def embed(self, previous_ids: torch.Tensor) -> torch.Tensor:  # [...] -> [..., rank]
        """``W1[x_{k-1}]``: also an input of the confidence head."""
        return F.embedding(previous_ids, self.markov_w1)

    def bias(self, previous_ids: torch.Tensor) -> torch.Tensor:  # [...] -> [..., vocab] fp32
        """The transition bias each position adds to its base logits."""
        return F.linear(self.embed(previous_ids), self.markov_w2).float()
