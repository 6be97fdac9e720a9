"""HybridDrafter: lookup where a long suffix matches, the draft model otherwise."""

from __future__ import annotations

import pytest

from specray.actors.drafting.base import Drafter, DraftRequest, DraftUpdate
from specray.actors.drafting.draft_model import DraftModelDrafter
from specray.actors.drafting.hybrid import HybridDrafter
from specray.actors.drafting.ngram import NgramDrafter
from specray.actors.model.loader import load_model
from specray.actors.sampling.params import SamplingParams

GREEDY = SamplingParams()
COPIED = [5, 6, 7, 8, 9, 10, 11, 12]


@pytest.fixture
def hybrid(tiny_dir_factory) -> HybridDrafter:  # type: ignore[no-untyped-def]
    model = DraftModelDrafter(load_model(tiny_dir_factory("qwen2", 3)), 4, 128)
    return HybridDrafter(NgramDrafter(max_ngram=4), model, min_match=3)


def test_satisfies_drafter_protocol(hybrid: HybridDrafter) -> None:
    drafter: Drafter = hybrid
    assert drafter.hidden_layers == ()


def test_long_match_drafts_by_lookup_short_by_model(hybrid: HybridDrafter) -> None:
    # "copy": the prompt ends with the first 3 tokens of a span seen earlier.
    hybrid.start("copy", [1, *COPIED, 2, *COPIED[:3]], GREEDY)
    # "fresh": the last token occurs earlier, but only a 1-gram matches.
    hybrid.start("fresh", [20, 21, 22, 23, 24, 21], GREEDY)
    copy, fresh = hybrid.propose([DraftRequest("copy", 4), DraftRequest("fresh", 4)])
    assert copy.token_ids == COPIED[3:7] and copy.draft_probs is None
    lookup_only = hybrid.lookup.match("fresh", 4)
    assert lookup_only.ngram_size == 1  # a chance match: the model drafts instead
    assert len(fresh.token_ids) == 4
    assert (hybrid.lookup_proposals, hybrid.model_proposals) == (1, 1)


def test_lookup_budget_apart_from_the_model_budget(hybrid: HybridDrafter) -> None:
    """Asked for no model drafts but some copies: a match is copied (up to
    its own budget), a miss costs no model step; the proposal says which."""
    hybrid.start("copy", [1, *COPIED, 2, *COPIED[:3]], GREEDY)
    hybrid.start("fresh", [20, 21, 22, 23, 24, 21], GREEDY)
    asks = [DraftRequest("copy", 0, lookup_tokens=3), DraftRequest("fresh", 0, lookup_tokens=3)]
    copy, fresh = hybrid.propose(asks)
    assert copy.token_ids == COPIED[3:6] and copy.from_lookup
    assert fresh.token_ids == [] and hybrid.model_proposals == 0
    (model_made,) = hybrid.propose([DraftRequest("fresh", 2, lookup_tokens=4)])
    assert len(model_made) == 2 and not model_made.from_lookup


def test_model_hears_a_verdict_only_on_its_own_proposal(hybrid: HybridDrafter) -> None:
    """After a lookup round the model's cache holds no drafts: it must not be
    told that any of them were accepted, and it catches up on its next call."""
    hybrid.start("r", [1, *COPIED, 2, *COPIED[:3]], GREEDY)
    (proposal,) = hybrid.propose([DraftRequest("r", 4)])
    assert hybrid.model_proposals == 0
    hybrid.accept(DraftUpdate("r", 4, [*proposal.token_ids, 99]))  # all accepted, bonus 99
    model = hybrid.model
    assert isinstance(model, DraftModelDrafter)
    state = model._requests["r"]
    assert state.tokens[-5:] == [*COPIED[3:7], 99]
    assert state.cached == 0  # it has fed nothing yet; nothing was wrongly kept
    (after,) = hybrid.propose([DraftRequest("r", 2)])  # 99 breaks every n-gram
    assert hybrid.model_proposals == 1 and len(after.token_ids) == 2
    assert state.cached == len(state.tokens)  # fed every committed token once


def test_finish_frees_both(hybrid: HybridDrafter) -> None:
    hybrid.start("r", [1, 2, 3], GREEDY)
    hybrid.finish("r")
    with pytest.raises(KeyError):
        hybrid.lookup.match("r", 2)
    assert "r" not in hybrid.model._requests  # type: ignore[attr-defined]


def test_min_match_must_be_a_lookup_size(tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    model = DraftModelDrafter(load_model(tiny_dir_factory("qwen2", 3)), 1, 64)
    with pytest.raises(ValueError, match="min_match"):
        HybridDrafter(NgramDrafter(max_ngram=3), model, min_match=4)
