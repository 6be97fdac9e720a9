"""The confidence head: how likely each draft is to survive verification.

``c_k = sigmoid(w · [h_k ; W1[x_{k-1}]] + b)`` estimates the probability that
draft ``k`` is accepted *given* that drafts ``1..k-1`` were, from the
backbone's hidden state ``h_k`` at that position and the Markov embedding of
the token before it (``x_0``: the anchor). The chance that drafts ``1..j``
all survive is then the product ``a_j = c_1 ... c_j``, which is what a
verification-budget scheduler ranks and sums.

Training labels are the analytic acceptance rate ``1 - TV(p_draft, p_target)``
at each position. :class:`Calibration` rescales the logits per position
(sequential temperature scaling, see :mod:`.calibration`); an uncalibrated
head has temperature 1 everywhere.

Weights as DeepSpec names them: ``proj.weight`` ``[1, hidden (+ rank)]`` and
``proj.bias`` ``[1]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from specray.actors.parallel.weights import WeightSource


class ConfidenceHead(nn.Module):
    def __init__(self, hidden_size: int, markov_rank: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.with_markov = markov_rank > 0
        self.weight = nn.Parameter(torch.empty(1, hidden_size + markov_rank, dtype=dtype), False)
        self.bias = nn.Parameter(torch.empty(1, dtype=dtype), False)

    def load(self, source: WeightSource, prefix: str) -> None:
        self.weight.copy_(source.read(f"{prefix}.proj.weight"))
        self.bias.copy_(source.read(f"{prefix}.proj.bias"))

    def logits(
        self,
        hidden: torch.Tensor,  # [..., hidden]: backbone output (after the final norm)
        previous_embedding: torch.Tensor | None,  # [..., rank]: W1 of the token before
    ) -> torch.Tensor:  # [...] float32, before the sigmoid
        features = hidden
        if self.with_markov:
            if previous_embedding is None:
                raise ValueError("this confidence head reads the Markov embedding")
            features = torch.cat([hidden, previous_embedding.to(hidden.dtype)], dim=-1)
        return F.linear(features, self.weight, self.bias).squeeze(-1).float()
