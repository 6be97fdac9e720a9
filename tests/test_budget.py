"""The draft budget: per-depth acceptance judged in hindsight, survivals of
chains and trees, and DSpark's admission over them under a verify cost."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from specray.actors.drafting.base import DraftPaths, DraftProposal, DraftUpdate
from specray.actors.drafting.ngram import LookupMatch
from specray.actors.engine.budget import (
    Baseline,
    DepthAcceptance,
    Hindsight,
    ProposedCopy,
    budget_tokens,
    survivals,
)
from specray.actors.engine.calibration import SurvivalCalibration
from specray.actors.engine.costs import RoundCostModel
from specray.actors.engine.gamma import SurvivalEstimate
from specray.actors.engine.lifecycle import start_request
from specray.actors.engine.request import DraftState, GenerationRequest, RunningRequest
from specray.actors.engine.scheduling import GammaScheduler
from specray.actors.sampling.params import StoppingCriteria


def test_depth_acceptance_learns_that_long_copies_stay_right() -> None:
    """Verbatim copies are all right or wrong from the first token: the rate
    at depth 1 is about a half, deeper ones (given the parent) near 1."""
    estimate = DepthAcceptance()
    assert estimate.conditional(1) == estimate.conditional(9) == estimate.prior
    for round_ in range(40):
        estimate.update(16, 16 if round_ % 2 else 0)
    assert estimate.conditional(1) == pytest.approx(0.5, abs=0.1)
    assert estimate.conditional(8) > 0.9 and estimate.conditional(16) > 0.9
    seeded = estimate.seeded()
    assert seeded.conditional(8) >= 0.85 and max(seeded.tested) <= 3.0 + 1e-9


def test_three_right_copies_are_enough_to_verify_the_whole_ceiling() -> None:
    """The verify curve measured here (fp32, AVX2, few-row matmul choice):
    up to 5 tokens cost one step, 9 cost 1.77, 17 cost 2.68. A request
    whose first three copies were right for all 16 tokens verifies the next
    copy whole: a prior worth a whole tested token per depth held it to 4
    tokens until about twenty copies had been judged, longer than a
    128-token verbatim edit lasts (0.69 of a fixed k = 16's speed)."""

    def verify(tokens: int) -> float:
        return 1.0 if tokens <= 5 else 1.77 if tokens <= 9 else 2.68

    base = Baseline(1, 1.0, verify)
    estimate = DepthAcceptance()
    copy = DraftProposal(list(range(16)), from_lookup=True)
    for _ in range(3):
        estimate.update(16, 16)
    assert budget_tokens([survivals(copy, estimate)], base) == [16]
    stale = DepthAcceptance()
    stale.update(16, 16)
    assert budget_tokens([survivals(copy, stale)], base) == [4]  # one is not enough


def test_survivals_multiply_along_each_path() -> None:
    estimate = DepthAcceptance(prior=0.5)
    tree = DraftProposal([1, 2, 3, 4], parents=[-1, -1, 0, 2], confidence=[0.8, 0.2, 1.0, 0.5])
    assert survivals(tree, estimate) == pytest.approx([0.4, 0.1, 0.2, 0.05])
    chain = DraftProposal([1, 2, 3])  # no confidence: the measured rates alone
    assert survivals(chain, estimate) == pytest.approx([0.5, 0.25, 0.125])


def test_budget_follows_the_verify_cost() -> None:
    sure = [[0.99] * 16, [0.9, 0.5, 0.1]]
    # A verify whose cost hardly grows: every likely token is worth it.
    assert budget_tokens(sure, Baseline(2, 2.0, lambda n: 1.0 + 0.001 * n)) == [16, 3]
    # Each verified token costs as much as a decode step: nothing pays.
    assert budget_tokens(sure, Baseline(2, 2.0, lambda n: float(n))) == [0, 0]
    # In between, the confident copy is kept and the doubtful tail cut.
    counts = budget_tokens(sure, Baseline(2, 2.0, lambda n: 1.0 + 0.15 * n))
    assert counts[0] == 16 and counts[1] < 3


def test_budget_is_never_expected_to_lose_to_plain_decoding() -> None:
    rng = random.Random(0)
    for _ in range(200):
        drafts = []
        for _ in range(rng.randint(1, 4)):
            values, survival = [], 1.0
            for _ in range(rng.randint(0, 12)):
                survival *= rng.random()
                values.append(survival)
            drafts.append(values)
        slope = rng.uniform(0.0, 1.5)

        def cost(n: int, slope: float = slope) -> float:
            return 1.0 + slope * n

        base = len(drafts)
        counts = budget_tokens(drafts, Baseline(base, float(base), cost))
        assert all(0 <= c <= len(d) for c, d in zip(counts, drafts, strict=True))
        expected = base + sum(sum(d[:c]) for c, d in zip(counts, drafts, strict=True))
        assert expected / cost(base + sum(counts)) >= base / cost(base) - 1e-9


def test_hindsight_judges_a_copy_as_its_tokens_commit() -> None:
    copy = Hindsight(start=3, token_ids=[5, 6, 7, 8])
    assert copy.judge([1, 2, 3]) == [] and not copy.settled
    assert copy.judge([1, 2, 3, 5]) == [True]
    assert copy.continued([1, 2, 3, 5], [6, 7, 8]) == 1  # the same copy, one deeper
    assert copy.continued([1, 2, 3, 5], [9, 7]) == 0  # another guess
    assert copy.judge([1, 2, 3, 5, 6, 9, 7]) == [True, False]  # deeper depths never tested
    assert copy.settled and copy.continued([1, 2, 3, 5, 6, 9, 7], [7]) == 0
    whole = Hindsight(start=0, token_ids=[4, 4])
    assert whole.judge([4, 4, 4]) == [True, True] and whole.settled


def test_survivals_of_a_copy_already_right_start_deeper() -> None:
    estimate = DepthAcceptance()
    for _ in range(20):
        estimate.update(8, 0)  # most fresh copies are wrong at once...
        estimate.update(8, 8)  # ...and the right ones stay right
    fresh, continued = (
        survivals(DraftProposal([1, 2]), estimate),
        survivals(DraftProposal([1, 2]), estimate, offset=3),
    )
    assert fresh[0] < 0.6 and continued[0] > 0.9
    assert estimate.conditional(40) == estimate.conditional(8)  # past the tested depths


def _lookup_request(request_id: str = "r", fixed: bool = False) -> RunningRequest:
    draft = DraftState(
        lookup_acceptance=SurvivalEstimate.with_prior(0.5),
        model_acceptance=SurvivalEstimate.with_prior(0.5),
    )
    stopping = StoppingCriteria(max_tokens=400, ignore_eos=True)
    request = GenerationRequest(request_id, [3, 4], stopping=stopping, fixed_speculation=fixed)
    run = start_request(request, (), None, 16, draft)
    run.cached_len = len(run.tokens) - 1
    run.target = 0
    draft.attach(0, 1)
    return run


def _copy_scheduler() -> GammaScheduler:
    """A lookup drafter's scheduler under a verify cost where a copy pays
    only when long and likely: 2 tokens cost two of 1, 17 about three (an
    AVX2 CPU in fp32)."""
    costs = RoundCostModel()
    costs.verify.set_profile([(1, 0.26), (2, 0.52), (4, 0.75), (8, 0.8), (17, 0.9)])
    return GammaScheduler(DraftPaths(model=False, lookup=True), costs=costs)


def _copy_rounds(
    scheduler: GammaScheduler,
    run: RunningRequest,
    rounds: int,
    copy_of: Callable[[int, list[int]], list[int]],
    evidence: str = "",
    confidence: float | None = None,
) -> list[int]:
    """``rounds`` rounds of one request whose committed tokens follow a
    periodic truth; round ``r`` proposes ``copy_of(r, the next 16 true
    tokens)``, each token with the drafter's ``confidence``. Each round's
    verified copy length."""

    def proposal_of(round_: int, right: list[int]) -> DraftProposal:
        token_ids = copy_of(round_, right)
        stated = None if confidence is None else [confidence] * len(token_ids)
        return DraftProposal(token_ids, from_lookup=True, confidence=stated, evidence=evidence)

    return _proposal_rounds(scheduler, run, rounds, proposal_of)


def _proposal_rounds(
    scheduler: GammaScheduler,
    run: RunningRequest,
    rounds: int,
    proposal_of: Callable[[int, list[int]], DraftProposal],
) -> list[int]:
    """As :func:`_copy_rounds`, round ``r`` proposing ``proposal_of(r, the
    next 16 true tokens)``."""
    truth = [7 + i % 50 for i in range(40 * rounds)]
    verified = []
    for round_ in range(rounds):
        scheduler.choose([run])
        position = len(run.tokens) - 2
        right = truth[position : position + 16]
        (kept,) = scheduler.trim([run], [proposal_of(round_, right)])
        accepted = next((i for i, t in enumerate(kept.token_ids) if t != right[i]), len(kept))
        new = truth[position : position + accepted + 1]
        run.tokens.extend(new)
        run.cached_len = len(run.tokens) - 1
        scheduler.record(run, kept, DraftUpdate("r", accepted, new, None))
        verified.append(len(kept))
    return verified


def test_early_rejections_do_not_shut_copies_out() -> None:
    """A verify of 2 tokens costs two of 1, of 17 about three (an AVX2 CPU
    in fp32): a copy pays only when long and likely. The first two copies
    are wrong at their first token, every later one is right; judged only
    by what it verified, the budget would verify nothing ever again."""
    scheduler = _copy_scheduler()
    run = _lookup_request()
    verified = _copy_rounds(
        scheduler, run, 30, lambda round_, right: [1] * 16 if round_ < 2 else right
    )
    assert sum(verified[:2]) <= 16  # the prior risks at most one of the wrong copies
    assert min(verified[-10:]) >= 12 and len(run.tokens) - 2 > 300


def test_depths_tested_rarely_keep_their_evidence() -> None:
    """One copy in twenty is right for all 16 tokens; the others are judged
    only to depth 3. Depth 12 is tested only by the right ones, and always
    passes: its estimate stays near 1. Faded with every proposal instead,
    it kept about one token of evidence against the prior (0.95 here),
    and a survival, the product over depths, priced long copies far below
    what they earned."""
    scheduler = _copy_scheduler()
    run = _lookup_request()
    _copy_rounds(
        scheduler,
        run,
        100,
        lambda round_, right: right if round_ % 20 == 0 else right[:2] + [1] * 14,
    )
    depths = run.draft.lookup_depths[""]  # the copies name no evidence
    assert depths.conditional(3) < 0.2  # the wrong copies' first wrong depth
    assert depths.conditional(12) > 0.97


def test_copies_are_priced_by_the_evidence_they_rest_on() -> None:
    """One server, two kinds of copy: sure ones (a long match on an earlier
    answer), right for all 16 tokens, and guesses, right for two. Pooled
    into one per-depth estimate the two read alike, and a new request's
    first guess was verified as far as a sure copy (all 16 tokens here).
    Learned per evidence, the sure copy is verified whole and the guess is
    cut before its first wrong token."""
    scheduler = _copy_scheduler()
    for _ in range(3):
        _copy_rounds(scheduler, _lookup_request(), 10, lambda _, right: right, "sure")
        _copy_rounds(
            scheduler, _lookup_request(), 10, lambda _, right: right[:2] + [1] * 14, "guess"
        )
    (sure,) = _copy_rounds(scheduler, _lookup_request(), 1, lambda _, right: right, "sure")
    (guess,) = _copy_rounds(
        scheduler, _lookup_request(), 1, lambda _, right: right[:2] + [1] * 14, "guess"
    )
    assert sure == 16 and guess <= 2


def test_a_kind_of_copy_first_met_starts_from_how_copies_fared() -> None:
    """After many right copies, the first copy on a kind of evidence the
    server has not seen is priced from every copy's estimate: verified
    whole. From the bare prior (0.6 per depth) this cost admits none of it."""
    scheduler = _copy_scheduler()
    for _ in range(3):
        _copy_rounds(scheduler, _lookup_request(), 10, lambda _, right: right, "sure")
    (first,) = _copy_rounds(scheduler, _lookup_request(), 1, lambda _, right: right, "new")
    assert first == 16


def test_fixed_speculation_verifies_the_whole_copy_the_budget_would_cut() -> None:
    """A new request copying 16 tokens: from the prior, this cost admits
    none of the copy. With fixed speculation all of it is verified, as a
    fixed-k engine would; a budgeted neighbour is still cut (less than all:
    the fixed copy's verify makes a few more tokens cheap)."""
    copy = DraftProposal(list(range(10, 26)), from_lookup=True)
    alone = _lookup_request("alone")
    scheduler = _copy_scheduler()
    scheduler.choose([alone])
    assert alone.draft.lookup_gamma == 16
    assert len(scheduler.trim([alone], [copy])[0]) == 0
    batch = [_lookup_request("budgeted"), _lookup_request("fixed", fixed=True)]
    scheduler = _copy_scheduler()
    scheduler.choose(batch)
    budgeted, fixed = scheduler.trim(batch, [copy, copy])
    assert len(fixed) == 16 and len(budgeted) < 16


def test_proposed_copies_are_judged_token_by_token_as_tokens_commit() -> None:
    """A tree [5, 6, 7] with 9 beside 6: settled once the committed tokens
    reach every live branch's end, not before."""
    copy = ProposedCopy(2, [5, 6, 7, 9], [-1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1])
    assert copy.verdicts([1, 2]) is None
    assert copy.verdicts([1, 2, 5, 6]) is None  # 7 is still open
    assert copy.verdicts([1, 2, 5, 6, 8]) == [True, True, False, False]
    assert copy.verdicts([1, 2, 4]) == [False, False, False, False]


def test_survival_calibration_maps_estimates_to_what_they_meant() -> None:
    calibration = SurvivalCalibration(bins=10)
    assert calibration(0.35) == pytest.approx(0.35)  # no evidence: the identity
    for _ in range(30):  # estimated 0.35, survived three times in four
        calibration.observe([0.35] * 4, [True, True, True, False])
    assert calibration(0.35) == pytest.approx(0.75, abs=0.03)
    assert calibration(0.55) >= calibration(0.35)  # never priced below a lower estimate
    assert calibration(0.05) == pytest.approx(0.05)
    (row,) = calibration.report()
    assert row["judged"] == 120 and row["low"] == pytest.approx(0.3)
    assert row["estimate"] == pytest.approx(0.35) and row["survived"] == pytest.approx(0.75)
    assert row["calibrated"] == calibration(0.35)


def test_copies_a_drafter_undersells_are_verified_as_they_fare() -> None:
    """A drafter states 0.8 for each token of copies that are always right:
    its estimates fall to 0.3 by depth 5, and under the 1.5B GGUF's verify
    cost on an AVX2-only machine (each token 27 ms beside a 59 ms step) the
    budget cut the copies short however often they were right. Calibrated
    by what the proposed copies did, it verifies them whole."""

    def scheduler() -> GammaScheduler:
        costs = RoundCostModel()
        costs.verify.set_profile([(n, 0.059 + 0.027 * (n - 1)) for n in (1, 2, 4, 8, 16, 17)])
        return GammaScheduler(DraftPaths(model=False, lookup=True), costs=costs)

    def right(_: int, truth: list[int]) -> list[int]:
        return truth

    verified = _copy_rounds(scheduler(), _lookup_request(), 30, right, confidence=0.8)
    assert min(verified[-10:]) == 16
    uncalibrated = scheduler()
    uncalibrated.budget.judge = lambda run: None  # type: ignore[method-assign]
    stuck = _copy_rounds(uncalibrated, _lookup_request(), 30, right, confidence=0.8)
    assert max(stuck[-10:]) <= 8


def test_short_ngram_matches_are_ranked_below_long_ones() -> None:
    """Copies from 1-gram matches that are always wrong, alternating with
    copies from 5-gram matches that are always right, all of one kind of
    evidence. The match's size, stated as the first token's confidence
    (``LookupMatch.proposal``), lets the calibrated budget tell them apart:
    it verifies the long matches' copies whole and next to nothing of the
    short ones'. Priced alike it cannot tell them apart, and verifies the
    wrong copies about as much as the right ones."""

    def verified_by_size(ranked: bool) -> dict[int, list[int]]:
        costs = RoundCostModel()
        costs.verify.set_profile([(n, 0.059 + 0.027 * (n - 1)) for n in (1, 2, 4, 8, 16, 17)])
        scheduler = GammaScheduler(DraftPaths(model=False, lookup=True), costs=costs)

        def proposal_of(round_: int, right: list[int]) -> DraftProposal:
            size = 5 if round_ % 2 else 1
            copy = LookupMatch(right if size == 5 else [999] * 16, size).proposal()
            if ranked:
                return copy
            return DraftProposal(copy.token_ids, from_lookup=True, evidence=copy.evidence)

        verified = _proposal_rounds(scheduler, _lookup_request(), 60, proposal_of)
        return {1: verified[0::2][-10:], 5: verified[1::2][-10:]}

    ranked, alike = verified_by_size(ranked=True), verified_by_size(ranked=False)
    assert min(ranked[5]) == 16 and max(ranked[1]) <= 1
    assert sum(alike[1]) > 0.5 * sum(alike[5])
