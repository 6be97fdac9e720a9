"""The DSpark drafter model: a parallel block backbone plus its two heads.

For an anchor ``x_0`` at position ``p`` (the last committed token, whose
target hidden state is not known yet) and the target's hidden states of
the positions before it, one forward drafts a whole block of ``γ``:

    H_ctx  = RMSNorm(fc([h_l1 ; ... ; h_lm]))           # per context position
    x      = embed([x_0, MASK, ..., MASK])              # γ tokens at p .. p + γ - 1
    x      = layer_i(x, K/V += layer_i's K/V of H_ctx)  # bidirectional in the block
    h      = norm(x);  U = lm_head(h)                   # base logits, one per draft
    p_k    = softmax(U_k + Markov(x_{k-1}))             # sampled left to right
    c_k    = sigmoid(confidence([h_k ; W1[x_{k-1}]]))

The embedding and LM head are the target's (DeepSpec stores copies in the
drafter's checkpoint). Weight names follow DeepSpec's ``Qwen3DSparkModel``
state dict for the dense families; the layers, rope and residual come from
the decoder's :class:`DraftFamily` (DeepSeek-V4's: :mod:`.v4_block`, its
tensors under ``mtp.*``). A family with a sliding window (V4's) hides the
context more than ``window - 1`` positions before each query.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from specray.actors.drafting.dspark.block import DraftBlock, Residual
from specray.actors.drafting.dspark.confidence import ConfidenceHead
from specray.actors.drafting.dspark.config import DSparkConfig
from specray.actors.drafting.dspark.markov import MarkovHead
from specray.actors.drafting.dspark.v4_block import family_of
from specray.actors.model.kv_cache import KVCache
from specray.actors.model.norm import RMSNorm
from specray.actors.parallel.embedding import ParallelLMHead, VocabParallelEmbedding
from specray.actors.parallel.group import SingleGroup, TPGroup
from specray.actors.parallel.linear import ColumnParallelLinear
from specray.actors.parallel.weights import WeightSource


@dataclass
class BlockOutput:
    """The backbone's output for a batch of blocks."""

    hidden: torch.Tensor  # [batch, γ, hidden]: after the final norm
    base_logits: torch.Tensor  # [batch, γ, vocab] float32: before the Markov bias


@dataclass
class TeacherForced:
    """Training-time outputs, every block fed the true tokens before each position."""

    draft_logits: torch.Tensor  # [batch, anchors, γ, vocab] float32, Markov bias included
    confidence_logits: torch.Tensor | None  # [batch, anchors, γ] float32, before the sigmoid


