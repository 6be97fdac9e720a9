"""Requests as the γ scheduler sees them, for its tests."""

from __future__ import annotations

from specray.actors.drafting.base import DraftPaths
from specray.actors.engine.gamma import SurvivalEstimate
from specray.actors.engine.lifecycle import start_request
from specray.actors.engine.request import DraftState, GenerationRequest, RunningRequest
from specray.actors.sampling.params import StoppingCriteria


def decoding_run(
    request_id: str,
    backlog: int,
    alpha: float,
    lookup_alpha: float = 0.5,
    max_tokens: int = 256,
    tested: float = 1000.0,
    max_gamma: int = 4,
) -> RunningRequest:
    """A request past its first token whose model acceptance is ``alpha``,
    shown by ``tested`` drafts (many: the scheduler is not optimistic about
    it), drafting at most ``max_gamma`` tokens a round."""
    stopping = StoppingCriteria(max_tokens=max_tokens)
    draft = DraftState(
        lookup_acceptance=SurvivalEstimate.with_prior(lookup_alpha),
        model_acceptance=SurvivalEstimate.with_prior(alpha, tested=tested),
    )
    run = start_request(
        GenerationRequest(request_id, [3] * backlog, stopping=stopping), (), None, max_gamma, draft
    )
    run.output_ids.append(3)  # decoding: past its first token (the prompt's last here)
    run.cached_len = len(run.tokens) - 1  # the target verifies one token each
    run.target = 0
    draft.attach(0, backlog)
    return run


MODEL = DraftPaths(model=True, lookup=False)
