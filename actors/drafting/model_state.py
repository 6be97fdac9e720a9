"""What a model drafter keeps for every request it drafts for, and how it
draws one token per row for a batch of them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from specray.actors.drafting.draws import draft_generator, draw_tokens
from specray.actors.sampling.logits import SamplingTensors, compute_probs
from specray.actors.sampling.params import SamplingParams


@dataclass
class ModelDraftState:
    """A request's cache slot, its sampling parameters and its own drafting
    stream (:func:`draft_generator`: None for a greedy request)."""

    slot: int
    sampling: SamplingParams
    generator: torch.Generator | None = field(init=False)

    def __post_init__(self) -> None:
        self.generator = draft_generator(self.sampling)


def sample_rows(
    logits: torch.Tensor,  # [rows, vocab] float32
    states: Sequence[ModelDraftState],  # the request of each row
) -> tuple[list[int], torch.Tensor | None]:
    """One token per row under its request's sampling parameters, and the
    distributions they were drawn from ([rows, vocab]); None when every row
    is greedy, since an argmax draws from none."""
    if all(s.sampling.greedy for s in states):
        return logits.argmax(-1).tolist(), None
    probs = compute_probs(logits, SamplingTensors.from_params([s.sampling for s in states]))
    return draw_tokens(probs, [s.generator for s in states]), probs
