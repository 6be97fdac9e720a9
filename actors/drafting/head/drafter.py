"""The draft head behind the :class:`Drafter` protocol, batched over
requests: a :class:`ChainedDrafter` (see there for the cache and rollback)
whose model is the trained :class:`DraftHead` over a reduced vocabulary."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from specray.actors.drafting.chained import ChainedDrafter, ChainState
from specray.actors.drafting.feed_profile import profile_feeds
from specray.actors.drafting.head.model import DraftHead, HeadStep
from specray.actors.model.batch import ForwardBatch, SequenceInput
from specray.actors.model.kv_cache import KVCache


class HeadDrafter(ChainedDrafter[HeadStep]):
    """Drafts with a trained :class:`DraftHead` that reads target hidden states."""

    name = "head"
    cache: KVCache

    def __init__(self, head: DraftHead, num_slots: int, max_len: int) -> None:
        super().__init__(head.new_cache(num_slots, max_len), head.config.fused_size, "draft head")
        self.head = head
        self.hidden_layers: tuple[int, ...] = tuple(head.config.hidden_layers)

    def models(self) -> Sequence[torch.nn.Module]:
        return [self.head]

    def feed_profile(self, sizes: Sequence[int]) -> list[tuple[int, float]]:
        fused = self.head.config.fused_size

        def feed(slot: int, n: int) -> None:
            batch = ForwardBatch.build([SequenceInput(slot, [0] * n, 0)])
            self.head.forward_cached(torch.zeros(1, n, fused), batch, self.cache, from_target=True)

        return profile_feeds(self.cache, sizes, feed)

    def _feed(self, feeding: Sequence[ChainState[HeadStep]]) -> list[HeadStep]:
        seqs = [SequenceInput(s.slot, s.pending_tokens, s.fed) for s in feeding]
        width = max(len(s.pending_tokens) for s in feeding)
        features = torch.zeros(len(feeding), width, self.head.config.fused_size)
        for b, s in enumerate(feeding):
            rows = torch.cat(s.pending_hidden)
            features[b, : rows.shape[0]] = rows.float()
        out = self.head.forward_cached(
            features, ForwardBatch.build(seqs), self.cache, from_target=True
        )
        return [HeadStep(out.hidden[b : b + 1], out.logits[b : b + 1]) for b in range(len(seqs))]

    def _step(self, seqs: list[SequenceInput], previous: list[HeadStep]) -> list[HeadStep]:
        features = torch.stack([p.hidden for p in previous])  # [rows, 1, hidden]
        out = self.head.forward_cached(
            features, ForwardBatch.build(seqs), self.cache, from_target=False
        )
        return [HeadStep(out.hidden[r : r + 1], out.logits[r : r + 1]) for r in range(len(seqs))]

    def _logits(self, outputs: Sequence[HeadStep]) -> torch.Tensor:
        return torch.cat([o.logits for o in outputs])  # [rows, draft vocab]

    def _vocab(self) -> tuple[torch.Tensor, int]:
        return self.head.draft_vocab, self.head.config.target_vocab_size
