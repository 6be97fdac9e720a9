"""The bookkeeping every drafter that steps token by token shares
(``ChainDrafts``): a draft model and the chained head build their
proposals alike."""

from __future__ import annotations

import pytest
from tiny_models import VOCAB

from specray.actors.drafting.base import DraftRequest
from specray.actors.drafting.draft_model import DraftModelDrafter
from specray.actors.model.loader import load_model
from specray.actors.sampling.params import SamplingParams


def test_a_draft_model_gives_probabilities_only_to_sampled_requests_of_a_mixed_batch(
    tiny_dir_factory,
) -> None:  # type: ignore[no-untyped-def]
    drafter = DraftModelDrafter(load_model(tiny_dir_factory("qwen2")), 2, 64)
    drafter.start("greedy", [1, 2, 3], SamplingParams())
    drafter.start("sampled", [1, 2, 3], SamplingParams(temperature=0.8, seed=1))
    greedy, sampled = drafter.propose([DraftRequest("greedy", 4), DraftRequest("sampled", 2)])
    assert len(greedy) == 4 and greedy.draft_probs is None
    assert greedy.confidence is not None and len(greedy.confidence) == 4
    assert sampled.draft_probs is not None and sampled.draft_probs.shape == (2, VOCAB)
    for row, token in enumerate(sampled.token_ids):
        assert sampled.draft_probs[row, token] > 0
        assert sampled.draft_probs[row].sum() == pytest.approx(1.0, abs=1e-5)
    assert greedy.dropped == sampled.dropped == 0
