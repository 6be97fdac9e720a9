"""What one propose call of a drafter that steps token by token has made:
per request, the drafts its stop rule kept, the distributions they were
drawn from and their confidences."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from specray.actors.drafting.base import DraftProposal, DraftRequest, DraftStopping
from specray.actors.drafting.draws import RowDraws


class ChainDrafts(DraftStopping):
    """Each request's chain so far, grown a step at a time by :meth:`take`."""

    def __init__(self, requests: Sequence[DraftRequest]) -> None:
        super().__init__(requests)
        self.tokens: list[list[int]] = [[] for _ in requests]
        self._probs: list[list[torch.Tensor]] = [[] for _ in requests]
        self._confidence: list[list[float]] = [[] for _ in requests]

    def take(self, index: int, depth: int, draws: RowDraws, row: int, greedy: bool) -> bool:
        """Whether request ``index`` keeps row ``row`` of ``draws`` as its
        draft ``depth`` (:meth:`DraftStopping.keeps`); kept, it is added."""
        if not self.keeps(index, depth, draws.confidence[row]):
            return False
        self.tokens[index].append(draws.tokens[row])
        self._confidence[index].append(draws.confidence[row])
        # Greedy drafts are point masses (probs None) even in a mixed batch.
        if draws.probs is not None and not greedy:
            self._probs[index].append(draws.probs[row])
        return True

    def proposals(self) -> list[DraftProposal]:
        return [
            DraftProposal(ids, torch.stack(p) if p else None, confidence=c or None, dropped=n)
            for ids, p, c, n in zip(
                self.tokens, self._probs, self._confidence, self.dropped, strict=True
            )
        ]
