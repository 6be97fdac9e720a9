"""A structured request's grammar inside a round: its drafts end at the
first token the grammar forbids, and acceptance samples from the target's
logits with the forbidden tokens masked out."""

from __future__ import annotations

from specray.actors.drafting.base import DraftProposal
from specray.actors.engine.request import RunningRequest
from specray.actors.engine.target import VerifyOutput
from specray.actors.sampling.grammar import mask_logits


def constrain_draft(run: RunningRequest, draft: DraftProposal) -> DraftProposal:
    """The draft cut at the first token the request's grammar forbids (a
    tree's main chain: a grammar follows one sequence)."""
    if run.grammar is None or not len(draft):
        return draft
    chain = draft.main_chain()
    return chain.clipped(run.grammar.clip(chain.token_ids))


def constrain_output(run: RunningRequest, draft: DraftProposal, out: VerifyOutput) -> VerifyOutput:
    """The target's logits with what the request's grammar forbids at each
    position masked out: the distribution acceptance then samples from."""
    if run.grammar is None:
        return out
    allowed = run.grammar.masks(draft.token_ids)
    return VerifyOutput(mask_logits(out.full_logits(), allowed), out.hidden_states)
