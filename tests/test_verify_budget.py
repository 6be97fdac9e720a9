"""The verify budget over block drafts (DSpark's Algorithm 1): blocks of
several requests ranked jointly by survival, chained drafts left whole, and
a batch sized from survivals one round old."""

from __future__ import annotations

import re

import pytest

from specray.actors.drafting.base import DraftPaths, DraftProposal, DraftUpdate
from specray.actors.engine.budget import Baseline, budget_size, budget_tokens
from specray.actors.engine.costs import RoundCostModel
from specray.actors.engine.gamma import SurvivalEstimate
from specray.actors.engine.lifecycle import start_request
from specray.actors.engine.request import DraftState, GenerationRequest, RunningRequest
from specray.actors.engine.scheduling import GammaScheduler
from specray.actors.engine.verify_budget import BudgetSizing
from specray.actors.sampling.params import StoppingCriteria

BLOCK = DraftPaths(model=True, lookup=False, block=5, reads_prompt=False)
CHAINED = DraftPaths(model=True, lookup=False)


def _costs() -> RoundCostModel:
    """Verifying two tokens costs 1, each further one 0.2: a draft pays for
    itself only while its survival beats the batch's rate so far."""
    costs = RoundCostModel()
    costs.verify.set_profile([(2, 1.0), (12, 3.0)])
    return costs


def _decoding(request_id: str, alpha: float = 0.9) -> RunningRequest:
    """A decoding request whose acceptance ``alpha`` its drafts have shown."""
    draft = DraftState(
        lookup_acceptance=SurvivalEstimate.with_prior(alpha),
        model_acceptance=SurvivalEstimate.with_prior(alpha, tested=1000.0),
    )
    stopping = StoppingCriteria(max_tokens=400, ignore_eos=True)
    run = start_request(
        GenerationRequest(request_id, [3, 4], stopping=stopping), (), None, 16, draft
    )
    run.cached_len = len(run.tokens) - 1
    run.target = 0
    run.feed = 1
    draft.attach(0, 1)
    return run


def _block(confidence: float) -> DraftProposal:
    return DraftProposal([5, 6, 7, 8, 9], confidence=[confidence] * 5)


def _kept(scheduler: GammaScheduler, drafts: list[DraftProposal]) -> list[int]:
    batch = [_decoding(f"r{i}") for i in range(len(drafts))]
    return [len(d) for d in scheduler.trim(batch, drafts)]


def _throughput(paths: DraftPaths, sizing: BudgetSizing = "fresh") -> GammaScheduler:
    """Algorithm 1 alone: no floor for the requests that gain nothing."""
    return GammaScheduler(paths, costs=_costs(), budget_sizing=sizing, budget_floor=0.0)


def test_blocks_of_several_requests_are_ranked_jointly() -> None:
    """Survivals 0.95^k beat the batch's rate all the way; 0.3 never does:
    the confident block is verified whole and the weak one not at all, the
    same cut as Algorithm 1 on the two blocks' survival products."""
    scheduler = _throughput(BLOCK)
    assert _kept(scheduler, [_block(0.95), _block(0.3)]) == [5, 0]
    products = [[0.95 ** (k + 1) for k in range(5)], [0.3 ** (k + 1) for k in range(5)]]
    assert budget_tokens(products, Baseline(2, 2.0, scheduler.costs.verify.seconds)) == [5, 0]
    # A middling block gets the tokens that still pay: as many as its products do.
    middling = [0.8 ** (k + 1) for k in range(5)]
    expected = budget_tokens([middling], Baseline(1, 1.0, scheduler.costs.verify.seconds))
    assert _kept(scheduler, [_block(0.8)]) == expected and 0 < expected[0] < 5


def test_a_floor_keeps_the_weak_request_from_paying_for_the_sure_one() -> None:
    """The same two blocks under a floor of 0.95: five more tokens would
    double the round, and the request whose block is cut would decode at
    half its rate, so neither is verified; a block that costs the round
    less than 1 / 0.95 of its time is (verifying 2 tokens costs 1 here, a
    third 1.2: past the floor; on a verify whose rows are nearly free, as
    on a GPU, it is not)."""
    floored = GammaScheduler(BLOCK, costs=_costs(), budget_floor=0.95)
    assert _kept(floored, [_block(0.95), _block(0.3)]) == [0, 0]
    flat = RoundCostModel()
    flat.verify.set_profile([(2, 1.0), (12, 1.04)])
    kept = _kept(GammaScheduler(BLOCK, costs=flat, budget_floor=0.95), [_block(0.95), _block(0.3)])
    assert kept[0] == 5


