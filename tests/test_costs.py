"""The learned round costs the γ scheduler and the verify budget price
drafts with: plain and profiled curves, the fixed part of a round, the
draft steps' cost and overlap."""

from __future__ import annotations

import math

import pytest

from specray.actors.engine.budget import Baseline, budget_tokens
from specray.actors.engine.costs import CostCurve, ProfiledCurve, RoundCostModel, StepCost
from specray.actors.engine.gamma import RoundShape


def test_cost_curve_interpolates_and_never_decreases() -> None:
    curve = CostCurve(decay=0.0)
    assert curve.seconds(5) == 0.0 and curve.empty
    curve.observe(1, 1.0)
    curve.observe(9, 3.0)
    curve.observe(5, 0.5)  # noise below a smaller size's time
    assert curve.seconds(1) == 1.0
    assert curve.seconds(5) == 1.0  # running maximum
    assert curve.seconds(7) == pytest.approx(2.0)
    assert curve.seconds(13) == pytest.approx(5.0)  # extrapolates the last segment


def test_profiled_curve_keeps_the_shape_and_follows_the_load() -> None:
    """The machine slows down 3×: the level follows, the ratio between sizes stays."""
    curve = ProfiledCurve(decay=0.0)
    curve.set_profile([(1, 0.1), (8, 0.1), (32, 0.2)])
    assert curve.seconds(32) / curve.seconds(1) == pytest.approx(2.0)
    curve.observe(8, 0.3)
    assert curve.seconds(1) == pytest.approx(0.3)
    assert curve.seconds(32) == pytest.approx(0.6)
    assert curve.seconds(20) == pytest.approx(0.45)


def test_profiled_curve_fits_a_fixed_part_per_round_apart_from_the_level() -> None:
    """Rounds through a router cost 20 ms whatever their size on top of a
    forward of 10 ms per profiled unit: once sizes vary, the curve carries
    the 20 ms as its own part, where folding it into the level would price
    every extra token too high."""
    curve = ProfiledCurve(decay=0.5)
    curve.set_profile([(1, 0.010), (8, 0.020), (32, 0.060)])  # back to back, in process
    assert curve.fixed == 0.0
    for _ in range(4):  # one size only: nothing to fit a fixed part from
        curve.observe(1, 0.030)
    assert curve.fixed == 0.0
    for _ in range(20):
        for size, relative in [(1, 1.0), (8, 2.0), (32, 6.0)]:
            curve.observe(size, 0.020 + 0.010 * relative)
    assert curve.fixed == pytest.approx(0.020, abs=2e-3)
    assert curve.seconds(1) == pytest.approx(0.030, rel=0.05)
    assert curve.seconds(32) == pytest.approx(0.080, rel=0.05)
    assert curve.as_dict()["fixed_s"] == curve.fixed


def test_prefill_rounds_leave_the_fixed_part_alone() -> None:
    """In process, verifying n drafts costs 59 + 27 (n - 1) ms with nothing
    fixed per round, and each request starts with a 500-token prefill at
    21 ms a token (one logit row). Learning from the prefills too read a
    fixed part of over 50 ms; learning from draft-like rounds alone
    keeps the curve where it is."""

    def verify_ms(n: int) -> float:
        return 59.0 + 27.0 * (n - 1)

    profile = [(n, verify_ms(n) / 1000) for n in (1, 2, 4, 8, 16, 17)]
    rounds = [(n, verify_ms(n) / 1000, n) for n in (4, 9, 12, 17, 17, 17, 6, 17)]
    prefill = (500, 500 * 0.021, 1)
    learned, fooled = ProfiledCurve(), ProfiledCurve()
    for curve in (learned, fooled):
        curve.set_profile(profile)
    for _ in range(6):  # six requests
        for size, seconds, logits in [prefill, *rounds * 3]:
            learned.observe(size, seconds, logits)
            fooled.observe(size, seconds)
    assert learned.fixed == pytest.approx(0.0, abs=1e-3)
    assert learned.seconds(1) == pytest.approx(0.059, rel=0.02)
    assert learned.seconds(17) == pytest.approx(verify_ms(17) / 1000, rel=0.02)
    assert fooled.fixed > 0.05  # what the prefills did to it


def test_a_fixed_part_per_round_makes_more_drafts_pay() -> None:
    """The same survivals and forward costs: with 30 ms a round besides the
    forward, the budget verifies more of the drafts than without."""
    survivals = [[0.9, 0.8, 0.7, 0.6, 0.5, 0.4]]
    plain = ProfiledCurve()
    plain.set_profile([(1, 0.010), (2, 0.012), (8, 0.030)])
    with_round = ProfiledCurve()
    with_round.set_profile([(1, 0.010), (2, 0.012), (8, 0.030)])
    with_round.fixed = 0.030
    alone = budget_tokens(survivals, Baseline(1, 1.0, plain.seconds))
    behind_a_router = budget_tokens(survivals, Baseline(1, 1.0, with_round.seconds))
    assert behind_a_router[0] > alone[0]


