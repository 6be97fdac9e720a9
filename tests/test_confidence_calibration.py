"""What a chained drafter's confidences are worth: the map learned from
verdicts, the stop rule reading confidences through it, and the scheduler
that learns it and ships it with each stop rule."""

from __future__ import annotations

import pytest
from scheduling_helpers import MODEL
from scheduling_helpers import decoding_run as _run

from specray.actors.drafting.base import (
    DraftProposal,
    DraftRequest,
    DraftStop,
    DraftStopping,
    DraftUpdate,
)
from specray.actors.drafting.confidence_map import ConfidenceMap
from specray.actors.drafting.draft_model import DraftModelDrafter
from specray.actors.engine.calibration import ConfidenceCalibration
from specray.actors.engine.costs import RoundCostModel
from specray.actors.engine.request import RunningRequest
from specray.actors.engine.scheduling import GammaScheduler
from specray.actors.model.loader import load_model
from specray.actors.sampling.params import SamplingParams

# A second draft pays only if it survives with about 0.76 or more (see
# test_draft_stop: (1.9 + s) * 1.0 >= 1.9 * 1.4); no third draft pays.
SECOND_AT_076 = (1.0, 1.0, 1.4, 1e9)


def test_a_map_is_a_step_per_bin() -> None:
    confidence_map = ConfidenceMap((0.2, 0.6, 1.0))  # bins [0, 1/3), [1/3, 2/3), [2/3, 1]
    assert confidence_map(0.0) == confidence_map(0.3) == 0.2
    assert confidence_map(0.34) == confidence_map(0.5) == 0.6
    assert confidence_map(0.7) == confidence_map(1.0) == 1.0
    assert confidence_map(-0.1) == 0.2 and confidence_map(1.5) == 1.0
    with pytest.raises(ValueError, match="at least one bin"):
        ConfidenceMap(())


def test_no_evidence_no_map_and_little_evidence_moves_little() -> None:
    calibration = ConfidenceCalibration(bins=10, prior=2.0)
    assert calibration.map() is None
    calibration.observe([0.55], num_accepted=1)  # one draft, accepted
    learned = calibration.map()
    assert learned is not None
    # Two pseudo-drafts at 0.55 and one accepted read 2.1 / 3 = 0.7, above
    # the next bin's prior (0.65): the two pool, (2.1 + 1.3) / 5.
    assert learned(0.55) == learned(0.65) == pytest.approx(0.68)
    assert learned(0.45) == pytest.approx(0.45)
    assert learned(0.05) == pytest.approx(0.05)  # a bin without evidence: its centre


def test_a_chain_is_tested_up_to_its_first_rejection() -> None:
    calibration = ConfidenceCalibration(bins=10, decay=1.0)
    calibration.observe([0.95, 0.95, 0.95, 0.95], num_accepted=1)
    assert calibration.tested[9] == 2.0 and calibration.accepted[9] == 1.0
    calibration.observe([0.95, 0.95], num_accepted=2)  # all accepted: nothing rejected
    assert calibration.tested[9] == 4.0 and calibration.accepted[9] == 3.0


def test_an_underconfident_drafter_is_read_as_it_proved_and_the_map_stays_monotone() -> None:
    calibration = ConfidenceCalibration(bins=20)
    for _ in range(200):
        calibration.observe([0.5, 0.5, 0.5], num_accepted=3)  # at 0.5, always right
        calibration.observe([0.9], num_accepted=0)  # at 0.9, right 2 times in 3
        calibration.observe([0.9], num_accepted=1)
        calibration.observe([0.9], num_accepted=1)
    learned = calibration.map()
    assert learned is not None
    assert learned(0.5) > 0.8
    # A more confident draft is never priced below a less confident one:
    # the two bins pool to what they showed together.
    assert list(learned.values) == sorted(learned.values)
    assert learned(0.9) >= learned(0.5)
    assert learned(0.01) == pytest.approx(0.025)  # no evidence: its centre


