"""The decoder-only transformer shared by every supported family."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from specray.actors.model.batch import ForwardBatch
from specray.actors.model.config import ModelConfig
from specray.actors.model.context import ForwardContext
from specray.actors.model.kv_cache import KVCache, SlotCache
from specray.actors.model.layers import DecoderLayer
from specray.actors.model.norm import RMSNorm
from specray.actors.model.rotary import RotaryEmbedding
from specray.actors.model.v4.hyper import HyperHead
from specray.actors.model.v4.layer import HyperDecoderLayer
from specray.actors.model.v4.state import CompressedKVCache
from specray.actors.parallel.embedding import ParallelLMHead, VocabParallelEmbedding
from specray.actors.parallel.expert import ExpertShard
from specray.actors.parallel.group import SingleGroup, TPGroup
from specray.actors.parallel.weights import WeightSource


@dataclass
class ForwardOutput:
    """Rows follow ``ForwardBatch.logit_index``: sequence by sequence."""

    logits: torch.Tensor  # [num_logit_rows, vocab] float32
    # [num_logit_rows, len(hidden_layers) * hidden] in model dtype, or None;
    # with hyper-connections each layer's part is its streams, flattened.
    hidden_states: torch.Tensor | None = None

    def split(self, counts: Sequence[int]) -> list[torch.Tensor]:
        return list(self.logits.split(list(counts)))


Layer = DecoderLayer | HyperDecoderLayer


def build_layer(
    config: ModelConfig,
    index: int,
    group: TPGroup,
    dtype: torch.dtype,
    experts: ExpertShard | None = None,
) -> Layer:
    """The residual scheme picks the layer; the layer picks its attention and
    MLP blocks from the config's per-layer types."""
    if config.hyper_connections is None:
        return DecoderLayer(config, index, group, dtype)
    attention, mlp = config.attention_types[index], config.mlp_types[index]
    return HyperDecoderLayer(config, attention, mlp, index, group, dtype, experts)


class DecoderModel(nn.Module):
    """Llama / Qwen2 / Qwen3 / Gemma 3 / DeepSeek-V4, driven by :class:`ModelConfig`."""

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype = torch.float32,
        group: TPGroup | None = None,
        experts: ExpertShard | None = None,
    ) -> None:
        """``group``: the tensor-parallel group; ``experts``: this rank's
        share of the MoE layers (default: plain TP over ``group``)."""
        super().__init__()
        group = group or SingleGroup()
        if experts is not None and experts.ep_size > 1 and config.moe is None:
            raise ValueError("expert parallelism needs a mixture-of-experts model")
        self.config = config
        self.dtype = dtype
        self.group = group
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, group, dtype
        )
        blocks = [build_layer(config, i, group, dtype, experts) for i in range(config.num_layers)]
        self.layers = nn.ModuleList(blocks)
        self.blocks: list[Layer] = blocks  # typed view of self.layers
        hyper = config.hyper_connections
        self.hyper_head = (
            None if hyper is None else HyperHead(hyper, config.hidden_size, config.rms_norm_eps)
        )
        self.norm = RMSNorm(
            config.hidden_size,
            config.rms_norm_eps,
            dtype,
            config.gemma_norms,
            float_weight=config.float32_norms,
        )
        tied = self.embed_tokens if config.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, group, dtype, tied)
        self.rope_full = RotaryEmbedding(config.rope_full, config.head_dim)
        self.rope_sliding = (
            RotaryEmbedding(config.rope_sliding, config.head_dim) if config.rope_sliding else None
        )
        # Gemma scales embeddings by sqrt(hidden), rounded to the model dtype.
        self.embed_scale = (
            torch.tensor(config.hidden_size**0.5, dtype=dtype) if config.gemma_norms else None
        )

    @property
    def verifies_trees(self) -> bool:
        """Whether a batch may feed token trees (``SequenceInput.parents``):
        see :attr:`ModelConfig.verifies_trees`."""
        return self.config.verifies_trees

    def new_cache(self, num_slots: int, max_len: int) -> SlotCache:
        """A cache sized for this model (this rank's KV heads only), on the
        device of its weights: a :class:`KVCache` for dense attention, a
        :class:`CompressedKVCache` for V4 layers."""
        device = self.norm.weight.device
        dense = [b for b in self.blocks if isinstance(b, DecoderLayer)]
        if len(dense) == len(self.blocks):
            kv_heads = dense[0].self_attn.local_kv_heads
            head_dim = self.config.head_dim
            return KVCache(len(dense), num_slots, max_len, kv_heads, head_dim, self.dtype, device)
        states = [
            b.new_state(num_slots, max_len, self.dtype, device)
            for b in self.blocks
            if isinstance(b, HyperDecoderLayer)
        ]
        return CompressedKVCache(num_slots, max_len, states)

    def load(self, source: WeightSource) -> None:
        self.embed_tokens.load(source, "model.embed_tokens.weight")
        for i, layer in enumerate(self.blocks):
            layer.load(source, f"model.layers.{i}")
        if self.hyper_head is not None:
            self.hyper_head.load(source, "model.hc_head.hc_")
        self.norm.load(source, "model.norm")
        self.lm_head.load(source, "lm_head.weight")

    @torch.inference_mode()
    def forward(
        self,
        batch: ForwardBatch,
        cache: SlotCache,
        hidden_layers: Sequence[int] = (),
    ) -> ForwardOutput:
        """Run new tokens through the model, append them to ``cache`` and
        return logits (and, on request, hidden states) of the rows the batch
        asks for. ``hidden_layers`` index decoder layers; each hidden state is
        that layer's output."""
        if batch.trees and not self.verifies_trees:
            raise ValueError("this model verifies chains only: a batch fed it a token tree")
        new_lengths = batch.end_positions()
        for slot, end in zip(batch.slots, new_lengths, strict=True):
            cache.check_room(slot, end)
        x = self.embed_tokens(batch.packed_token_ids)  # [num_tokens, hidden]
        if self.embed_scale is not None:
            x = x * self.embed_scale
        if self.hyper_head is not None:  # [num_tokens, streams, hidden]
            x = x.unsqueeze(1).expand(-1, self.hyper_head.streams, -1).contiguous()
        rotary = {"full": self.rope_full, "sliding": self.rope_sliding or self.rope_full}
        ctx = ForwardContext(batch, cache, self.dtype, rotary)
        captured: dict[int, torch.Tensor] = {}
        wanted = set(hidden_layers)
        for i, layer in enumerate(self.blocks):
            x = layer(x, ctx)
            if i in wanted:
                captured[i] = x.flatten(1)
        for slot, end in zip(batch.slots, new_lengths, strict=True):
            cache.set_length(slot, end)

        rows = x.index_select(0, batch.packed_logit_index)
        if self.hyper_head is not None:
            rows = self.hyper_head(rows)
        logits = self.lm_head(self.norm(rows)).float()
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        hidden = None
        if hidden_layers:
            hidden = torch.cat(
                [captured[i].index_select(0, batch.packed_logit_index) for i in hidden_layers],
                dim=-1,
            )
        return ForwardOutput(logits=logits, hidden_states=hidden)
