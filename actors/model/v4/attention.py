"""DeepSeek-V4 attention: shared-KV multi-query attention over a sliding
window plus, per layer type, compressed entries of the whole past.

* Queries come through a low-rank bottleneck (``q_a`` -> RMSNorm -> ``q_b``)
  and are RMS-normed per head; one key/value head (the same tensor is key and
  value) is shared by all query heads.
* Partial, interleaved RoPE on the last ``rope_dim`` channels of queries and
  keys. Since the value is the rotated key, the output's rope channels are
  rotated back at the query's position, so each value enters relative to
  the query.
* ``sliding_attention`` attends to the last ``sliding_window`` positions;
  ``heavily_compressed_attention`` also to every complete HCA entry;
  ``compressed_sparse_attention`` to the CSA entries the Lightning Indexer
  picks. Compressed layers use the compressed rope (with YaRN).
* A learned per-head sink logit joins each softmax and takes its share of
  the probability mass without contributing a value.
* Grouped output projection: heads fall into ``o_groups`` groups, each
  projected to ``o_lora_rank`` on its own, then mixed to ``hidden``.

Query heads (and output groups) split over the TP group; the shared KV
head, the compressors and the indexer are replicated on every rank.
"""

from __future__ import annotations

import torch
from torch import nn

from specray.actors.model.batch import ForwardBatch
from specray.actors.model.config import ModelConfig
from specray.actors.model.context import ForwardContext
from specray.actors.model.norm import RMSNorm
from specray.actors.model.v4.compressor import Compressor, visible_entries
from specray.actors.model.v4.hyper import unweighted_rms_norm
from specray.actors.model.v4.indexer import Indexer
from specray.actors.model.v4.params import CSA, SLIDING
from specray.actors.model.v4.rotary import PartialRotary, apply_partial_rope
from specray.actors.model.v4.state import AttentionState, CompressedKVCache
from specray.actors.parallel.group import TPGroup
from specray.actors.parallel.linear import (
    ColumnParallelLinear,
    MergedReplicatedLinear,
    RowParallelLinear,
)
from specray.actors.parallel.span import Span
from specray.actors.parallel.weights import WeightSource


def attend_with_sinks(
    query: torch.Tensor,  # [batch, max_new, heads, head_dim]
    keys: torch.Tensor,  # [batch, num_keys, head_dim]: one head, also the values
    visible: torch.Tensor,  # [batch, max_new, num_keys] bool
    sinks: torch.Tensor,  # [heads] float32 logits
    scale: float,
) -> torch.Tensor:  # [batch, max_new, heads, head_dim] in query's dtype
    """Softmax attention in float32 whose normaliser also counts ``exp(sink)``.
    A query that sees no key puts all its mass on the sink (output 0)."""
    batch, new, heads, _ = query.shape
    values = keys.float()
    scores = torch.einsum("bnhd,bkd->bhnk", query.float(), values) * scale
    scores = scores.masked_fill(~visible.unsqueeze(1), float("-inf"))
    sink = sinks.view(1, heads, 1, 1).expand(batch, heads, new, 1)
    probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
    return torch.einsum("bhnk,bkd->bnhd", probs, values).to(query.dtype)


