"""DeepSeek-V4's multi-token-prediction block as a drafter ("MTP").

The block pairs the target's final residual streams at position ``i`` with
token ``t_{i+1}`` to predict ``t_{i+2}`` (see
:mod:`specray.actors.model.v4.mtp`). Its cache holds one entry per pair it
has seen whose streams came from the target (``fed`` of them); entry ``j``
sits at the block's own position ``j``, starting at the prompt's last token,
so the block's attention covers the stretch from there on (the target only
hands over hidden states of the rows it returns logits for). A request's
first round therefore drafts nothing.

:meth:`MTPDrafter.accept` queues the round's (target streams, committed
token) pairs; the next :meth:`MTPDrafter.propose` feeds them in one batched
forward and drafts from the last row, then chains ``γ - 1`` one-token steps
that feed the block's own output streams with its previous draft. Those
chained entries sit past ``fed``; ``accept`` truncates them away and the
accepted tokens come back with the target's real streams.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from specray.actors.drafting.base import DraftPaths, DraftProposal, DraftRequest
from specray.actors.drafting.draws import draft_generator, draw_tokens
from specray.actors.model.batch import ForwardBatch, SequenceInput
from specray.actors.model.v4.mtp import MTPModel, MTPOutput
from specray.actors.sampling.logits import SamplingTensors, compute_probs
from specray.actors.sampling.params import SamplingParams


@dataclass
class _MTPState:
    slot: int
    sampling: SamplingParams
    generator: torch.Generator | None
    fed: int = 0  # cache entries whose streams came from the target
    pending_streams: list[torch.Tensor] = field(default_factory=list)  # each [n, streams, hidden]
    pending_tokens: list[int] = field(default_factory=list)
    last: MTPOutput | None = None  # the block's output at entry fed - 1 (one row)


class MTPDrafter:
    """Drafts with the target checkpoint's MTP block, reading the target's
    last decoder layer (its residual streams) through ``hidden_layers``."""

    name = "mtp"
    paths = DraftPaths(model=True, lookup=False)

    def __init__(self, model: MTPModel, num_slots: int, max_len: int) -> None:
        self.model = model
        self.hidden_layers: tuple[int, ...] = (model.config.num_layers - 1,)
        self.cache = model.new_cache(num_slots, max_len)
        self._shape = (model.streams, model.config.hidden_size)
        self._states: dict[str, _MTPState] = {}

    def start(self, request_id: str, prompt_ids: Sequence[int], sampling: SamplingParams) -> None:
        if request_id in self._states:
            raise ValueError(f"request {request_id!r} is already being drafted")
        self._states[request_id] = _MTPState(
            self.cache.allocate(), sampling, draft_generator(sampling)
        )

    def propose(self, requests: Sequence[DraftRequest]) -> list[DraftProposal]:
        states = [self._state(r.request_id) for r in requests]
        budgets = [self._budget(s, r.num_tokens) for s, r in zip(states, requests, strict=True)]
        active = [i for i, b in enumerate(budgets) if b > 0]
        self._feed_pending([states[i] for i in active])
        drafted: list[list[int]] = [[] for _ in states]
        probs: list[list[torch.Tensor]] = [[] for _ in states]
        outputs: dict[int, MTPOutput] = {}
        for i in active:
            last = states[i].last
            assert last is not None  # a budget needs a fed entry
            outputs[i] = last
        for step in range(max(budgets, default=0)):
            if step > 0:
                outputs = self._chain(states, active, drafted, outputs, step)
            chosen = [states[i] for i in active]
            tokens, token_probs = self._sample([outputs[i] for i in active], chosen)
            for row, i in enumerate(active):
                drafted[i].append(tokens[row])
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
        if target_hidden is None:
            # A gap in the target's streams: the block's context is no longer
            # contiguous, so restart it.
            self.cache.truncate(state.slot, 0)
            state.fed, state.last = 0, None
            state.pending_streams, state.pending_tokens = [], []
            return
        if target_hidden.shape != (len(new_token_ids), self._shape[0] * self._shape[1]):
            raise ValueError(
                f"target_hidden has shape {tuple(target_hidden.shape)}, expected "
                f"({len(new_token_ids)}, {self._shape[0] * self._shape[1]})"
            )
        self.cache.truncate(state.slot, state.fed)  # drop the chained drafts
        state.pending_streams.append(target_hidden.view(-1, *self._shape))
        state.pending_tokens.extend(int(t) for t in new_token_ids)

    def finish(self, request_id: str) -> None:
        state = self._states.pop(request_id, None)
        if state is not None:
            self.cache.free(state.slot)

    # -- internals -------------------------------------------------------------

    def _state(self, request_id: str) -> _MTPState:
        try:
            return self._states[request_id]
        except KeyError:
            raise KeyError(f"MTP drafter has no request {request_id!r}") from None

    def _budget(self, state: _MTPState, wanted: int) -> int:
        """Drafts possible now: none before any target streams, never past the cache."""
        if state.last is None and not state.pending_tokens:
            return 0
        room = self.cache.max_len - state.fed - len(state.pending_tokens) + 1
        return max(0, min(wanted, room))

    def _feed_pending(self, states: Sequence[_MTPState]) -> None:
        """One forward over every request's queued (streams, token) pairs."""
        feeding = [s for s in states if s.pending_tokens]
        if not feeding:
            return
        batch = ForwardBatch.build(
            [SequenceInput(s.slot, s.pending_tokens, s.fed) for s in feeding]
        )
        streams = torch.cat([row for s in feeding for row in s.pending_streams])
        out = self.model(batch, self.cache, streams)
        for b, s in enumerate(feeding):
            s.fed += len(s.pending_tokens)
            s.last = MTPOutput(out.logits[b : b + 1], out.streams[b : b + 1])
            s.pending_streams, s.pending_tokens = [], []

    def _chain(
        self,
        states: Sequence[_MTPState],
        active: Sequence[int],
        drafted: Sequence[list[int]],
        previous: dict[int, MTPOutput],
        step: int,
    ) -> dict[int, MTPOutput]:
        """Feed each active request's last draft with the block's previous output."""
        seqs = [
            SequenceInput(states[i].slot, [drafted[i][-1]], states[i].fed + step - 1)
            for i in active
        ]
        streams = torch.cat([previous[i].streams for i in active])
        out = self.model(ForwardBatch.build(seqs), self.cache, streams)
        return {
            i: MTPOutput(out.logits[r : r + 1], out.streams[r : r + 1])
            for r, i in enumerate(active)
        }

    def _sample(
        self, outputs: Sequence[MTPOutput], states: Sequence[_MTPState]
    ) -> tuple[list[int], torch.Tensor | None]:
        logits = torch.cat([o.logits for o in outputs])  # [rows, vocab]
        if all(s.sampling.greedy for s in states):
            return logits.argmax(-1).tolist(), None
        probs = compute_probs(logits, SamplingTensors.from_params([s.sampling for s in states]))
        return draw_tokens(probs, [s.generator for s in states]), probs
