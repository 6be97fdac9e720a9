"""Isolated costs for the benchmark's analysis: one draft token and a
k-token verify, each relative to one target decode step (the c and v of the
analytic speedup). The engine's own γ scheduler measures its costs with
:mod:`specray.actors.engine.profile` instead."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from specray.actors.model.batch import ForwardBatch, SequenceInput
from specray.actors.model.decoder import DecoderModel

_CONTEXT = 64  # a short, realistic context for the timed steps


@dataclass(frozen=True)
class CostModel:
    draft_cost: float  # c: one draft-model token / one target step
    verify_costs: tuple[float, ...]  # [γ] = cost of verifying γ + 1 tokens / one step

    def verify_cost(self, gamma: int) -> float:
        if gamma < len(self.verify_costs):
            return self.verify_costs[gamma]
        # Beyond the measured range, extrapolate linearly from the last two.
        last, prev = self.verify_costs[-1], self.verify_costs[-2]
        return last + (gamma - len(self.verify_costs) + 1) * (last - prev)


def step_seconds(model: DecoderModel, num_tokens: int, repeats: int = 3) -> float:
    """Best-of-``repeats`` time of feeding ``num_tokens`` after a short context."""
    cache = model.new_cache(1, _CONTEXT + num_tokens)
    slot = cache.allocate()
    model(ForwardBatch.build([SequenceInput(slot, [1] * _CONTEXT, 0)]), cache)
    best = float("inf")
    for _ in range(repeats):
        cache.truncate(slot, _CONTEXT)
        batch = ForwardBatch.build([SequenceInput(slot, [1] * num_tokens, _CONTEXT, num_tokens)])
        start = time.perf_counter()
        model(batch, cache)
        best = min(best, time.perf_counter() - start)
    return best


def calibrate(
    target: DecoderModel,
    draft: DecoderModel | None,
    max_gamma: int,
    timer: Callable[[DecoderModel, int], float] = step_seconds,
) -> CostModel:
    one = timer(target, 1)
    verify = tuple(timer(target, gamma + 1) / one for gamma in range(max(max_gamma, 1) + 1))
    draft_cost = timer(draft, 1) / one if draft is not None else 0.0
    return CostModel(draft_cost=draft_cost, verify_costs=(1.0, *verify[1:]))
