"""What the verify budget charges a copy for: each request's own record
against the shared calibration, and the call that fetched the copies."""

from __future__ import annotations

import pytest
from scheduling_helpers import decoding_run

from specray.actors.drafting.base import DraftPaths, DraftProposal
from specray.actors.engine.budget import Baseline, ProposedCopy, budget_tokens
from specray.actors.engine.calibration import OwnRecord
from specray.actors.engine.costs import RoundCostModel
from specray.actors.engine.request import RunningRequest
from specray.actors.engine.scheduling import GammaScheduler
from specray.actors.engine.verify_budget import VerifyBudget


def _request(request_id: str = "r") -> RunningRequest:
    return decoding_run(request_id, backlog=2, alpha=0.5, max_gamma=16)


def test_own_record_starts_even_and_follows_recent_copies() -> None:
    record = OwnRecord()
    assert record.ratio == 1.0 and record(0.6) == 0.6
    for _ in range(40):  # promised two tokens a copy, kept one
        record.observe([0.5] * 4, [True, False, False, False])
    assert record.ratio == pytest.approx(0.5, abs=0.05)
    assert record(0.9) == pytest.approx(0.45, abs=0.05)
    for _ in range(200):  # then every promise kept: the old record fades
        record.observe([0.5] * 4, [True, True, False, False])
    assert record.ratio == pytest.approx(1.0, abs=0.01)
    assert OwnRecord(promised=1.0, survived=20.0)(0.9) == 1.0  # a survival stays one at most


def test_judged_copies_teach_the_request_s_own_record() -> None:
    """A judged copy tells the request's record what the calibration
    promised each token and how many survived; its next copies are scaled
    by that, not the pooled calibration alone."""
    budget = VerifyBudget(RoundCostModel())
    run = _request()
    copy = ProposedCopy(len(run.tokens), [5, 6, 7, 8], [-1, 0, 1, 2], [0.8] * 4)
    run.draft.proposed.append(copy)
    run.tokens.extend([5, 9, 9, 9])  # the first token survives, the second breaks the path
    promised = budget.calibration(0.8)
    budget.judge(run)
    assert run.draft.proposed == []
    assert run.draft.own.promised == pytest.approx(4 * promised)
    assert run.draft.own.survived == 1.0
    draft = DraftProposal([1, 2], from_lookup=True)
    later = ProposedCopy(len(run.tokens), [1, 2], [-1, 0], [0.8, 0.8])
    pooled = budget.calibration(0.8)
    assert budget.survivals(run, draft, later) == [run.draft.own(pooled)] * 2
    assert run.draft.own(pooled) < pooled


def test_a_request_whose_copies_fail_gets_them_cut() -> None:
    """The same copy, the same calibration: the request whose copies kept
    their promise verifies it; the one whose copies kept a third of it does not."""
    costs = RoundCostModel()
    costs.verify.set_profile([(1, 0.26), (2, 0.30), (4, 0.38), (8, 0.54), (17, 0.9)])
    kept = {}
    for name, record in (("kept", OwnRecord()), ("broke", OwnRecord(promised=40, survived=10))):
        scheduler = GammaScheduler(DraftPaths(model=False, lookup=True), costs=costs)
        run = _request(name)
        run.draft.own = record
        scheduler.choose([run])
        (draft,) = scheduler.trim([run], [DraftProposal(list(range(20, 36)), from_lookup=True)])
        kept[name] = len(draft)
    assert kept["kept"] > 0 and kept["broke"] < kept["kept"]


def test_copies_must_win_back_the_call() -> None:
    """Two decoding requests, each further token 0.02 s beside a 0.09 s
    round: four copies at 0.45 are an even trade against their rows, and
    lose once the call that fetched them (7 ms) is counted."""

    def verify_seconds(tokens: int) -> float:
        return 0.09 + 0.02 * (tokens - 2)

    copies = [[0.45, 0.45], [0.45, 0.45]]
    assert sum(budget_tokens(copies, Baseline(2, 2.0, verify_seconds))) == 4
    assert sum(budget_tokens(copies, Baseline(2, 2.0, verify_seconds, 0.007))) == 0
    sure = [[0.95, 0.95], [0.95, 0.95]]  # copies that pay win it back
    assert sum(budget_tokens(sure, Baseline(2, 2.0, verify_seconds, 0.007))) == 4


def test_the_call_is_charged_only_where_copies_alone_need_it() -> None:
    costs = RoundCostModel()
    budget = VerifyBudget(costs)
    group = [_request("a"), _request("b")]
    assert budget.call_seconds(group) == 0.0  # not measured yet: tried as free
    costs.lookup.observe((1,), 0.007)
    assert budget.call_seconds(group) == pytest.approx(0.007)
    group[1].draft.gamma = 3  # a model drafts in the same call: the call is paid anyway
    assert budget.call_seconds(group) == 0.0


def test_the_budget_describes_the_copy_estimates_requests_start_from() -> None:
    """What a new request's copies are priced from, readable from outside:
    the pooled per-depth acceptance per kind of evidence and the
    calibration's map, moving as verdicts come in."""
    budget = VerifyBudget(RoundCostModel())
    fresh = budget.describe()
    assert fresh["depths"] == [1, 2, 4, 8, 16]
    assert fresh["pool"] == {"overall": [pytest.approx(0.6)] * 5}  # the prior
    own: dict = {}
    for _ in range(50):  # n-gram copies wrong at their first token
        budget.copies.record(own, "ngram", 1, False)
    described = budget.describe()
    assert described["pool"]["ngram"][0] < 0.05
    assert described["pool"]["overall"][0] < 0.05
    assert described["calibration"]["0.5"] == budget.calibration(0.5)
