"""A small language model with the target's tokenizer, drafting token by token.

It keeps its own KV cache. After :meth:`propose` the cache holds the
committed tokens plus the first ``γ - 1`` drafts; :meth:`accept` rolls it
back to the committed tokens it already fed (including the accepted drafts),
and the next propose feeds whatever committed tokens it has not seen yet.

With ``prefix_tokens`` > 0 its cache shares prefixes across requests as the
target's does (:mod:`specray.actors.model.prefix_cache`): a request's first
feed starts after the longest cached prefix of its tokens, and every full
block of committed tokens it feeds is offered to the cache (drafts never are).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from specray.actors.drafting.base import DraftPaths, DraftProposal, DraftRequest, DraftUpdate
from specray.actors.drafting.chain_drafts import ChainDrafts
from specray.actors.drafting.draws import draw_rows
from specray.actors.drafting.feed_profile import profile_feeds
from specray.actors.drafting.model_state import ModelDraftState
from specray.actors.drafting.slots import RequestSlots
from specray.actors.model.batch import ForwardBatch, SequenceInput
from specray.actors.model.decoder import DecoderModel
from specray.actors.model.prefix_cache import PrefixCache, PrefixHold
from specray.actors.sampling.params import SamplingParams


@dataclass
class _DraftState(ModelDraftState):
    tokens: list[int]  # committed tokens
    cached: int  # the draft cache is valid for tokens[:cached]
    fed_drafts: int = 0  # drafts of the last proposal its cache holds
    hold: PrefixHold | None = None  # its shared blocks, once it looked the prefix cache up

    @property
    def behind(self) -> int:
        """Committed tokens the draft cache has not seen."""
        return len(self.tokens) - self.cached


class DraftModelDrafter:
    """Drafts with a separate model that shares the target's vocabulary."""

    name = "draft-model"
    hidden_layers: tuple[int, ...] = ()
    paths = DraftPaths(model=True, lookup=False)

    def __init__(
        self, model: DecoderModel, num_slots: int, max_len: int, prefix_tokens: int = 0
    ) -> None:
        self.model = model
        self.cache = model.new_cache(num_slots, max_len)
        self.prefix = PrefixCache(self.cache, prefix_tokens) if prefix_tokens else None
        self._requests: RequestSlots[_DraftState] = RequestSlots(self.cache, "draft model")

    def models(self) -> Sequence[torch.nn.Module]:
        return [self.model]

    @property
    def prefix_pins(self) -> int:
        """Pins on shared blocks: 0 once no request holds any."""
        return self.prefix.num_pins if self.prefix is not None else 0

    def start(self, request_id: str, prompt_ids: Sequence[int], sampling: SamplingParams) -> None:
        self._requests.start(
            request_id, lambda slot: _DraftState(slot, sampling, list(prompt_ids), 0)
        )

    def propose(self, requests: Sequence[DraftRequest]) -> list[DraftProposal]:
        states = [self._requests[r.request_id] for r in requests]
        self._attach(requests, states)
        behind = self._catch_up(requests, states)
        # Never draft past the end of the draft cache; a request still
        # catching up drafts nothing this round.
        budgets = [
            0 if late else max(0, min(r.num_tokens, self.cache.max_len - len(s.tokens)))
            for r, s, late in zip(requests, states, behind, strict=True)
        ]
        chain = ChainDrafts(requests)
        feeds = [s.tokens[s.cached :] for s in states]
        active = [i for i, b in enumerate(budgets) if b > 0]
        fed = set(active)  # their first step feeds every committed token they had not seen
        for step in range(max(budgets, default=0)):
            active = [i for i in active if chain.tries(i, step + 1)]
            if not active:
                break
            seqs = [
                SequenceInput(states[i].slot, feeds[i], self.cache.length(states[i].slot))
                for i in active
            ]
            logits = self.model(ForwardBatch.build(seqs), self.cache).logits
            draws = draw_rows(logits, [states[i] for i in active])
            for row, i in enumerate(active):
                if chain.take(i, step + 1, draws, row, states[i].sampling.greedy):
                    feeds[i] = [draws.tokens[row]]
                else:
                    budgets[i] = step  # its cache holds this step's feed, not the dropped draft
            active = [i for i in active if budgets[i] > step + 1]
        for i, state in enumerate(states):
            # Each step after the first fed the draft before it.
            state.fed_drafts = max(len(chain.tokens[i]) + chain.dropped[i] - 1, 0)
            if i in fed:
                state.cached = len(state.tokens)
        self._share(states)
        return chain.proposals()

    def _attach(self, requests: Sequence[DraftRequest], states: Sequence[_DraftState]) -> None:
        """Before a request's first feed: start its cache from the longest
        cached prefix of its committed tokens."""
        if self.prefix is None:
            return
        for request, state in zip(requests, states, strict=True):
            if request.num_tokens > 0 and state.hold is None and state.cached == 0:
                state.hold = self.prefix.attach(state.slot, state.tokens)
                state.cached = self.prefix.length(state.hold)

    def _share(self, states: Sequence[_DraftState]) -> None:
        """Offer the full blocks of committed tokens each request has fed."""
        if self.prefix is None:
            return
        for state in states:
            if state.hold is not None:
                self.prefix.extend(state.hold, state.slot, state.tokens, state.cached)

    def _catch_up(
        self, requests: Sequence[DraftRequest], states: Sequence[_DraftState]
    ) -> list[bool]:
        """Feed ``max_feed`` committed tokens (cache only, no logits) to each
        asked request that is further behind than that; which ones were."""
        seqs, behind = [], []
        for request, state in zip(requests, states, strict=True):
            cap = request.max_feed
            late = request.num_tokens > 0 and cap is not None and state.behind > cap
            behind.append(late)
            if late:
                assert cap is not None
                chunk = state.tokens[state.cached : state.cached + cap]
                seqs.append(SequenceInput(state.slot, chunk, state.cached, num_logits=0))
                state.cached += cap
        if seqs:
            self.model(ForwardBatch.build(seqs), self.cache)
        return behind

    def accept(self, update: DraftUpdate) -> None:
        state = self._requests[update.request_id]
        # The accepted drafts among those fed stay cached.
        if state.fed_drafts:
            state.cached = len(state.tokens) + min(update.num_accepted, state.fed_drafts)
            self.cache.truncate(state.slot, state.cached)
        state.tokens.extend(update.new_token_ids)
        state.fed_drafts = 0

    def feed_profile(self, sizes: Sequence[int]) -> list[tuple[int, float]]:
        return profile_feeds(
            self.cache,
            sizes,
            lambda slot, n: self.model(
                ForwardBatch.build([SequenceInput(slot, [0] * n, 0)]), self.cache
            ),
        )

    def finish(self, request_id: str) -> None:
        state = self._requests.finish(request_id)
        if state is not None and state.hold is not None and self.prefix is not None:
            self.prefix.release(state.hold)
