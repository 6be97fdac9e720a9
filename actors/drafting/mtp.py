"""DeepSeek-V4's multi-token-prediction block as a drafter ("MTP").

The block pairs the target's final residual streams at position ``i`` with
token ``t_{i+1}`` to predict ``t_{i+2}`` (see
:mod:`specray.actors.model.v4.mtp`). As a :class:`ChainedDrafter` its cache
holds one entry per pair whose streams came from the target, entry ``j`` at
the block's own position ``j`` starting at the prompt's last token, so the
block's attention covers the stretch from there on (the target only hands
over hidden states of the rows it returns logits for). Chained steps feed
the block's own output streams with its previous draft.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from specray.actors.drafting.chained import ChainedDrafter, ChainState
from specray.actors.model.batch import ForwardBatch, SequenceInput
from specray.actors.model.v4.mtp import MTPModel, MTPOutput


class MTPDrafter(ChainedDrafter[MTPOutput]):
    """Drafts with the target checkpoint's MTP block, reading the target's
    last decoder layer (its residual streams) through ``hidden_layers``."""

    name = "mtp"

    def __init__(self, model: MTPModel, num_slots: int, max_len: int) -> None:
        self._shape = (model.streams, model.config.hidden_size)
        width = self._shape[0] * self._shape[1]
        super().__init__(model.new_cache(num_slots, max_len), width, "MTP drafter")
        self.model = model
        self.hidden_layers: tuple[int, ...] = (model.config.num_layers - 1,)

    def models(self) -> Sequence[torch.nn.Module]:
        return [self.model]

    def _feed(self, feeding: Sequence[ChainState[MTPOutput]]) -> list[MTPOutput]:
        batch = ForwardBatch.build(
            [SequenceInput(s.slot, s.pending_tokens, s.fed) for s in feeding]
        )
        streams = torch.cat([row for s in feeding for row in s.pending_hidden])
        out = self.model(batch, self.cache, streams.view(-1, *self._shape))
        rows = range(len(feeding))
        return [MTPOutput(out.logits[b : b + 1], out.streams[b : b + 1]) for b in rows]

    def _step(self, seqs: list[SequenceInput], previous: list[MTPOutput]) -> list[MTPOutput]:
        streams = torch.cat([p.streams for p in previous])
        out = self.model(ForwardBatch.build(seqs), self.cache, streams)
        return [MTPOutput(out.logits[r : r + 1], out.streams[r : r + 1]) for r in range(len(seqs))]

    def _logits(self, outputs: Sequence[MTPOutput]) -> torch.Tensor:
        return torch.cat([o.logits for o in outputs])  # [rows, vocab]
