"""Drafters that read the target's hidden states and chain one-token steps
on their own outputs: the trained draft head and DeepSeek-V4's MTP block.

Per request the drafter's cache holds one entry per position whose target
hidden state it has seen (``fed``), starting at the prompt's last token, so a
request's first round drafts nothing. :meth:`ChainedDrafter.accept` queues
the round's committed (hidden state, token) pairs; the next
:meth:`ChainedDrafter.propose` feeds them in one batched forward, drafts from
the last row, then chains ``γ - 1`` one-token steps on the drafter's own
outputs. Those chained entries sit past ``fed`` in the cache; rolling them
back is ``truncate(fed)``, and accepted drafts come back with the target's
real hidden states, which are better inputs than the drafter's guesses.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch

from specray.actors.drafting.base import DraftPaths, DraftProposal, DraftRequest, DraftUpdate
from specray.actors.drafting.chain_drafts import ChainDrafts
from specray.actors.drafting.draws import RowDraws, draft_generator, draw_rows
from specray.actors.drafting.slots import RequestSlots
from specray.actors.model.batch import SequenceInput
from specray.actors.model.kv_cache import SlotCache
from specray.actors.sampling.params import SamplingParams

OutputT = TypeVar("OutputT")


@dataclass
class ChainState(Generic[OutputT]):
    slot: int
    sampling: SamplingParams
    generator: torch.Generator | None
    fed: int = 0  # cache entries backed by target hidden states
    pending_hidden: list[torch.Tensor] = field(default_factory=list)  # each [n, hidden_width]
    pending_tokens: list[int] = field(default_factory=list)
    last: OutputT | None = None  # the drafter's output at entry fed - 1 (one row)


class ChainedDrafter(ABC, Generic[OutputT]):
    """The :class:`Drafter` protocol for a model that is fed target hidden
    states and then chained on its own; subclasses run the model."""

    name: str
    hidden_layers: tuple[int, ...]
    paths = DraftPaths(model=True, lookup=False, reads_prompt=False)

    def __init__(self, cache: SlotCache, hidden_width: int, owner: str) -> None:
        self.cache = cache
        self._hidden_width = hidden_width  # columns of one committed row's target_hidden
        self._requests: RequestSlots[ChainState[OutputT]] = RequestSlots(cache, owner)

    @abstractmethod
    def _feed(self, feeding: Sequence[ChainState[OutputT]]) -> list[OutputT]:
        """One forward over each request's queued (hidden, token) pairs; the
        output at each request's last pair."""

    @abstractmethod
    def _step(self, seqs: list[SequenceInput], previous: list[OutputT]) -> list[OutputT]:
        """One chained step: each sequence's last draft token, fed with the
        drafter's previous output for it."""

    @abstractmethod
    def _logits(self, outputs: Sequence[OutputT]) -> torch.Tensor:
        """[rows, vocab] logits of the outputs, over :meth:`_vocab`'s ids."""

    def _vocab(self) -> tuple[torch.Tensor, int] | None:
        """For a reduced draft vocabulary: the target id of each logit column
        and the target's vocabulary size. None when logits cover it all."""
        return None

    def start(self, request_id: str, prompt_ids: Sequence[int], sampling: SamplingParams) -> None:
        self._requests.start(
            request_id, lambda slot: ChainState(slot, sampling, draft_generator(sampling))
        )

    def propose(self, requests: Sequence[DraftRequest]) -> list[DraftProposal]:
        states = [self._requests[r.request_id] for r in requests]
        budgets = [self._budget(s, r.num_tokens) for s, r in zip(states, requests, strict=True)]
        active = [i for i, b in enumerate(budgets) if b > 0]
        self._feed_pending([states[i] for i in active])
        chain = ChainDrafts(requests)
        outputs: dict[int, OutputT] = {}
        for i in active:
            last = states[i].last
            assert last is not None  # a budget needs a fed entry
            outputs[i] = last
        for step in range(max(budgets, default=0)):
            active = [i for i in active if chain.tries(i, step + 1)]
            if not active:
                break
            if step > 0:
                seqs = [
                    SequenceInput(states[i].slot, [chain.tokens[i][-1]], states[i].fed + step - 1)
                    for i in active
                ]
                stepped = self._step(seqs, [outputs[i] for i in active])
                outputs = dict(zip(active, stepped, strict=True))
            draws = self._sample([outputs[i] for i in active], [states[i] for i in active])
            for row, i in enumerate(active):
                if not chain.take(i, step + 1, draws, row, states[i].sampling.greedy):
                    budgets[i] = step
            active = [i for i in active if budgets[i] > step + 1]
        return chain.proposals()

    def accept(self, update: DraftUpdate) -> None:
        state = self._requests[update.request_id]
        target_hidden = update.hidden_rows(self._hidden_width)
        if target_hidden is None:
            # A gap in the hidden states (e.g. a target that was not asked for
            # them): the context is no longer contiguous, so restart it.
            self._reset(state)
            return
        self.cache.truncate(state.slot, state.fed)  # drop the chained drafts
        state.pending_hidden.append(target_hidden)
        state.pending_tokens.extend(int(t) for t in update.new_token_ids)

    def finish(self, request_id: str) -> None:
        self._requests.finish(request_id)

    def _budget(self, state: ChainState[OutputT], wanted: int) -> int:
        """Drafts possible now: none before any hidden state, and never past the cache."""
        if state.last is None and not state.pending_tokens:
            return 0
        room = self.cache.max_len - state.fed - len(state.pending_tokens) + 1
        return max(0, min(wanted, room))

    def _reset(self, state: ChainState[OutputT]) -> None:
        self.cache.truncate(state.slot, 0)
        state.fed, state.last = 0, None
        state.pending_hidden, state.pending_tokens = [], []

    def _feed_pending(self, states: Sequence[ChainState[OutputT]]) -> None:
        feeding = [s for s in states if s.pending_tokens]
        if not feeding:
            return
        for state, last in zip(feeding, self._feed(feeding), strict=True):
            state.fed += len(state.pending_tokens)
            state.last = last
            state.pending_hidden, state.pending_tokens = [], []

    def _sample(
        self, outputs: Sequence[OutputT], states: Sequence[ChainState[OutputT]]
    ) -> RowDraws:
        """One token per row from the drafter's distribution (after the
        request's sampling parameters), over the full vocabulary unless every
        row is greedy (:func:`draw_rows`)."""
        logits = self._logits(outputs)  # [rows, vocab]
        vocab = self._vocab()
        greedy = all(s.sampling.greedy for s in states)
        if vocab is not None and not greedy:
            full = torch.full((logits.shape[0], vocab[1]), -torch.inf)
            full[:, vocab[0]] = logits
            logits = full
        draws = draw_rows(logits, states)
        if vocab is not None and greedy:
            draws.tokens = vocab[0][draws.tokens].tolist()
        return draws
