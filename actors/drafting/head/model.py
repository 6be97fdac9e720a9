"""The draft head: fuse target hidden states, one decoder layer, frozen LM head.

Input at head position ``t`` is the pair (target hidden state at ``t``,
the token the target committed there, i.e. the one that hidden state
predicted); the output predicts the token after it. Chaining, the head
feeds its own output in place of the fused hidden state:

    x_t  = norm(fc([h_low; h_mid; h_high]_t)) + token_proj(norm(embed(tok_t)))  # from target
    x_t' = norm(out_{t'-1}) + token_proj(norm(embed(draft_{t'})))               # chained
    out  = layer(x);  logits = lm_head_reduced(norm(out))

The embedding and the LM head are the target's, frozen and never saved with
the head; the LM head keeps only the rows of the draft vocabulary (the
tokens the target actually writes), which cuts the head's largest matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from specray.actors.drafting.head.config import HeadConfig
from specray.actors.drafting.head.layer import HeadLayer, trainable_norm
from specray.actors.model.batch import ForwardBatch
from specray.actors.model.config import RopeConfig
from specray.actors.model.kv_cache import KVCache
from specray.actors.model.rotary import RotaryEmbedding


@dataclass
class FrozenParts:
    """What the head borrows from its target."""

    embed: torch.Tensor  # [target vocab, hidden]
    lm_head: torch.Tensor  # [draft vocab, hidden]: the target's LM-head rows of draft_vocab
    final_norm: torch.Tensor | None = None  # [hidden]: the target's, to start the head's from


@dataclass
class HeadStep:
    """Outputs of the rows a cached forward asked for."""

    hidden: torch.Tensor  # [rows, hidden]: fed back as the next chained input
    logits: torch.Tensor  # [rows, draft vocab] float32


class DraftHead(nn.Module):
    """EAGLE-3-style head; see the module docstring."""

    def __init__(self, config: HeadConfig, draft_vocab: torch.Tensor, frozen: FrozenParts) -> None:
        super().__init__()
        if draft_vocab.shape != (config.draft_vocab_size,):
            raise ValueError(
                f"draft_vocab has shape {tuple(draft_vocab.shape)}, "
                f"expected ({config.draft_vocab_size},)"
            )
        self.config = config
        hidden = config.hidden_size
        self.fc = nn.Linear(config.fused_size, hidden, bias=False)
        self.token_proj = nn.Linear(hidden, hidden, bias=False)
        # Both inputs are normed first (as in EAGLE-3): a top-layer hidden
        # state is ~200 times the RMS of a token embedding, which would drown it.
        self.hidden_norm = trainable_norm(hidden, config.rms_norm_eps)
        self.token_norm = trainable_norm(hidden, config.rms_norm_eps)
        self.layer = HeadLayer(config)
        self.norm = trainable_norm(hidden, config.rms_norm_eps)
        self.rope = RotaryEmbedding(RopeConfig(theta=config.rope_theta), config.head_dim)
        # draft_vocab is the head's own (saved); the borrowed weights are not.
        self.register_buffer("draft_vocab", draft_vocab.to(torch.int64))
        to_draft = torch.full((config.target_vocab_size,), -1, dtype=torch.int64)
        to_draft[draft_vocab] = torch.arange(config.draft_vocab_size)
        self.register_buffer("to_draft", to_draft, persistent=False)
        self.register_buffer("embed", frozen.embed, persistent=False)
        self.register_buffer("lm_head", frozen.lm_head, persistent=False)
        self.draft_vocab: torch.Tensor
        self.to_draft: torch.Tensor
        self.embed: torch.Tensor
        self.lm_head: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    def new_cache(self, num_slots: int, max_len: int) -> KVCache:
        c = self.config
        return KVCache(1, num_slots, max_len, c.num_kv_heads, c.head_dim, self.dtype)

    def _inputs(
        self, features: torch.Tensor, tokens: torch.Tensor, from_target: bool
    ) -> torch.Tensor:
        embedded = F.embedding(tokens, self.embed).to(features.dtype)
        if self.config.embed_scale is not None:
            embedded = embedded * self.config.embed_scale
        base = self.fc(features) if from_target else features
        return self.hidden_norm(base) + self.token_proj(self.token_norm(embedded))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., draft vocab]`` float32 logits of head outputs."""
        normed = self.norm(hidden)
        return F.linear(normed, self.lm_head.to(normed.dtype)).float()

    @torch.inference_mode()
    def forward_cached(
        self,
        features: torch.Tensor,  # [batch, max_new, fused or hidden], padded like the batch
        batch: ForwardBatch,
        cache: KVCache,
        from_target: bool,
    ) -> HeadStep:
        """Append the batch's positions to ``cache``; outputs of its logit rows.

        ``features`` are target hidden states when ``from_target``, else the
        head's own outputs of the previous positions (chaining).
        """
        for slot, end in zip(batch.slots, batch.end_positions(), strict=True):
            cache.check_room(slot, end)
        x = self._inputs(features.to(self.dtype), batch.token_ids, from_target)
        rope = self.rope(batch.positions, self.dtype)
        out = self.layer.forward_cached(x, rope, batch.attention_mask(None), batch, cache)
        for slot, end in zip(batch.slots, batch.end_positions(), strict=True):
            cache.set_length(slot, end)
        rows = out.reshape(-1, out.shape[-1]).index_select(0, batch.logit_index)
        return HeadStep(rows, self.logits(rows))

    def forward_unrolled(
        self,
        features: torch.Tensor,  # [batch, T, fused] target hidden states
        tokens: torch.Tensor,  # [batch, T] int64: the token committed at each position
        steps: int,
    ) -> list[torch.Tensor]:
        """Training-time test: ``steps`` chained drafts from every anchor.

        Entry ``k - 1`` is ``[batch, T, draft vocab]``: at anchor ``a`` the
        logits of step ``k``, which predict ``tokens[a + k]``. Step ``k``
        is fed ``tokens[a + k - 1]`` (the true token, as when every earlier
        draft was accepted: the only case in which its draft is verified).
        Anchors whose inputs run past ``T`` get padding; callers mask them.
        """
        bsz, length, _ = features.shape
        positions = torch.arange(length, device=features.device).expand(bsz, length)
        hidden = features.to(self.dtype)
        context = None
        logits = []
        for step in range(steps):
            shifted = F.pad(tokens[:, step:], (0, step))
            x = self._inputs(hidden, shifted, from_target=step == 0)
            rope = self.rope(positions + step, self.dtype)
            hidden, context = self.layer.forward_unrolled(x, rope, context)
            logits.append(self.logits(hidden))
        return logits