def _bystander_slowdown(floor: float, rounds: int = 200) -> float:
    """Three requests with sure blocks and one with nothing to draft,
    ``rounds`` rounds through ``trim`` and ``record``: the bystander's
    priced seconds over what its rounds would have taken without drafts."""
    costs = RoundCostModel()
    costs.verify.set_profile([(4, 1.0), (24, 5.0)])  # each row a fifth of a 4-row round
    scheduler = GammaScheduler(BLOCK, costs=costs, budget_floor=floor)
    batch = [_decoding(f"r{i}") for i in range(4)]
    for _ in range(rounds):
        kept = scheduler.trim(batch, [_block(0.97)] * 3 + [DraftProposal([])])
        for run, draft in zip(batch, kept, strict=True):
            new = [1] * (len(draft) + 1)
            run.tokens.extend(new)
            run.cached_len = len(run.tokens) - 1
            scheduler.record(run, draft, DraftUpdate(run.request.request_id, len(draft), new, None))
    pace = batch[3].draft.pace
    assert pace.rounds == rounds and pace.tokens == rounds
    return pace.seconds / pace.plain_seconds


def test_over_many_rounds_the_bystander_keeps_the_floor() -> None:
    """Algorithm 1 alone verifies the sure blocks every round and the
    bystander's rounds grow by half or more; under a floor of 0.95 its
    rounds, summed, stay within 1 / 0.95 of plain decoding's."""
    assert _bystander_slowdown(0.0) > 1.5
    assert 1.0 < _bystander_slowdown(0.95) <= 1 / 0.95 + 1e-9


def test_a_floor_outside_zero_to_one_is_refused_by_name() -> None:
    message = "budget floor must be in [0, 1] (0: off), got 1.5"
    with pytest.raises(ValueError, match=re.escape(message)):
        GammaScheduler(BLOCK, budget_floor=1.5)


def test_without_a_confidence_head_the_measured_acceptance_ranks() -> None:
    scheduler = _throughput(BLOCK)
    batch = [_decoding("sure", alpha=0.95), _decoding("unsure", alpha=0.2)]
    plain = DraftProposal([5, 6, 7, 8, 9])
    assert [len(d) for d in scheduler.trim(batch, [plain, plain])] == [5, 0]


def test_chained_model_drafts_stay_whole() -> None:
    """Each chained draft cost a model step and was cut while drafting."""
    scheduler = GammaScheduler(CHAINED, costs=_costs())
    assert _kept(scheduler, [_block(0.3), _block(0.95)]) == [5, 5]


def test_a_block_drafter_is_asked_for_its_ceiling_without_a_stop() -> None:
    """One forward drafts the block: nothing is saved by stopping early,
    and the cut is made across the batch afterwards."""
    costs = _costs()
    costs.draft.set_profile([(1, 0.05), (8, 0.05)])
    run = _decoding("r")
    GammaScheduler(BLOCK, costs=costs).choose([run])
    assert run.draft.gamma == 5 and run.draft.stop is None
    chained = _decoding("c")
    GammaScheduler(CHAINED, costs=costs).choose([chained])
    assert chained.draft.gamma > 0 and chained.draft.stop is not None


def test_stale_sizing_keeps_last_rounds_size_and_ranks_fresh_survivals() -> None:
    """Round one: one confident block, one weak, five tokens admitted. Round
    two both blocks are weak; fresh sizing admits none, stale sizing still
    verifies five, the five likeliest of the fresh survivals."""
    fresh = _throughput(BLOCK)
    stale = _throughput(BLOCK, "stale")
    batches = {"fresh": [_decoding("a"), _decoding("b")], "stale": [_decoding("a"), _decoding("b")]}
    for name, scheduler in (("fresh", fresh), ("stale", stale)):
        first = scheduler.trim(batches[name], [_block(0.95), _block(0.3)])
        assert [len(d) for d in first] == [5, 0]
    weak = [_block(0.3), _block(0.3)]
    assert [len(d) for d in fresh.trim(batches["fresh"], weak)] == [0, 0]
    assert [len(d) for d in stale.trim(batches["stale"], weak)] == [3, 2]
    assert batches["stale"][0].draft.last_survivals == pytest.approx(
        [0.3 ** (k + 1) for k in range(5)]
    )


def test_a_budget_size_is_what_the_budget_admits() -> None:
    products = [[0.95 ** (k + 1) for k in range(5)], [0.5, 0.25]]
    base = Baseline(2, 2.0, _costs().verify.seconds)
    counts = budget_tokens(products, base)
    assert budget_size(products, base) == sum(counts)
    assert budget_tokens(products, base, size=99) == [5, 2]  # capped at what there is
    assert budget_tokens(products, base, size=0) == [0, 0]


def test_unknown_sizing_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="budget sizing must be one of fresh, stale, got 'soon'"):
        GammaScheduler(BLOCK, budget_sizing="soon")