class CompressedAttention(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        attention_type: str,
        state_index: int,  # this layer's AttentionState in the cache
        group: TPGroup,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        params = config.compressed_attention
        assert params is not None, "V4 attention needs compressed_attention parameters"
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.state_index = state_index
        self.head_dim = config.head_dim
        self.eps = eps
        self.window = params.sliding_window
        self.q_a_norm = RMSNorm(params.q_lora_rank, eps, dtype, float_weight=True)
        self.q_b_proj = ColumnParallelLinear(
            params.q_lora_rank, config.num_heads * self.head_dim, False, group, dtype
        )
        self.kv_norm = RMSNorm(self.head_dim, eps, dtype, float_weight=True)
        first, last = self.q_b_proj.out_start, self.q_b_proj.out_end
        self.heads = (first // self.head_dim, last // self.head_dim)  # this rank's heads
        self.sinks = nn.Parameter(
            torch.empty(self.heads[1] - self.heads[0], dtype=torch.float32), False
        )
        # o_a is block diagonal: group g maps its heads' outputs to o_lora_rank.
        group_in = config.num_heads * self.head_dim // params.o_groups
        self.o_a_proj = ColumnParallelLinear(
            group_in, params.o_groups * params.o_lora_rank, False, group, dtype
        )
        self.o_lora_rank = params.o_lora_rank
        self.o_b_proj = RowParallelLinear(
            params.o_groups * params.o_lora_rank, hidden, False, group, dtype
        )
        rate = params.rate(attention_type)
        self.rope = params.main_rope if attention_type == SLIDING else params.compress_rope
        self.rotary = PartialRotary(self.rope)
        self.compressor = (
            Compressor(self.head_dim, rate, attention_type == CSA, self.rope, eps, dtype)
            if rate
            else None
        )
        self.indexer = Indexer(params, eps, dtype) if attention_type == CSA else None
        # Every projection of the layer input, all replicated, in one matmul:
        # the query's low-rank half, the shared KV head, then the compressor's
        # and the indexer's (checkpoint name under this layer's prefix, width).
        self.input_parts = [("wq_a", params.q_lora_rank), ("wkv", self.head_dim)]
        if self.compressor is not None:
            self.input_parts += [(f"compressor.{n}", w) for n, w in self.compressor.projections]
        if self.indexer is not None:
            self.input_parts += [(f"indexer.{n}", w) for n, w in self.indexer.projections]
        widths = [width for _, width in self.input_parts]
        self.input_proj = MergedReplicatedLinear(hidden, widths, dtype)

    def load(self, source: WeightSource, prefix: str) -> None:
        self.input_proj.load(source, [f"{prefix}.{name}" for name, _ in self.input_parts])
        self.q_a_norm.load(source, f"{prefix}.q_norm")
        self.q_b_proj.load(source, f"{prefix}.wq_b")
        self.kv_norm.load(source, f"{prefix}.norm")
        self.sinks.copy_(source.read(f"{prefix}.attn_sink", Span(0, *self.heads)))
        self.o_a_proj.load(source, f"{prefix}.wo_a")
        self.o_b_proj.load(source, f"{prefix}.wo_b")
        if self.compressor is not None:
            self.compressor.load(source, f"{prefix}.compressor")
        if self.indexer is not None:
            self.indexer.load(source, f"{prefix}.indexer")

    def new_state(
        self, num_slots: int, max_len: int, dtype: torch.dtype, device: torch.device | None
    ) -> AttentionState:
        # Zeros, not empty: masked-out garbage could be NaN, and 0 * NaN = NaN.
        state = AttentionState(
            torch.zeros(num_slots, max_len, self.head_dim, dtype=dtype, device=device)
        )
        if self.compressor is not None:
            state.compressor = self.compressor.new_state(num_slots, max_len, dtype, device)
        if self.indexer is not None:
            state.indexer = self.indexer.compressor.new_state(num_slots, max_len, dtype, device)
        return state

    def forward(
        self,
        x: torch.Tensor,  # [num_tokens, hidden], packed (normed layer input)
        ctx: ForwardContext,
    ) -> torch.Tensor:  # [num_tokens, hidden]
        batch, cache = ctx.batch, ctx.cache
        assert isinstance(cache, CompressedKVCache), "V4 attention needs a CompressedKVCache"
        state = cache.layers[self.state_index]
        rope = ctx.shared(
            ("partial-rope", self.rope), lambda: self.rotary(batch.flat_positions, ctx.dtype)
        )
        q_residual, query, kv, pooled = self.project(x, rope)
        state.window_kv[batch.flat_slots, batch.flat_positions] = kv

        keys, visible = self._window(state, batch)
        if self.compressor is not None:
            assert state.compressor is not None
            kv_in, gate_in = pooled[:2]
            self.compressor.update(state.compressor, kv_in, gate_in, batch)
            count = max(batch.end_positions()) // self.compressor.rate
            entries = state.compressor.entries[torch.tensor(batch.slots), :count]
            if self.indexer is not None:
                assert state.indexer is not None
                indexer_inputs = pooled[2:]
                chosen = self.indexer.select(
                    state.indexer, indexer_inputs, q_residual, rope, batch, count
                )
            else:
                chosen = visible_entries(batch, self.compressor.rate, count)
            keys = torch.cat((keys, entries), dim=1)
            visible = torch.cat((visible, chosen), dim=-1)

        out = attend_with_sinks(batch.pad(query), keys, visible, self.sinks, self.head_dim**-0.5)
        return self.output(batch.unpad(out), rope)

    def project(
        self,
        x: torch.Tensor,  # [..., hidden]: the normed layer input
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin: [..., rope_dim / 2]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """The query's low-rank residual ``[..., q_lora_rank]``, the rotated
        queries ``[..., heads, head_dim]`` and shared KV head ``[..., head_dim]``,
        and the compressor's and indexer's inputs."""
        q_low, kv, *pooled = self.input_proj(x)  # pooled: compressor's, then indexer's
        q_residual = self.q_a_norm(q_low)
        query = self.q_b_proj(q_residual).unflatten(-1, (-1, self.head_dim))
        query = apply_partial_rope(unweighted_rms_norm(query, self.eps), *rope)
        kv = apply_partial_rope(self.kv_norm(kv), *rope)
        return q_residual, query, kv, pooled

    def output(
        self,
        out: torch.Tensor,  # [tokens, heads, head_dim]: attention over rotated values
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin: [tokens, rope_dim / 2]
    ) -> torch.Tensor:  # [tokens, hidden]
        """Rotate the values' rope channels back to the query's position,
        then the grouped output projection."""
        cos, sin = rope
        out = apply_partial_rope(out, cos, -sin)
        tokens = out.shape[0]
        o_a = self.o_a_proj.weights.matrix(out.dtype)
        groups = o_a.shape[0] // self.o_lora_rank
        grouped = out.reshape(tokens, groups, -1).transpose(0, 1)  # [groups, tokens, group_in]
        weight = o_a.view(groups, self.o_lora_rank, -1).transpose(1, 2)
        mixed = torch.bmm(grouped, weight).transpose(0, 1).reshape(tokens, -1)
        return self.o_b_proj(mixed)

    def _window(
        self, state: AttentionState, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys ``[batch, window - 1 + max_new, head_dim]`` from each
        sequence's ``start - window + 1`` on, and ``[batch, max_new, keys]``:
        which of them each query sees (``p - window < j <= p``)."""
        max_new = batch.token_ids.shape[1]
        starts = batch.positions[:, :1]  # [batch, 1]
        key_pos = starts - self.window + 1 + torch.arange(self.window - 1 + max_new)
        max_len = state.window_kv.shape[1]
        slots = torch.tensor(batch.slots).unsqueeze(1)
        keys = state.window_kv[slots, key_pos.clamp(0, max_len - 1)]
        query_pos = batch.positions.unsqueeze(-1)  # [batch, max_new, 1]
        key_pos = key_pos.unsqueeze(1)  # [batch, 1, keys]
        visible = (key_pos <= query_pos) & (key_pos > query_pos - self.window) & (key_pos >= 0)
        return keys, visible
