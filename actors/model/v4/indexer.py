"""The Lightning Indexer: which compressed entries each CSA query attends to.

It keeps its own overlapping compressor at ``index_head_dim`` (keys
``K``), and scores entry ``s`` for a query token ``t`` as
``Σ_h w_{t,h} · ReLU(q_{t,h} · K_s) / sqrt(index_head_dim)``, with
per-head queries ``q`` from the attention's low-rank query and per-head
weights ``w`` from the token (times ``index_heads ** -0.5``). Among the
entries complete at the query's position it keeps the ``index_topk``
highest scores.

Ties are broken towards the *earlier* entry. Scores tie exactly whenever
ReLU zeroes every head for several entries (frequent with few heads), and
an unordered top-k then makes the choice depend on how many other entries
the tensor holds, so a query's selection would change when later tokens
share its forward pass. With the lower index winning, the selection depends
on the query's visible entries only: the causal definition.
"""

from __future__ import annotations

import torch
from torch import nn

from specray.actors.model.batch import ForwardBatch
from specray.actors.model.v4.compressor import Compressor, visible_entries
from specray.actors.model.v4.params import CompressedAttentionConfig
from specray.actors.model.v4.rotary import apply_partial_rope
from specray.actors.model.v4.state import CompressorState
from specray.actors.parallel.linear import ReplicatedLinear
from specray.actors.parallel.weights import WeightSource


def top_k_earliest(
    scores: torch.Tensor,  # [..., entries] float; -inf for entries that may not be chosen
    k: int,
) -> torch.Tensor:  # [..., entries] bool: the k best finite scores, ties to the lower index
    chosen = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k == 0 or scores.shape[-1] == 0:
        return chosen
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    chosen.scatter_(-1, order[..., :k], True)
    return chosen & torch.isfinite(scores)


class Indexer(nn.Module):
    def __init__(
        self,
        config: CompressedAttentionConfig,
        eps: float,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.heads = config.index_heads
        self.head_dim = config.index_head_dim
        self.top_k = config.index_topk
        self.compressor = Compressor(
            self.head_dim, config.csa_rate, True, config.compress_rope, eps, dtype
        )
        self.q_b_proj = ReplicatedLinear(config.q_lora_rank, self.heads * self.head_dim, dtype)

    @property
    def projections(self) -> list[tuple[str, int]]:
        """Checkpoint name (under the indexer's prefix) and width of each
        projection of the layer input it reads (in the attention layer's
        fused input matmul): its compressor's value and gate, then the
        per-head weights."""
        pooled = [(f"compressor.{name}", width) for name, width in self.compressor.projections]
        return [*pooled, ("weights_proj", self.heads)]

    def load(self, source: WeightSource, prefix: str) -> None:
        self.compressor.load(source, f"{prefix}.compressor")
        self.q_b_proj.load(source, f"{prefix}.wq_b")

    def select(
        self,
        state: CompressorState,
        inputs: list[torch.Tensor],  # [num_tokens, width] each, packed: :attr:`projections`
        q_residual: torch.Tensor,  # [num_tokens, q_lora_rank]: the attention's low-rank query
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin [num_tokens, rope_dim / 2]
        batch: ForwardBatch,
        count: int,  # entries to score: the batch's most complete ones
    ) -> torch.Tensor:  # [batch, max_new, count] bool: entries each query attends to
        kv, gate, head_weights = inputs
        self.compressor.update(state, kv, gate, batch)
        tokens = q_residual.shape[0]
        query = self.q_b_proj(q_residual).view(tokens, self.heads, self.head_dim)
        query = apply_partial_rope(query, *rope)
        head_weights = head_weights.float() * self.heads**-0.5  # [tokens, heads]
        keys = state.entries[torch.tensor(batch.slots), :count]  # [batch, count, head_dim]
        scores = torch.einsum("bnhd,bcd->bnhc", batch.pad(query).float(), keys.float())
        scores = scores.relu() * self.head_dim**-0.5 * batch.pad(head_weights).unsqueeze(-1)
        scores = scores.sum(dim=2)
        ready = visible_entries(batch, self.compressor.rate, count)
        scores = scores.masked_fill(~ready, float("-inf"))  # [batch, max_new, count]
        return top_k_earliest(scores, min(self.top_k, count))