def test_round_cost_overlap_hides_the_cheaper_side() -> None:
    model = RoundCostModel()
    model.verify.observe(4, 1.0)
    model.draft.observe((2, 2), 0.4)  # no profile: every step costs the same
    assert model.round_seconds(RoundShape(4)) == pytest.approx(1.0)
    assert model.round_seconds(RoundShape(4, (2, 2))) == pytest.approx(1.4)
    assert model.round_seconds(RoundShape(4, (9, 2, 2))) == pytest.approx(1.6)
    model.overlap = True
    assert model.round_seconds(RoundShape(4, (2, 2))) == pytest.approx(1.0)


def test_step_cost_prices_a_catch_up_by_the_drafter_profile() -> None:
    """Feeding 64 tokens costs 8 one-token steps on this drafter; the machine
    then slows 2×: the level follows, the shape stays."""
    cost = StepCost(decay=0.0)
    assert cost.seconds((1, 1)) == 0.0  # unmeasured: assumed free, so it gets tried
    cost.set_profile([(1, 0.01), (8, 0.01), (64, 0.08)])
    assert cost.seconds((1, 1, 1)) == pytest.approx(0.03)
    assert cost.seconds((64, 1)) == pytest.approx(0.09)
    cost.observe((1, 1), 0.04)
    assert cost.seconds((64, 1)) == pytest.approx(0.18)
    assert cost.as_dict()["level_s"] == pytest.approx(0.02)


def _rounds_at(sizes: list[int], repeats: int) -> list[int]:
    """Mostly full batches of 16, now and then a round verifying drafts."""
    return [size for _ in range(repeats) for size in [16, 16, 16, *sizes]]


def test_rounds_bend_a_profile_that_priced_big_rounds_cheap() -> None:
    """A forward costs 50 ms a token; the start-up profile caught 16 tokens
    in a slow moment (1.25x), so 32 looked only 1.6x as dear as 16 and each
    token past a full batch cheap. Rounds of 16 to 48 tokens bend the curve
    back: 32 and 48 are priced within a few per cent of 2x and 3x 16."""

    def truth(n: int) -> float:
        return 0.05 * n

    curve = ProfiledCurve()
    curve.set_profile(
        [(n, truth(n) * (1.25 if n == 16 else 1.0)) for n in (1, 2, 4, 8, 16, 32, 64)]
    )
    curve.observe(16, truth(16))
    assert curve.seconds(32) / curve.seconds(16) == pytest.approx(1.6)
    for size in _rounds_at([20, 24, 32, 40, 48], 60):
        curve.observe(size, truth(size))
    assert curve.seconds(16) == pytest.approx(truth(16), rel=0.02)
    for size in (24, 32, 48):
        assert curve.seconds(size) == pytest.approx(truth(size), rel=0.05)
    assert curve.as_dict()["correction"][32] > 1.2


def test_rounds_of_the_reference_size_alone_keep_the_profile() -> None:
    """Every round verifies 16 tokens, at a level that swings: the level
    follows and nothing bends, so other sizes keep the profile's ratios."""
    profile = [(1, 0.05), (8, 0.3), (16, 0.8), (32, 1.5)]
    curve = ProfiledCurve()
    curve.set_profile(profile)
    for i in range(200):
        curve.observe(16, 0.8 * (1.0 + 0.3 * math.sin(i)))
    assert curve.as_dict()["correction"] == {}
    assert curve.seconds(32) / curve.seconds(16) == pytest.approx(1.5 / 0.8, rel=1e-6)


def test_a_load_swing_moves_the_level_not_the_shape() -> None:
    """The profile is right; halfway the machine slows 2x at every size.
    The corrections stay near 1, so the ratio between sizes stays right."""

    def truth(n: int, slow: float) -> float:
        return slow * 0.05 * n

    curve = ProfiledCurve()
    curve.set_profile([(n, truth(n, 1.0)) for n in (1, 2, 4, 8, 16, 32, 64)])
    sizes = _rounds_at([20, 32, 48], 80)
    for i, size in enumerate(sizes):
        curve.observe(size, truth(size, 1.0 if i < len(sizes) // 2 else 2.0))
    assert all(0.9 < f < 1.1 for f in curve.as_dict()["correction"].values())
    assert curve.seconds(48) / curve.seconds(16) == pytest.approx(3.0, rel=0.05)
