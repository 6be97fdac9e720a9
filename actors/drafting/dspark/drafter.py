"""DSpark behind the :class:`Drafter` protocol, batched over requests.

Per request the drafter keeps a context: the target hidden states of a
contiguous run of committed positions ``[context_start, context_end)``,
already turned into every draft layer's keys and values in a
position-indexed :class:`KVCache`. The anchor is the newest committed token,
at position ``context_end`` (its hidden state comes with the next round).

:meth:`DSparkDrafter.accept` queues the round's hidden-state rows (the
positions of the anchor and of the accepted drafts); the next
:meth:`DSparkDrafter.propose` feeds every request's queue in one pass, runs
one backbone forward for all requests, and samples each block left to right
with the Markov head. Draft blocks are never written to the cache, so a
rejection rolls nothing back.

The backbone always drafts its full block of ``γ = block_size`` (positions
in a block attend to each other, so a shorter block would change the
earlier drafts); a request that asks for fewer gets the first ones, and
one with a ``DraftStop`` gets them up to the first draft whose
confidence does not pay for its verification (the verify scheduler's cut).
Each proposal carries the exact distribution each token was drawn from
(after the request's sampling parameters) and, with a confidence head,
the calibrated survival estimate of each token.

The engine ships hidden states of verified positions only, so a request's
context starts at its prompt's last position: the first round drafts
nothing, and the prompt itself is never injected.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from specray.actors.drafting.base import (
    DraftPaths,
    DraftProposal,
    DraftRequest,
    DraftStopping,
    DraftUpdate,
)
from specray.actors.drafting.draws import draw_rows
from specray.actors.drafting.dspark.calibration import Calibration
from specray.actors.drafting.dspark.model import DSparkModel
from specray.actors.drafting.feed_profile import profile_feeds
from specray.actors.drafting.model_state import ModelDraftState
from specray.actors.drafting.slots import RequestSlots
from specray.actors.sampling.params import SamplingParams


@dataclass
class _Request(ModelDraftState):
    committed: int  # committed tokens (prompt + output)
    anchor: int | None = None  # the newest committed token, once a round verified
    context_start: int | None = None  # first position of the context; None: no context
    context_end: int = 0  # one past the last position fed to the cache
    pending: list[torch.Tensor] = field(default_factory=list)  # each [n, fused]

    @property
    def unfed(self) -> int:
        return sum(int(rows.shape[0]) for rows in self.pending)


class DSparkDrafter:
    """Drafts with a :class:`DSparkModel` that reads target hidden states."""

    name = "dspark"

    def __init__(
        self,
        model: DSparkModel,
        num_slots: int,
        max_len: int,
        calibration: Calibration | None = None,
    ) -> None:
        self.model = model
        self.hidden_layers: tuple[int, ...] = model.config.target_layer_ids
        # One forward drafts the whole block: γ drafts cost one model step.
        self.paths = DraftPaths(
            model=True, lookup=False, block=model.block_size, reads_prompt=False
        )
        self.calibration = calibration or Calibration.identity(model.block_size)
        if len(self.calibration.temperatures) != model.block_size:
            raise ValueError(
                f"calibration has {len(self.calibration.temperatures)} temperatures "
                f"for a block of {model.block_size}"
            )
        self.cache = model.new_cache(num_slots, max_len)
        self._requests: RequestSlots[_Request] = RequestSlots(self.cache, "DSpark drafter")

    def start(self, request_id: str, prompt_ids: Sequence[int], sampling: SamplingParams) -> None:
        self._requests.start(request_id, lambda slot: _Request(slot, sampling, len(prompt_ids)))

    @torch.inference_mode()
    def propose(self, requests: Sequence[DraftRequest]) -> list[DraftProposal]:
        states = [self._requests[r.request_id] for r in requests]
        budgets = [self._budget(s, r.num_tokens) for s, r in zip(states, requests, strict=True)]
        active = [i for i, b in enumerate(budgets) if b > 0]
        proposals = [DraftProposal([]) for _ in requests]
        if not active:
            return proposals
        chosen = [states[i] for i in active]
        self._feed(chosen)
        device = self.model.norm.weight.device
        anchor_ids = torch.tensor([s.anchor for s in chosen], dtype=torch.int64, device=device)
        out = self.model.draft_block(
            anchor_ids,
            torch.tensor([s.context_end for s in chosen], dtype=torch.int64, device=device),
            self.cache,
            [s.slot for s in chosen],
            torch.tensor([s.context_start for s in chosen], dtype=torch.int64, device=device),
        )
        wanted = [budgets[i] for i in active]
        drafted, probs, token_probs = self._sample(out.base_logits, anchor_ids, chosen, wanted)
        confidences = self._confidences(out.hidden, anchor_ids, drafted) or token_probs
        # The block is drafted whole; a stop cuts what is sent to verification.
        stopping = DraftStopping([requests[i] for i in active])
        for row, i in enumerate(active):
            keep = 0
            while keep < len(drafted[row]) and stopping.keeps(
                row, keep + 1, confidences[row][keep]
            ):
                keep += 1
            proposals[i] = DraftProposal(
                drafted[row][:keep],
                torch.stack(probs[row][:keep]) if probs[row][:keep] else None,
                confidence=confidences[row][:keep],
            )
        return proposals

    def accept(self, update: DraftUpdate) -> None:
        state = self._requests[update.request_id]
        new_token_ids = update.new_token_ids
        if not new_token_ids:
            raise ValueError("a round commits at least one token: new_token_ids is empty")
        first_position = state.committed - 1  # the position whose output is new_token_ids[0]
        state.committed += len(new_token_ids)
        state.anchor = int(new_token_ids[-1])
        target_hidden = update.hidden_rows(self.model.config.fused_size)
        if target_hidden is None:
            # A gap in the hidden states: the context is no longer contiguous.
            self._reset(state)
            return
        if state.context_start is None:
            state.context_start = state.context_end = first_position
        state.pending.append(target_hidden)

    def models(self) -> Sequence[torch.nn.Module]:
        return [self.model]

    def feed_profile(self, sizes: Sequence[int]) -> list[tuple[int, float]]:
        fused = self.model.config.fused_size
        device = self.model.norm.weight.device

        def feed(slot: int, n: int) -> None:
            self.model.feed_context(
                torch.zeros(n, fused, device=device),
                torch.full((n,), slot, dtype=torch.int64, device=device),
                torch.arange(n, device=device),
                self.cache,
            )

        return profile_feeds(self.cache, sizes, feed)

    def finish(self, request_id: str) -> None:
        self._requests.finish(request_id)

    # -- internals -------------------------------------------------------------

    def _budget(self, state: _Request, wanted: int) -> int:
        """Drafts possible now: none without context, and never past the cache."""
        if state.anchor is None or state.context_start is None:
            return 0
        if state.context_end + state.unfed > self.cache.max_len:
            return 0
        return max(0, min(wanted, self.model.block_size))

    def _reset(self, state: _Request) -> None:
        state.context_start, state.context_end, state.pending = None, 0, []

    def _feed(self, states: Sequence[_Request]) -> None:
        """One pass over every request's queued rows."""
        feeding = [s for s in states if s.pending]
        if not feeding:
            return
        device = self.model.norm.weight.device
        rows = torch.cat([torch.cat(s.pending) for s in feeding]).to(device)
        slots = torch.cat([torch.full((s.unfed,), s.slot, dtype=torch.int64) for s in feeding])
        positions = torch.cat(
            [torch.arange(s.context_end, s.context_end + s.unfed) for s in feeding]
        )
        self.model.feed_context(rows, slots.to(device), positions.to(device), self.cache)
        for s in feeding:
            s.context_end += s.unfed
            s.pending = []
            self.cache.set_length(s.slot, s.context_end)

    def _sample(
        self,
        base_logits: torch.Tensor,  # [batch, γ, vocab] float32
        anchor_ids: torch.Tensor,  # [batch] int64
        states: Sequence[_Request],
        wanted: Sequence[int],
    ) -> tuple[list[list[int]], list[list[torch.Tensor]], list[list[float]]]:
        """Left to right through the block: each position's logits get the
        Markov bias of the token drawn before it. Returns the tokens, for
        sampled requests the distribution each was drawn from, and each
        token's probability under the drafter (:func:`token_confidences`)."""
        drafted: list[list[int]] = [[] for _ in states]
        probs: list[list[torch.Tensor]] = [[] for _ in states]
        confidences: list[list[float]] = [[] for _ in states]
        previous = anchor_ids.clone()
        rows = list(range(len(states)))
        for k in range(max(wanted)):
            rows = [r for r in rows if wanted[r] > k]
            index = torch.tensor(rows, device=previous.device)
            logits = self.model.markov_logits(base_logits[index, k], previous[index])
            draws = draw_rows(logits, [states[r] for r in rows])
            for j, r in enumerate(rows):
                drafted[r].append(draws.tokens[j])
                confidences[r].append(draws.confidence[j])
                # Greedy drafts are point masses (probs None) even in a mixed batch.
                if draws.probs is not None and not states[r].sampling.greedy:
                    probs[r].append(draws.probs[j])
            previous[index] = torch.tensor(draws.tokens, device=previous.device)
        return drafted, probs, confidences

    def _confidences(
        self,
        hidden: torch.Tensor,  # [batch, γ, hidden]
        anchor_ids: torch.Tensor,  # [batch] int64
        drafted: Sequence[list[int]],
    ) -> list[list[float]] | None:
        """Calibrated ``c_k`` of each drafted token: read from the backbone at
        position ``k`` and the token before it."""
        if self.model.confidence_head is None:
            return None
        block = hidden.shape[1]
        previous = anchor_ids.unsqueeze(1).repeat(1, block)
        for r, tokens in enumerate(drafted):
            if len(tokens) > 1:
                previous[r, 1 : len(tokens)] = torch.tensor(tokens[:-1], device=previous.device)
        logits = self.model.confidence_logits(hidden, previous)
        assert logits is not None
        calibrated = self.calibration.confidences(logits)
        return [calibrated[r, : len(tokens)].tolist() for r, tokens in enumerate(drafted)]