class DSparkModel(nn.Module):
    def __init__(
        self,
        config: DSparkConfig,
        dtype: torch.dtype = torch.float32,
        group: TPGroup | None = None,
    ) -> None:
        super().__init__()
        group = group or SingleGroup()
        d = config.decoder
        self.config = config
        self.dtype = dtype
        self.family = family_of(d)
        self.embed_tokens = VocabParallelEmbedding(d.vocab_size, d.hidden_size, group, dtype)
        # fc and its norm are small and every rank needs their full output.
        self.fc = ColumnParallelLinear(
            config.fused_size, d.hidden_size, False, SingleGroup(), dtype
        )
        self.hidden_norm = RMSNorm(d.hidden_size, d.rms_norm_eps, dtype, d.gemma_norms)
        blocks = [self.family.block(d, i, group, dtype) for i in range(d.num_layers)]
        self.layers = nn.ModuleList(blocks)  # type: ignore[arg-type]
        self.blocks: list[DraftBlock] = blocks
        self.residual: Residual = self.family.residual(d)
        self.norm = RMSNorm(d.hidden_size, d.rms_norm_eps, dtype, d.gemma_norms)
        self.lm_head = ParallelLMHead(d.vocab_size, d.hidden_size, group, dtype)
        self.rope = self.family.rope(d)
        self.markov_head = (
            MarkovHead(d.vocab_size, config.markov_rank, dtype) if config.markov_rank else None
        )
        self.confidence_head = (
            ConfidenceHead(
                d.hidden_size, config.markov_rank if config.confidence_with_markov else 0, dtype
            )
            if config.confidence_head
            else None
        )
        # Gemma scales its embeddings by sqrt(hidden), rounded to the model dtype.
        self.embed_scale = torch.tensor(d.hidden_size**0.5, dtype=dtype) if d.gemma_norms else None

    @property
    def block_size(self) -> int:
        return self.config.block_size

    def new_cache(self, num_slots: int, max_len: int) -> KVCache:
        """Context keys and values per draft layer, one slot per request,
        indexed by position."""
        d = self.config.decoder
        return KVCache(
            d.num_layers,
            num_slots,
            max_len,
            self.blocks[0].local_kv_heads,
            d.head_dim,
            self.dtype,
            self.norm.weight.device,
        )

    def load(self, source: WeightSource, borrowed: WeightSource | None = None) -> None:
        """The family's names (DeepSpec's for the dense ones). The embedding
        and LM head are read from ``borrowed`` (the target's checkpoint)
        when the drafter's lacks them, or from the target's names in its own
        checkpoint (V4: the drafter lives in the target's)."""
        prefix = self.family.prefix
        self.fc.load(source, f"{prefix}fc")
        self.hidden_norm.load(source, f"{prefix}hidden_norm")
        for i, block in enumerate(self.blocks):
            block.load(source, f"{self.family.layer_prefix}{i}")
        self.residual.load(source, prefix)
        self.norm.load(source, f"{prefix}norm")
        if self.markov_head is not None:
            self.markov_head.load(source, f"{prefix}markov_head")
        if self.confidence_head is not None:
            self.confidence_head.load(source, f"{prefix}confidence_head")
        if "embed_tokens.weight" in source and "lm_head.weight" in source:
            self.embed_tokens.load(source, "embed_tokens.weight")
            self.lm_head.load(source, "lm_head.weight")
            return
        lender = borrowed if borrowed is not None else source
        if "model.embed_tokens.weight" not in lender:
            raise ValueError("the drafter has no embedding / LM head; pass the target's weights")
        self.embed_tokens.load(lender, "model.embed_tokens.weight")
        tied = "lm_head.weight" not in lender
        self.lm_head.load(lender, "model.embed_tokens.weight" if tied else "lm_head.weight")

    # -- pieces ----------------------------------------------------------------

    def project_context(self, features: torch.Tensor) -> torch.Tensor:
        """``[..., fused]`` target hidden states to ``[..., hidden]`` context features."""
        return self.hidden_norm(self.fc(features.to(self.dtype)))

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:  # [...] -> [..., hidden]
        x = self.embed_tokens(token_ids)
        return x if self.embed_scale is None else x * self.embed_scale

    def block_ids(self, anchor_ids: torch.Tensor) -> torch.Tensor:
        """``[...]`` anchors to ``[..., γ]`` inputs: the anchor, then mask tokens."""
        ids = torch.full(
            (*anchor_ids.shape, self.block_size),
            self.config.mask_token_id,
            dtype=torch.int64,
            device=anchor_ids.device,
        )
        ids[..., 0] = anchor_ids
        return ids

    def backbone(
        self,
        token_ids: torch.Tensor,  # [batch, queries] int64: blocks, one after another
        positions: torch.Tensor,  # [batch, queries] int64
        context: list[tuple[torch.Tensor, torch.Tensor]],  # per layer [batch, kv, ctx, d] K, V
        mask: torch.Tensor,  # [batch, 1, queries, ctx + queries] bool
    ) -> torch.Tensor:  # [batch, queries, hidden], after the final norm
        x = self.residual.enter(self.embed(token_ids))
        rope = self.rope(positions, self.dtype)
        for block, (keys, values) in zip(self.blocks, context, strict=True):
            x = block(x, rope, keys, values, mask)
        return self.norm(self.residual.leave(x))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [..., hidden] -> [..., vocab]
        return self.lm_head(hidden).float()

    def markov_logits(
        self,
        base_logits: torch.Tensor,  # [..., vocab] float32
        previous_ids: torch.Tensor,  # [...] int64: the token before each position
    ) -> torch.Tensor:  # [..., vocab] float32: the logits each draft is sampled from
        if self.markov_head is None:
            return base_logits
        return base_logits + self.markov_head.bias(previous_ids)

    def confidence_logits(
        self,
        hidden: torch.Tensor,  # [..., hidden]
        previous_ids: torch.Tensor,  # [...] int64
    ) -> torch.Tensor | None:  # [...] float32, before the sigmoid; None without the head
        if self.confidence_head is None:
            return None
        embedded = (
            self.markov_head.embed(previous_ids)
            if self.markov_head is not None and self.confidence_head.with_markov
            else None
        )
        return self.confidence_head.logits(hidden, embedded)

    # -- drafting --------------------------------------------------------------

    @torch.inference_mode()
    def feed_context(
        self,
        features: torch.Tensor,  # [rows, fused] target hidden states
        slots: torch.Tensor,  # [rows] int64
        positions: torch.Tensor,  # [rows] int64: the position each row belongs to
        cache: KVCache,
    ) -> None:
        """Write every layer's context keys and values of these rows to ``cache``."""
        context = self.project_context(features)
        rope = self.rope(positions, self.dtype)
        for i, block in enumerate(self.blocks):
            keys, values = block.context_kv(context, rope)
            cache.write(i, slots, positions, keys, values)

    @torch.inference_mode()
    def draft_block(
        self,
        anchor_ids: torch.Tensor,  # [batch] int64
        anchor_positions: torch.Tensor,  # [batch] int64
        cache: KVCache,
        slots: list[int],
        context_start: torch.Tensor,  # [batch] int64: first cached context position
    ) -> BlockOutput:
        """One forward: ``γ`` base logits per request, attending to the cached
        context positions ``[context_start, anchor_position)``."""
        block = self.block_size
        offsets = torch.arange(block, device=anchor_ids.device)
        positions = anchor_positions.unsqueeze(1) + offsets  # [batch, γ]
        length = int(anchor_positions.max())
        keys = torch.arange(length, device=anchor_ids.device)
        visible = (keys >= context_start.unsqueeze(1)) & (keys < anchor_positions.unsqueeze(1))
        sees = self._in_window(visible.unsqueeze(1).expand(-1, block, -1), positions, keys)
        mask = torch.cat(
            [sees, torch.ones(len(slots), block, block, dtype=torch.bool, device=visible.device)],
            dim=-1,
        ).unsqueeze(1)
        context = [cache.read(i, slots, length) for i in range(len(self.blocks))]
        hidden = self.backbone(self.block_ids(anchor_ids), positions, context, mask)
        return BlockOutput(hidden, self.logits(hidden))

    def _in_window(
        self,
        visible: torch.Tensor,  # [batch, queries, context] bool
        positions: torch.Tensor,  # [batch, queries] int64: each query's position
        context_positions: torch.Tensor,  # [context] int64
    ) -> torch.Tensor:  # [batch, queries, context] bool
        """``visible`` less the context a sliding window hides from each query."""
        window = self.config.sliding_window
        if window is None:
            return visible
        return visible & (context_positions > positions.unsqueeze(-1) - window)

    # -- training --------------------------------------------------------------

    def teacher_forced(
        self,
        features: torch.Tensor,  # [batch, T, fused]: target hidden states at positions 0..T-1
        anchor_ids: torch.Tensor,  # [batch, anchors] int64: the token at each anchor position
        anchor_positions: torch.Tensor,  # [batch, anchors] int64, in [0, T]
        previous_ids: torch.Tensor,  # [batch, anchors, γ] int64: the true token before each draft
    ) -> TeacherForced:
        """Every anchor's block in one forward. Block ``(b, i)`` sees the
        context positions before its anchor and its own block only: what
        drafting from that anchor would see."""
        bsz, length, _ = features.shape
        anchors = anchor_positions.shape[1]
        block = self.block_size
        device = features.device
        context = self.project_context(features)
        context_rope = self.rope(
            torch.arange(length, device=device).expand(bsz, length), self.dtype
        )
        kv = [b.context_kv(context, context_rope) for b in self.blocks]
        kv = [(k.transpose(1, 2), v.transpose(1, 2)) for k, v in kv]

        offsets = torch.arange(block, device=device)
        positions = (anchor_positions.unsqueeze(-1) + offsets).reshape(bsz, anchors * block)
        query_anchor = anchor_positions.repeat_interleave(block, dim=1)  # [batch, queries]
        context_positions = torch.arange(length, device=device)
        sees_context = context_positions < query_anchor.unsqueeze(-1)
        sees_context = self._in_window(sees_context, positions, context_positions)
        query_block = torch.arange(anchors * block, device=device) // block
        sees_block = query_block.unsqueeze(1) == query_block.unsqueeze(0)  # [queries, queries]
        mask = torch.cat([sees_context, sees_block.expand(bsz, -1, -1)], dim=-1).unsqueeze(1)

        hidden = self.backbone(self.block_ids(anchor_ids).flatten(1), positions, kv, mask)
        hidden = hidden.view(bsz, anchors, block, -1)
        draft_logits = self.markov_logits(self.logits(hidden), previous_ids)
        return TeacherForced(draft_logits, self.confidence_logits(hidden, previous_ids))