def test_the_map_follows_the_text_being_served() -> None:
    """A stretch where every draft fails (random tokens) then a long one
    where every draft holds: the map reads the second, not their mix."""
    calibration = ConfidenceCalibration(bins=10)
    for _ in range(100):
        calibration.observe([0.55], num_accepted=0)
    soured = calibration.map()
    assert soured is not None and soured(0.55) < 0.1
    for _ in range(300):
        calibration.observe([0.55, 0.55], num_accepted=2)
    recovered = calibration.map()
    assert recovered is not None and recovered(0.55) > 0.9
    with pytest.raises(ValueError, match="decay must be in"):
        ConfidenceCalibration(decay=0.0)


def test_the_stop_rule_reads_confidences_through_its_calibration() -> None:
    """Raw, a second draft of confidence 0.5 after one of 0.9 survives at
    0.45 and is dropped; read as the 0.95 it was seen to be worth, kept."""
    raw = DraftStopping([DraftRequest("r", 3, stop=DraftStop(SECOND_AT_076))])
    assert raw.keeps(0, 1, 0.9) and not raw.keeps(0, 2, 0.5)
    seen = ConfidenceMap((0.95,) * 4)
    calibrated = DraftStop(SECOND_AT_076, calibration=seen)
    stopping = DraftStopping([DraftRequest("r", 3, stop=calibrated)])
    assert stopping.keeps(0, 1, 0.9) and stopping.keeps(0, 2, 0.5)
    assert stopping.dropped == [0]


def test_a_draft_model_drafts_further_once_its_confidences_proved_better(
    tiny_dir_factory,
) -> None:  # type: ignore[no-untyped-def]
    """A random tiny model is unsure of every token: raw, the rule keeps only
    the first draft; with a map that read such confidences as near certain,
    it keeps the second too (no third draft pays either way)."""
    model_dir = tiny_dir_factory("qwen2")
    drafters = [DraftModelDrafter(load_model(model_dir), 1, 64) for _ in range(2)]
    proposals = []
    for drafter, calibration in zip(drafters, (None, ConfidenceMap((0.99,))), strict=True):
        drafter.start("r", [1, 2, 3, 4], SamplingParams())
        stop = DraftStop(SECOND_AT_076, calibration=calibration)
        proposals.append(drafter.propose([DraftRequest("r", 3, stop=stop)])[0])
    raw, calibrated = proposals
    assert raw.confidence is not None and max(raw.confidence) < 0.76
    assert len(raw) == 1
    assert len(calibrated) == 2 and calibrated.token_ids[:1] == raw.token_ids
    # The proposal keeps the raw confidences: the scheduler learns from them.
    assert calibrated.confidence is not None and calibrated.confidence[0] == raw.confidence[0]


def test_the_scheduler_learns_from_verdicts_and_ships_the_map_with_each_stop() -> None:
    costs = RoundCostModel()
    costs.verify.set_profile([(1, 0.1), (64, 0.1)])
    costs.draft.set_profile([(1, 0.001), (64, 0.064)])
    scheduler = GammaScheduler(MODEL, costs=costs)
    runs = [_run("a", 1, 0.9)]
    scheduler.choose(runs)  # the model path's one probe
    scheduler.choose(runs)
    stop = runs[0].draft.stop
    assert stop is not None and stop.calibration is None  # nothing seen yet
    update = _accept_all(runs[0], 3)
    scheduler.record(runs[0], DraftProposal([5, 6, 7], confidence=[0.5, 0.5, 0.5]), update)
    # Copies and confidence-less drafts teach it nothing.
    scheduler.record(runs[0], DraftProposal([5], from_lookup=True, confidence=[0.5]), update)
    assert sum(scheduler.calibration.tested) == 3.0
    scheduler.choose(runs)
    stop = runs[0].draft.stop
    assert stop is not None and stop.calibration is not None
    assert stop.calibration(0.5) > 0.5


def _accept_all(run: RunningRequest, num_drafts: int) -> DraftUpdate:
    return DraftUpdate(run.request_id, num_drafts, list(range(num_drafts + 1)), None)
