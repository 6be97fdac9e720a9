"""Random draws of a model drafter: its own seeded stream per request, and
one token per row of its draft distribution."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from specray.actors.sampling.logits import SamplingTensors, compute_probs, make_generator
from specray.actors.sampling.params import SamplingParams

# The drafter's random stream is derived from the request seed but distinct
# from the target's, so the two never consume each other's draws.
DRAFT_SEED_OFFSET = 0x5EED


def draft_generator(sampling: SamplingParams) -> torch.Generator | None:
    """The request's drafting stream; None for greedy requests, which draw nothing."""
    if sampling.greedy:
        return None
    seed = sampling.seed if sampling.seed is not None else 0
    return make_generator(seed + DRAFT_SEED_OFFSET)


def draw_tokens(
    draft_probs: torch.Tensor,  # [rows, vocab]
    generators: Sequence[torch.Generator | None],  # per row; None: greedy (argmax)
) -> list[int]:
    return [
        int(draft_probs[row].argmax())
        if generator is None
        else int(torch.multinomial(draft_probs[row], 1, generator=generator))
        for row, generator in enumerate(generators)
    ]


def token_confidences(
    logits: torch.Tensor,  # [rows, vocab] the drafter's raw logits
    token_ids: Sequence[int],  # [rows] the token drawn per row, as columns of ``logits``
) -> list[float]:
    """Each drawn token's probability under the drafter's own distribution
    (temperature 1, nothing cut): its estimate that the target accepts it."""
    rows = torch.arange(len(token_ids))
    probs = logits.float().softmax(-1)
    return probs[rows, torch.tensor(token_ids, dtype=torch.long)].tolist()


class Drawing(Protocol):
    """A request as a model drafter draws for it."""

    sampling: SamplingParams
    generator: torch.Generator | None  # :func:`draft_generator`


@dataclass
class RowDraws:
    """One drawn token per row, and what the round needs to know of it."""

    tokens: list[int]
    # [rows, vocab]: the distributions drawn from; None when every row is
    # greedy, since an argmax draws from none.
    probs: torch.Tensor | None
    confidence: list[float]  # :func:`token_confidences` of each token


def draw_rows(
    logits: torch.Tensor,  # [rows, vocab] float32, the drafter's raw logits
    states: Sequence[Drawing],  # the request of each row
) -> RowDraws:
    """One token per row under its request's sampling parameters."""
    if all(s.sampling.greedy for s in states):
        tokens = logits.argmax(-1).tolist()
        return RowDraws(tokens, None, token_confidences(logits, tokens))
    probs = compute_probs(logits, SamplingTensors.from_params([s.sampling for s in states]))
    tokens = draw_tokens(probs, [s.generator for s in states])
    return RowDraws(tokens, probs, token_confidences(logits, tokens))
