"""What one chained draft step of the head costs, for c = draft step / target step."""

from __future__ import annotations

import time

import torch

from specray.actors.drafting.head.model import DraftHead
from specray.actors.model.batch import ForwardBatch, SequenceInput

_CONTEXT = 64  # the same short context bench.costs.step_seconds times the target at


def head_step_seconds(head: DraftHead, repeats: int = 3, context: int = _CONTEXT) -> float:
    """Best-of-``repeats`` time of one chained step (one token, one request)
    after ``context`` fed target positions: what every draft after the first
    costs, and about what the first costs after a one-token round."""
    cache = head.new_cache(1, context + 1)
    slot = cache.allocate()
    features = torch.zeros(1, context, head.config.fused_size)
    head.forward_cached(
        features, ForwardBatch.build([SequenceInput(slot, [1] * context, 0)]), cache, True
    )
    previous = torch.zeros(1, 1, head.config.hidden_size)
    best = float("inf")
    for _ in range(repeats):
        cache.truncate(slot, context)
        batch = ForwardBatch.build([SequenceInput(slot, [1], context)])
        start = time.perf_counter()
        step = head.forward_cached(previous, batch, cache, False)
        int(step.logits.argmax())  # the drafter reads the token back
        best = min(best, time.perf_counter() - start)
    return best
