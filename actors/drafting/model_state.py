"""What a model drafter keeps for every request it drafts for."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specray.actors.drafting.draws import draft_generator
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
