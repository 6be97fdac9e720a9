"""The decoder-only transformer shared by every supported family."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from specray.actors.model.batch import ForwardBatch
from specray.actors.model.config import ModelConfig
from specray.actors.model.kv_cache import KVCache
from specray.actors.model.layers import DecoderLayer
from specray.actors.model.norm import RMSNorm
from specray.actors.model.rotary import RotaryEmbedding
from specray.actors.parallel.embedding import ParallelLMHead, VocabParallelEmbedding
from specray.actors.parallel.group import SingleGroup, TPGroup
from specray.actors.parallel.weights import WeightSource


@dataclass
class ForwardOutput:
    """Rows follow ``ForwardBatch.logit_index``: sequence by sequence."""

    logits: torch.Tensor  # [num_logit_rows, vocab] float32
    # [num_logit_rows, len(hidden_layers) * hidden] in model dtype, or None
    hidden_states: torch.Tensor | None = None

    def split(self, counts: Sequence[int]) -> list[torch.Tensor]:
        return list(self.logits.split(list(counts)))


class DecoderModel(nn.Module):
    """Llama / Qwen2 / Qwen3 / Gemma 3, driven by :class:`ModelConfig`."""

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype = torch.float32,
        group: TPGroup | None = None,
    ) -> None:
        super().__init__()
        group = group or SingleGroup()
        self.config = config
        self.dtype = dtype
        self.group = group
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, group, dtype
        )
        blocks = [DecoderLayer(config, i, group, dtype) for i in range(config.num_layers)]
        self.layers = nn.ModuleList(blocks)
        self.blocks: list[DecoderLayer] = blocks  # typed view of self.layers
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, config.gemma_norms)
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
    def local_kv_heads(self) -> int:
        return self.blocks[0].self_attn.local_kv_heads

    def new_cache(self, num_slots: int, max_len: int) -> KVCache:
        """A KV cache sized for this model (this rank's KV heads only), on
        the device of its weights."""
        return KVCache(
            self.config.num_layers,
            num_slots,
            max_len,
            self.local_kv_heads,
            self.config.head_dim,
            self.dtype,
            self.norm.weight.device,
        )

    def load(self, source: WeightSource) -> None:
        self.embed_tokens.load(source, "model.embed_tokens.weight")
        for i, layer in enumerate(self.blocks):
            layer.load(source, f"model.layers.{i}")
        self.norm.load(source, "model.norm")
        self.lm_head.load(source, "lm_head.weight")

    @torch.inference_mode()
    def forward(
        self,
        batch: ForwardBatch,
        cache: KVCache,
        hidden_layers: Sequence[int] = (),
    ) -> ForwardOutput:
        """Run new tokens through the model, append them to ``cache`` and
        return logits (and, on request, hidden states) of the rows the batch
        asks for. ``hidden_layers`` index decoder layers; each hidden state is
        that layer's output."""
        new_lengths = batch.end_positions()
        for slot, end in zip(batch.slots, new_lengths, strict=True):
            cache.check_room(slot, end)
        x = self.embed_tokens(batch.packed_token_ids)  # [num_tokens, hidden]
        if self.embed_scale is not None:
            x = x * self.embed_scale
        rotary_positions = batch.flat_rotary_positions
        rope_full = self.rope_full(rotary_positions, self.dtype)
        rope_sliding = (
            self.rope_sliding(rotary_positions, self.dtype) if self.rope_sliding else rope_full
        )
        masks: dict[int | None, torch.Tensor] = {}
        captured: dict[int, torch.Tensor] = {}
        wanted = set(hidden_layers)
        for i, layer in enumerate(self.blocks):
            window = layer.self_attn.window
            if window not in masks:
                masks[window] = batch.attention_mask(window)
            rope = rope_full if window is None else rope_sliding
            x = layer(x, rope, masks[window], batch, cache)
            if i in wanted:
                captured[i] = x
        for slot, end in zip(batch.slots, new_lengths, strict=True):
            cache.set_length(slot, end)

        rows = x.index_select(0, batch.packed_logit_index)
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
