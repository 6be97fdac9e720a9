"""Prompt lookup where the text is being copied, a draft model everywhere else.

Code edits, RAG answers and summaries copy long spans of their prompt: there
n-gram lookup drafts as well as a model and costs nothing. Free-form chat
copies little: there only a model drafts well, at a cost. A hybrid replica
holds both and decides per request and round: a lookup whose matched suffix
is at least ``min_match`` tokens long wins (up to ``lookup_tokens``, or
``num_tokens`` if more), otherwise the model proposes up to ``num_tokens``
(one batched call for all the requests that fell through). A scheduler that
prices the two paths apart asks for a model γ of 0 where a model draft
does not pay and still gets the free copies.

Both drafters track every request. The model only drafts in some rounds; it
feeds the committed tokens it has not seen on its next proposal (its cache
stays valid for what it did see), so switching costs a longer feed, never a
re-prefill.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from specray.actors.drafting.base import (
    CatchesUp,
    Drafter,
    DraftPaths,
    DraftProposal,
    DraftRequest,
    DraftUpdate,
    RunsModels,
    SharesPrefixes,
)
from specray.actors.drafting.ngram import NgramDrafter
from specray.actors.drafting.suffix.drafter import SuffixDrafter
from specray.actors.sampling.params import SamplingParams

# One- and two-token matches happen by chance in any text ("the", "):");
# from three tokens on, a match on free text is mostly a real copy.
DEFAULT_MIN_MATCH = 3


class HybridDrafter:
    """Lookup first (n-gram, or suffix trees whose match length counts as
    the n-gram size), a model (any :class:`Drafter`) as the fallback."""

    name = "hybrid"
    paths = DraftPaths(model=True, lookup=True)

    def __init__(
        self,
        lookup: NgramDrafter | SuffixDrafter,
        model: Drafter,
        min_match: int = DEFAULT_MIN_MATCH,
    ) -> None:
        low, high = (
            (1, lookup.config.max_depth - 1)
            if isinstance(lookup, SuffixDrafter)
            else (lookup.min_ngram, lookup.max_ngram)
        )
        if not low <= min_match <= high:
            raise ValueError(
                f"min_match must lie in the lookup's match lengths [{low}, {high}], got {min_match}"
            )
        self.lookup = lookup
        self.model = model
        self.min_match = min_match
        self.hidden_layers: tuple[int, ...] = model.hidden_layers
        self.lookup_proposals = 0  # request-rounds drafted by lookup
        self.model_proposals = 0  # request-rounds drafted by the model
        self._model_drafted: set[str] = set()  # requests the model drafted for last

    def start(self, request_id: str, prompt_ids: Sequence[int], sampling: SamplingParams) -> None:
        self.lookup.start(request_id, prompt_ids, sampling)
        try:
            self.model.start(request_id, prompt_ids, sampling)
        except BaseException:
            self.lookup.finish(request_id)
            raise

    def propose(self, requests: Sequence[DraftRequest]) -> list[DraftProposal]:
        proposals: list[DraftProposal | None] = []
        fallback: list[DraftRequest] = []
        for request in requests:
            found = self._look(request.request_id, request.most)
            if found is not None:
                proposals.append(found)
            else:
                proposals.append(None)
                if request.num_tokens > 0:
                    fallback.append(replace(request, lookup_tokens=0))
        modelled = iter(self.model.propose(fallback) if fallback else [])
        # Per request, not per call: calls for disjoint micro-batches interleave.
        self._model_drafted.difference_update(r.request_id for r in requests)
        self._model_drafted.update(r.request_id for r in fallback)
        self.model_proposals += len(fallback)
        self.lookup_proposals += sum(p is not None for p in proposals)
        merged = []
        for request, proposal in zip(requests, proposals, strict=True):
            if proposal is None:
                proposal = next(modelled) if request.num_tokens > 0 else DraftProposal([])
            merged.append(proposal)
        return merged

    def _look(self, request_id: str, most: int) -> DraftProposal | None:
        """The lookup's proposal when its match is long enough to trust."""
        if isinstance(self.lookup, SuffixDrafter):
            draft = self.lookup.match(request_id, most)
            if draft.token_ids and draft.match_len >= self.min_match:
                return self.lookup.proposal(draft)
            return None
        found = self.lookup.match(request_id, most)
        if found.token_ids and found.ngram_size >= self.min_match:
            return found.proposal()
        return None

    def accept(self, update: DraftUpdate) -> None:
        self.lookup.accept(update)
        # The verdict is about the last proposal: the model's only if it made it.
        if update.request_id not in self._model_drafted:
            update = replace(update, num_accepted=0)
        self._model_drafted.discard(update.request_id)
        self.model.accept(update)

    def feed_profile(self, sizes: Sequence[int]) -> list[tuple[int, float]]:
        return self.model.feed_profile(sizes) if isinstance(self.model, CatchesUp) else []

    def models(self) -> Sequence[torch.nn.Module]:
        return self.model.models() if isinstance(self.model, RunsModels) else []

    @property
    def prefix_pins(self) -> int:
        return self.model.prefix_pins if isinstance(self.model, SharesPrefixes) else 0

    def finish(self, request_id: str) -> None:
        self._model_drafted.discard(request_id)
        self.lookup.finish(request_id)
        self.model.finish(request_id)
