"""One propose → verify → accept → roll back round for a batch of requests.

The whole speculative step, in the spirit of gpt-fast's
``speculative_decode``: ask the drafter for tokens, verify every request's
drafts in one batched target forward, keep what rejection sampling accepts,
and tell both caches where the committed sequence now ends. Stop criteria
and streaming are the caller's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from specray.actors.drafting.base import Drafter, DraftProposal, DraftRequest
from specray.actors.engine.request import RunningRequest
from specray.actors.engine.target import Target, VerifyInput, VerifyOutput
from specray.actors.sampling.logits import SamplingTensors, compute_probs
from specray.actors.sampling.rejection import DraftBatch, RejectionResult, rejection_sample


@dataclass
class RoundResult:
    new_token_ids: list[list[int]]  # per request: accepted drafts + recovered/bonus
    rejection: RejectionResult


def speculative_round(
    running: Sequence[RunningRequest], drafter: Drafter | None, target: Target
) -> RoundResult:
    # 1. Propose. Requests with γ = 0 decode target-only in the same batch.
    asks = draft_requests(running)
    proposed = dict(zip([a.request_id for a in asks], _propose(drafter, asks), strict=True))
    drafts = [proposed.get(r.request_id, DraftProposal([])) for r in running]

    # 2. Verify all drafts in one target forward. The target rolls its cache
    # back to each request's cached_len before feeding.
    hidden_layers = drafter.hidden_layers if drafter is not None else ()
    outputs = target.verify(verify_inputs(running, drafts), hidden_layers)

    # 3. Accept: lossless rejection sampling against the target.
    rejection = accept_drafts(running, drafts, outputs)

    # 4. Commit; the drafter rolls back its own state.
    for u in commit(running, drafts, outputs, rejection):
        if drafter is not None:
            drafter.accept(u.request_id, u.num_accepted, u.new_token_ids, u.target_hidden)
    return RoundResult(rejection.output_token_ids, rejection)


def draft_requests(running: Sequence[RunningRequest]) -> list[DraftRequest]:
    return [DraftRequest(r.request_id, r.gamma) for r in running if r.gamma > 0]


def verify_inputs(
    running: Sequence[RunningRequest], drafts: Sequence[DraftProposal]
) -> list[VerifyInput]:
    """Per request: where its target cache is valid, the uncached committed
    tokens and the drafts, and logits for every draft plus one."""
    return [
        VerifyInput(
            r.request_id,
            r.cached_len,
            r.tokens[r.cached_len :] + d.token_ids,
            len(d) + 1,
            argmax_only=r.sampling.greedy,
        )
        for r, d in zip(running, drafts, strict=True)
    ]


@dataclass(frozen=True)
class DraftUpdate:
    """What a drafter must hear about one request after a round."""

    request_id: str
    num_accepted: int
    new_token_ids: list[int]
    target_hidden: torch.Tensor | None  # [num_accepted + 1, hidden] or None


def commit(
    running: Sequence[RunningRequest],
    drafts: Sequence[DraftProposal],
    outputs: Sequence[VerifyOutput],
    rejection: RejectionResult,
) -> list[DraftUpdate]:
    """Append the round's tokens. The target's cache now holds every
    committed token except the newest, which the next round feeds."""
    updates = []
    for r, draft, out, new_ids, accepted in zip(
        running, drafts, outputs, rejection.output_token_ids, rejection.num_accepted, strict=True
    ):
        r.cached_len = len(r.tokens) + accepted
        r.tokens.extend(new_ids)
        r.stats.record_round(len(draft), accepted)
        r.acceptance.update(len(draft), accepted)
        # Only the accepted positions travel on, in their own storage (a view
        # would pickle every row of the verify batch into the draft's message).
        hidden = None if out.hidden_states is None else out.hidden_states[: accepted + 1].clone()
        updates.append(DraftUpdate(r.request_id, accepted, new_ids, hidden))
    return updates


def _propose(drafter: Drafter | None, asks: list[DraftRequest]) -> list[DraftProposal]:
    if drafter is None or not asks:
        return [DraftProposal([]) for _ in asks]
    proposals = drafter.propose(asks)
    return [p.clipped(a.most) for p, a in zip(proposals, asks, strict=True)]


def accept_drafts(
    running: Sequence[RunningRequest],
    drafts: Sequence[DraftProposal],
    outputs: Sequence[VerifyOutput],
) -> RejectionResult:
    draft_batch = DraftBatch.from_proposals(
        [d.token_ids for d in drafts], [d.draft_probs for d in drafts]
    )
    greedy = [r.sampling.greedy for r in running]
    rows = max(len(d) for d in drafts) + 1
    if all(greedy):
        argmax = torch.zeros(len(running), rows, dtype=torch.int64)
        for i, out in enumerate(outputs):
            argmax[i, : out.num_rows] = out.greedy_ids()
        return rejection_sample(draft_batch, None, greedy, [None] * len(running), argmax)

    counts = [out.num_rows for out in outputs]
    sampling = SamplingTensors.from_params([r.sampling for r in running]).repeat_interleave(counts)
    flat_probs = compute_probs(torch.cat([out.full_logits() for out in outputs]), sampling)
    target_probs = torch.zeros(len(running), rows, flat_probs.shape[-1])
    for i, probs in enumerate(flat_probs.split(counts)):
        target_probs[i, : probs.shape[0]] = probs
    generators = [None if r.sampling.greedy else r.generator for r in running]
    return rejection_sample(draft_batch, target_probs, greedy, generators)
