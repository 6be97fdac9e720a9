"""The draft head behind the :class:`Drafter` protocol, batched over requests.

Per request the head's cache holds one entry per position whose target
hidden state it has seen (``fed``), starting at the prompt's last token: a
request's first round drafts nothing, since no hidden state exists yet.
:meth:`HeadDrafter.accept` queues the round's committed (hidden state,
token) pairs; the next :meth:`HeadDrafter.propose` feeds them in one batched
forward, then chains ``γ - 1`` one-token steps on the head's own outputs.
Those chained entries sit past ``fed`` in the cache; rolling them back is
``truncate(fed)``, and accepted drafts are re-fed with the target's real
hidden states, which are better inputs than the head's guesses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from specray.actors.drafting.base import DraftPaths, DraftProposal, DraftRequest
from specray.actors.drafting.draws import draft_generator, draw_tokens
from specray.actors.drafting.feed_profile import profile_feeds
from specray.actors.drafting.head.model import DraftHead, HeadStep
from specray.actors.model.batch import ForwardBatch, SequenceInput
from specray.actors.sampling.logits import SamplingTensors, compute_probs
from specray.actors.sampling.params import SamplingParams


@dataclass
class _HeadState:
    slot: int
    sampling: SamplingParams
    generator: torch.Generator | None
    fed: int = 0  # cache entries backed by target hidden states
    pending_hidden: list[torch.Tensor] = field(default_factory=list)  # each [n, fused]
    pending_tokens: list[int] = field(default_factory=list)
    last: HeadStep | None = None  # output at position fed - 1 (one row)


class HeadDrafter:
    """Drafts with a trained :class:`DraftHead` that reads target hidden states."""

    name = "head"

    def __init__(self, head: DraftHead, num_slots: int, max_len: int) -> None:
        self.head = head
        self.hidden_layers: tuple[int, ...] = tuple(head.config.hidden_layers)
        self.paths = DraftPaths(model=True, lookup=False)
        self.cache = head.new_cache(num_slots, max_len)
        self._states: dict[str, _HeadState] = {}

    def start(self, request_id: str, prompt_ids: Sequence[int], sampling: SamplingParams) -> None:
        if request_id in self._states:
            raise ValueError(f"request {request_id!r} is already being drafted")
        self._states[request_id] = _HeadState(
            self.cache.allocate(), sampling, draft_generator(sampling)
        )

    def propose(self, requests: Sequence[DraftRequest]) -> list[DraftProposal]:
        states = [self._state(r.request_id) for r in requests]
        budgets = [self._budget(s, r.num_tokens) for s, r in zip(states, requests, strict=True)]
        active = [i for i, b in enumerate(budgets) if b > 0]
        self._feed_pending([states[i] for i in active])
        drafted: list[list[int]] = [[] for _ in states]
        probs: list[list[torch.Tensor]] = [[] for _ in states]
        outputs: dict[int, HeadStep] = {}
        for i in active:
            last = states[i].last
            assert last is not None  # a budget needs a fed position
            outputs[i] = last
        for step in range(max(budgets, default=0)):
            if step > 0:
                outputs = self._chain(states, active, drafted, outputs, step)
            chosen = [states[i] for i in active]
            tokens, token_probs = self._sample([outputs[i] for i in active], chosen)
            for row, i in enumerate(active):
                drafted[i].append(tokens[row])
                # Greedy drafts are point masses (probs None) even in a mixed batch.
                if token_probs is not None and not states[i].sampling.greedy:
                    probs[i].append(token_probs[row])
            active = [i for i in active if budgets[i] > step + 1]
        return [
            DraftProposal(ids, torch.stack(p) if p else None)
            for ids, p in zip(drafted, probs, strict=True)
        ]

    def accept(
        self,
        request_id: str,
        num_accepted: int,
        new_token_ids: Sequence[int],
        target_hidden: torch.Tensor | None = None,
    ) -> None:
        state = self._state(request_id)
        if not 0 <= num_accepted <= len(new_token_ids):
            raise ValueError(
                f"num_accepted={num_accepted} out of range for {len(new_token_ids)} new tokens"
            )
        if target_hidden is None:
            # A gap in the hidden states (e.g. a target that was not asked for
            # them): the head's context is no longer contiguous, so restart it.
            self._reset(state)
            return
        if target_hidden.shape != (len(new_token_ids), self.head.config.fused_size):
            raise ValueError(
                f"target_hidden has shape {tuple(target_hidden.shape)}, expected "
                f"({len(new_token_ids)}, {self.head.config.fused_size})"
            )
        self.cache.truncate(state.slot, state.fed)  # drop the chained drafts
        state.pending_hidden.append(target_hidden)
        state.pending_tokens.extend(int(t) for t in new_token_ids)

    def feed_profile(self, sizes: Sequence[int]) -> list[tuple[int, float]]:
        fused = self.head.config.fused_size

        def feed(slot: int, n: int) -> None:
            batch = ForwardBatch.build([SequenceInput(slot, [0] * n, 0)])
            self.head.forward_cached(torch.zeros(1, n, fused), batch, self.cache, from_target=True)

        return profile_feeds(self.cache, sizes, feed)

    def finish(self, request_id: str) -> None:
        state = self._states.pop(request_id, None)
        if state is not None:
            self.cache.free(state.slot)

    # -- internals -------------------------------------------------------------

    def _state(self, request_id: str) -> _HeadState:
        try:
            return self._states[request_id]
        except KeyError:
            raise KeyError(f"draft head has no request {request_id!r}") from None

    def _budget(self, state: _HeadState, wanted: int) -> int:
        """Drafts possible now: none before any hidden state, and never past the cache."""
        if state.last is None and not state.pending_tokens:
            return 0
        room = self.cache.max_len - state.fed - len(state.pending_tokens) + 1
        return max(0, min(wanted, room))

    def _reset(self, state: _HeadState) -> None:
        self.cache.truncate(state.slot, 0)
        state.fed, state.last = 0, None
        state.pending_hidden, state.pending_tokens = [], []

    def _feed_pending(self, states: Sequence[_HeadState]) -> None:
        """One forward over every request's queued target positions."""
        feeding = [s for s in states if s.pending_tokens]
        if not feeding:
            return
        seqs = [SequenceInput(s.slot, s.pending_tokens, s.fed) for s in feeding]
        batch = ForwardBatch.build(seqs)
        width = max(len(s.pending_tokens) for s in feeding)
        features = torch.zeros(len(feeding), width, self.head.config.fused_size)
        for b, s in enumerate(feeding):
            rows = torch.cat(s.pending_hidden)
            features[b, : rows.shape[0]] = rows.float()
        out = self.head.forward_cached(features, batch, self.cache, from_target=True)
        for b, s in enumerate(feeding):
            s.fed += len(s.pending_tokens)
            s.last = HeadStep(out.hidden[b : b + 1], out.logits[b : b + 1])
            s.pending_hidden, s.pending_tokens = [], []

    def _chain(
        self,
        states: Sequence[_HeadState],
        active: Sequence[int],
        drafted: Sequence[list[int]],
        previous: dict[int, HeadStep],
        step: int,
    ) -> dict[int, HeadStep]:
        """Feed each active request's last draft with the head's previous output."""
        seqs = [
            SequenceInput(states[i].slot, [drafted[i][-1]], states[i].fed + step - 1)
            for i in active
        ]
        features = torch.stack([previous[i].hidden for i in active])  # [rows, 1, hidden]
        out = self.head.forward_cached(
            features, ForwardBatch.build(seqs), self.cache, from_target=False
        )
        return {
            i: HeadStep(out.hidden[r : r + 1], out.logits[r : r + 1]) for r, i in enumerate(active)
        }

    def _sample(
        self, outputs: Sequence[HeadStep], states: Sequence[_HeadState]
    ) -> tuple[list[int], torch.Tensor | None]:
        """One token per row from the head's distribution (after the request's
        sampling parameters), and that distribution over the full vocabulary
        unless every row is greedy."""
        logits = torch.cat([o.logits for o in outputs])  # [rows, draft vocab]
        vocab = self.head.draft_vocab
        if all(s.sampling.greedy for s in states):
            return vocab[logits.argmax(-1)].tolist(), None
        full = torch.full((logits.shape[0], self.head.config.target_vocab_size), -torch.inf)
        full[:, vocab] = logits
        probs = compute_probs(full, SamplingTensors.from_params([s.sampling for s in states]))
        return draw_tokens(probs, [s.generator for s in states]), probs
