"""DeepSeek-V4's multi-token-prediction (MTP) block, as a small model of its own.

MTP block ``k`` reads, at position ``i``, the target's final residual streams
``h_i`` (before the hyper head) and the embedding of token ``t_{i+1}``, and
predicts ``t_{i+2}``::

    x = e_proj(enorm(embed(t_{i+1}))) + h_proj(hnorm(h_i))     (per stream)
    x = V4 decoder block(x)                                    (own attention cache)
    logits = lm_head(norm(hyper_head(x)))

The embedding and LM head are the target's (read from the same checkpoint).
Chaining for more drafts feeds the block's own output streams in place of
the target's. Checkpoint names are DeepSeek's ``mtp.{k}.*``; transformers
neither builds nor saves them, so a ``save_pretrained`` copy has none.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from specray.actors.model.batch import ForwardBatch
from specray.actors.model.config import ModelConfig
from specray.actors.model.context import ForwardContext
from specray.actors.model.loader import parse_dtype
from specray.actors.model.norm import RMSNorm
from specray.actors.model.v4.hyper import HyperHead
from specray.actors.model.v4.layer import HyperDecoderLayer
from specray.actors.model.v4.params import MOE
from specray.actors.model.v4.state import CompressedKVCache
from specray.actors.parallel.embedding import ParallelLMHead, VocabParallelEmbedding
from specray.actors.parallel.group import SingleGroup, TPGroup
from specray.actors.parallel.linear import ReplicatedLinear
from specray.actors.parallel.weights import MissingWeightError, WeightSource


class NoMTPWeightsError(MissingWeightError):
    """The checkpoint carries no multi-token-prediction block."""


@dataclass
class MTPOutput:
    logits: torch.Tensor  # [num_logit_rows, vocab] float32
    streams: torch.Tensor  # [num_logit_rows, streams, hidden]: the block's output there


class MTPModel(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        index: int = 0,
        dtype: torch.dtype = torch.float32,
        group: TPGroup | None = None,
    ) -> None:
        super().__init__()
        hyper = config.hyper_connections
        if hyper is None or index >= len(config.mtp_attention_types):
            raise ValueError(f"config has no MTP block {index}")
        group = group or SingleGroup()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.config = config
        self.index = index
        self.dtype = dtype
        self.streams = hyper.streams
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, hidden, group, dtype)
        tied = self.embed_tokens if config.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(config.vocab_size, hidden, group, dtype, tied)
        self.enorm = RMSNorm(hidden, eps, dtype, float_weight=True)
        self.hnorm = RMSNorm(hidden, eps, dtype, float_weight=True)
        self.e_proj = ReplicatedLinear(hidden, hidden, dtype)
        self.h_proj = ReplicatedLinear(hidden, hidden, dtype)
        attention_type = config.mtp_attention_types[index]
        self.block = HyperDecoderLayer(config, attention_type, MOE, 0, group, dtype)
        self.hyper_head = HyperHead(hyper, hidden, eps)
        self.norm = RMSNorm(hidden, eps, dtype, float_weight=True)

    def load(self, source: WeightSource) -> None:
        prefix = f"mtp.{self.index}"
        if f"{prefix}.e_proj.weight" not in source:
            raise NoMTPWeightsError(
                f"the checkpoint has no multi-token-prediction weights ({prefix}.*); "
                "transformers' save_pretrained does not write them"
            )
        self.embed_tokens.load(source, "model.embed_tokens.weight")
        self.lm_head.load(source, "lm_head.weight")
        for name in ("enorm", "hnorm", "norm"):
            getattr(self, name).load(source, f"{prefix}.{name}")
        self.e_proj.load(source, f"{prefix}.e_proj")
        self.h_proj.load(source, f"{prefix}.h_proj")
        self.block.load(source, prefix)
        self.hyper_head.load(source, f"{prefix}.hc_head_")

    def new_cache(self, num_slots: int, max_len: int) -> CompressedKVCache:
        device = self.norm.weight.device
        state = self.block.new_state(num_slots, max_len, self.dtype, device)
        return CompressedKVCache(num_slots, max_len, [state])

    @torch.inference_mode()
    def forward(
        self,
        batch: ForwardBatch,  # tokens t_{i+1}, at the block's own positions
        cache: CompressedKVCache,
        streams: torch.Tensor,  # [num_tokens, streams, hidden]: h_i, packed like the tokens
    ) -> MTPOutput:
        for slot, end in zip(batch.slots, batch.end_positions(), strict=True):
            cache.check_room(slot, end)
        embedded = self.enorm(self.embed_tokens(batch.packed_token_ids))
        x = self.e_proj(embedded).unsqueeze(1) + self.h_proj(self.hnorm(streams.to(self.dtype)))
        x = self.block(x, ForwardContext(batch, cache, self.dtype))
        for slot, end in zip(batch.slots, batch.end_positions(), strict=True):
            cache.set_length(slot, end)
        rows = x.index_select(0, batch.packed_logit_index)
        logits = self.lm_head(self.norm(self.hyper_head(rows))).float()
        return MTPOutput(logits, rows)


def load_mtp(
    model_dir: str | Path,
    dtype: str | torch.dtype = torch.float32,
    group: TPGroup | None = None,
    index: int = 0,
) -> MTPModel:
    """MTP block ``index`` of a V4 checkpoint; :class:`NoMTPWeightsError` if
    the checkpoint has none."""
    config = ModelConfig.from_pretrained(model_dir)
    model = MTPModel(config, index, parse_dtype(dtype), group)
    with WeightSource(model_dir, config.weight_aliases) as source:
        model.load(source)
    return model.eval()
