"""When the γ scheduler tries a draft model it has stopped using
(:class:`~specray.actors.engine.probe.ModelProbe`), and when it does not
even work the schedule out."""

from __future__ import annotations

from scheduling_helpers import MODEL
from scheduling_helpers import decoding_run as _run

from specray.actors.drafting.base import DraftProposal, DraftUpdate
from specray.actors.engine.costs import RoundCostModel
from specray.actors.engine.gamma import SurvivalEstimate, schedule_gammas
from specray.actors.engine.probe import FIRST_REPROBE_ROUNDS, PROBE_RECHECK_ROUNDS
from specray.actors.engine.scheduling import GammaScheduler


def test_compute_bound_verify_drafts_nothing_behind_or_not() -> None:
    """Each verified token costs a whole step: even a drafter that is always
    right would not pay, so the model path is never probed either (a probe
    would only cost a catch-up and a verify) ..."""
    costs = RoundCostModel()
    costs.verify.set_profile([(1, 0.1), (64, 6.4)])
    costs.draft.set_profile([(1, 0.01), (256, 0.4)])
    batch = [_run("a", 300, 0.05), _run("b", 1, 0.05)]
    scheduler = GammaScheduler(MODEL, costs=costs)
    for _ in range(2 * FIRST_REPROBE_ROUNDS):
        scheduler.choose(batch)
        assert [r.draft.gamma for r in batch] == [0, 0]
    # ... until the load falls and verifying becomes cheap: drafts that
    # rarely survive still do not pay, but the probe comes within
    # PROBE_RECHECK_ROUNDS rounds.
    costs.verify.set_profile([(1, 0.1), (64, 0.12)])
    rounds = []
    for _ in range(PROBE_RECHECK_ROUNDS + 1):
        scheduler.choose(batch)
        rounds.append([r.draft.gamma for r in batch])
    assert rounds.count([0, 4]) == 1 and rounds.count([0, 0]) == PROBE_RECHECK_ROUNDS


def test_a_verdict_that_drafting_cannot_pay_holds_for_its_batch_only() -> None:
    """Verifying is flat up to two tokens and steep past them: with two
    requests no draft can pay, so none is probed; alone, one request's
    draft rides free, and the probe comes at once."""
    costs = RoundCostModel()
    costs.verify.set_profile([(1, 0.1), (2, 0.1), (3, 0.3), (64, 6.4)])
    costs.draft.set_profile([(1, 0.01), (256, 0.4)])
    scheduler = GammaScheduler(MODEL, costs=costs)
    pair = [_run("a", 1, 0.05), _run("b", 1, 0.05)]
    for _ in range(3):
        scheduler.choose(pair)
        assert [r.draft.gamma for r in pair] == [0, 0]
    alone = [pair[1]]
    scheduler.choose(alone)
    assert alone[0].draft.gamma > 0


def test_a_poor_drafter_is_probed_at_once_then_ever_more_rarely() -> None:
    """Drafts that rarely survive do not pay where a perfect drafter would:
    the model path is tried at once on the request least behind, then after
    FIRST_REPROBE_ROUNDS rounds without drafts, then twice that."""
    costs = RoundCostModel()
    costs.verify.set_profile([(1, 0.1), (64, 0.12)])
    costs.draft.set_profile([(1, 0.05), (256, 0.4)])
    batch = [_run("a", 300, 0.05), _run("b", 1, 0.05)]
    scheduler = GammaScheduler(MODEL, costs=costs)
    scheduler.choose(batch)
    assert [r.draft.gamma for r in batch] == [0, 4]
    tried = []
    for number in range(1, 3 * FIRST_REPROBE_ROUNDS + 3):
        scheduler.choose(batch)
        if any(r.draft.gamma for r in batch):
            tried.append(number)
    assert tried == [FIRST_REPROBE_ROUNDS + 1, 3 * FIRST_REPROBE_ROUNDS + 2]


def test_a_slow_drafter_that_is_almost_always_right_is_found_by_its_probe() -> None:
    """From the 2/3 prior a drafter that costs most of a target step never
    pays; its one probe comes back all accepted and the request drafts from
    then on (the pool's prior rises for new requests too)."""
    costs = RoundCostModel()
    costs.verify.set_profile([(1, 0.1), (8, 0.1)])
    costs.draft.set_profile([(1, 0.075), (8, 0.08)])
    scheduler = GammaScheduler(MODEL, costs=costs)
    run = _run("a", 1, 2 / 3)
    assert schedule_gammas([2 / 3], [4], costs.round_seconds) == [0]
    scheduler.choose([run])
    assert run.draft.gamma == 4
    for _ in range(3):
        scheduler.record(
            run, DraftProposal([1, 2, 3, 4]), DraftUpdate("a", 4, [1, 2, 3, 4, 5], None)
        )
        run.draft.backlog = 1
        scheduler.choose([run])
        assert run.draft.gamma > 0
    assert scheduler.new_draft_state().model_acceptance.alpha > 2 / 3


def test_optimism_meets_the_estimate_as_evidence_grows() -> None:
    fresh = SurvivalEstimate.with_prior(0.6)
    assert fresh.optimistic > 0.8  # 0.6 + sqrt(0.24 / 4)
    shown = SurvivalEstimate.with_prior(0.6)
    for _ in range(100):
        shown.update(4, 2)  # 2 of 3 tested drafts accepted, every round
    assert shown.tested == 300
    assert abs(shown.optimistic - shown.alpha) < 0.03
    assert SurvivalEstimate.with_prior(1.0).optimistic == 1.0


def test_a_request_is_tried_though_the_pool_went_sour_and_priced_by_what_it_shows() -> None:
    """The pool's α fell (a stretch of prompts the draft model could not
    follow), and a drafter that costs most of a target step pays only near
    α = 1. A new request is still tried: its own α is unknown. One that
    then shows it is almost always right drafts on; one that shows it is
    not stops."""
    costs = RoundCostModel()
    costs.verify.set_profile([(1, 0.1), (8, 0.1)])
    costs.draft.set_profile([(1, 0.06), (8, 0.065)])
    scheduler = GammaScheduler(MODEL, costs=costs)
    scheduler._pool["model"] = SurvivalEstimate.with_prior(0.55, weight=50.0)
    assert schedule_gammas([0.55], [4], costs.round_seconds) == [0]
    verdicts = {"good": 4, "poor": 0}
    runs = {}
    for request_id in verdicts:
        run = _run(request_id, 1, 0.0)
        run.draft.model_acceptance = scheduler.new_draft_state().model_acceptance
        runs[request_id] = run
        scheduler.choose([run])
        assert run.draft.gamma > 0, request_id
    drafting = {}
    for request_id, run in runs.items():
        accepted = verdicts[request_id]
        for _ in range(4):
            if run.draft.gamma:
                update = DraftUpdate(request_id, accepted, [1] * (accepted + 1), None)
                scheduler.record(run, DraftProposal([1, 2, 3, 4]), update)
            run.draft.backlog = 1
            scheduler.choose([run])
        drafting[request_id] = run.draft.gamma > 0
    assert drafting == {"good": True, "poor": False}
