"""The draft budget: per-depth acceptance, survivals of chains and trees, and
DSpark's admission over them under a verify cost."""

from __future__ import annotations

import random

import pytest

from specray.actors.drafting.base import DraftProposal
from specray.actors.engine.budget import DepthAcceptance, budget_tokens, survivals


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


def test_survivals_multiply_along_each_path() -> None:
    estimate = DepthAcceptance(prior=0.5)
    tree = DraftProposal([1, 2, 3, 4], parents=[-1, -1, 0, 2], confidence=[0.8, 0.2, 1.0, 0.5])
    assert survivals(tree, estimate) == pytest.approx([0.4, 0.1, 0.2, 0.05])
    chain = DraftProposal([1, 2, 3])  # no confidence: the measured rates alone
    assert survivals(chain, estimate) == pytest.approx([0.5, 0.25, 0.125])


def test_budget_follows_the_verify_cost() -> None:
    sure = [[0.99] * 16, [0.9, 0.5, 0.1]]
    # A verify whose cost hardly grows: every likely token is worth it.
    assert budget_tokens(sure, 2, 2.0, lambda n: 1.0 + 0.001 * n) == [16, 3]
    # Each verified token costs as much as a decode step: nothing pays.
    assert budget_tokens(sure, 2, 2.0, lambda n: float(n)) == [0, 0]
    # In between, the confident copy is kept and the doubtful tail cut.
    counts = budget_tokens(sure, 2, 2.0, lambda n: 1.0 + 0.15 * n)
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
        counts = budget_tokens(drafts, base, float(base), cost)
        assert all(0 <= c <= len(d) for c, d in zip(counts, drafts, strict=True))
        expected = base + sum(sum(d[:c]) for c, d in zip(counts, drafts, strict=True))
        assert expected / cost(base + sum(counts)) >= base / cost(base) - 1e-9
