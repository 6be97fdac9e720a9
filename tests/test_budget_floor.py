"""The verify budget's floor: admitted drafts never slow a request of the
batch below a share of its rate without them, over its decode so far."""

from __future__ import annotations

import random

from specray.actors.engine.budget import Baseline, budget_tokens
from specray.actors.engine.floor import Floor, Pace


def _rows(n: int) -> float:
    """A compute-bound verify: every row costs as much (16 rows: 17 units)."""
    return 1.0 + n


def test_the_floor_keeps_a_bystander_from_paying_for_the_others_drafts() -> None:
    """Fifteen requests with sure copies and one with nothing to copy, on a
    compute-bound verify. Throughput admits every sure token (the round
    grows 2.9x, and the bystander's rate falls to a third); the floor
    admits only what lengthens the round by at most 1 / 0.95."""
    sure = [[0.99] * 2 for _ in range(15)]
    base = Baseline(16, 16.0, _rows)
    assert sum(budget_tokens(sure, base)) == 30
    floored = budget_tokens(sure, base, floor=Floor(0.95, bystanders=[Pace()]))
    # 17 units of round * (1 / 0.95) allows 0.89 more units: no whole row.
    assert floored == [0] * 15
    roomy = budget_tokens(
        sure, Baseline(16, 16.0, lambda n: 10.0 + n), floor=Floor(0.95, bystanders=[Pace()])
    )
    # 26 units * (1 / 0.95) allows 1.36 more: one row, to the likeliest token.
    assert sum(roomy) == 1


def test_the_floor_lets_every_request_gain_when_all_of_them_draft() -> None:
    """No bystander: the floor holds the round to what the request gaining
    least gains, so sure copies for everyone are admitted as before, and a
    doubtful one does not buy a long round for the others."""
    sure = [[0.99] * 4, [0.99] * 4]
    base = Baseline(2, 2.0, lambda n: 4.0 + n)
    assert budget_tokens(sure, base, floor=Floor(0.95)) == budget_tokens(sure, base) == [4, 4]
    doubtful = [[0.99] * 4, [0.3]]
    unfloored = budget_tokens(doubtful, base)
    floored = budget_tokens(doubtful, base, floor=Floor(0.95))
    assert unfloored == [4, 0]  # throughput: the sure copy, and request 1 pays for it
    assert floored == [0, 0]  # request 1 would keep 0.6 of its rate: not admitted


def test_alone_a_request_is_never_held_back_by_the_floor() -> None:
    rng = random.Random(1)
    for _ in range(200):
        survival, values = 1.0, []
        for _ in range(rng.randint(1, 16)):
            survival *= rng.uniform(0.5, 1.0)
            values.append(survival)
        slope = rng.uniform(0.0, 1.5)

        def cost(n: int, slope: float = slope) -> float:
            return 1.0 + slope * n

        base = Baseline(1, 1.0, cost)
        assert budget_tokens([values], base, floor=Floor(0.95)) == budget_tokens([values], base)


def test_the_floor_counts_the_prefill_share_the_baseline_leaves_out() -> None:
    """A round that also prefills: its sunk seconds lengthen the reference
    round, so the same drafts lengthen it by a smaller share."""
    sure = [[0.99] * 3]
    base = Baseline(2, 2.0, _rows)
    assert budget_tokens(sure, base, floor=Floor(0.95, bystanders=[Pace()])) == [0]
    assert budget_tokens(sure, base, floor=Floor(0.95, bystanders=[Pace()], sunk_seconds=40.0)) == [
        2
    ]


def test_a_request_ahead_of_its_plain_pace_carries_the_others_drafts() -> None:
    """The floor holds over a request's decode so far: a bystander whose own
    copies earlier committed 30 tokens in 10 rounds of 17 units (plain
    pace: 10 rounds) lets the batch admit the others' sure copies; one
    that has only ever decoded a token a round does not."""
    sure = [[0.99] * 2 for _ in range(15)]
    base = Baseline(16, 16.0, _rows)
    ahead = Pace(rounds=10, tokens=30.0, seconds=170.0, plain_seconds=170.0)
    level = Pace(rounds=10, tokens=10.0, seconds=170.0, plain_seconds=170.0)
    assert sum(budget_tokens(sure, base, floor=Floor(0.95, bystanders=[ahead]))) == 30
    assert sum(budget_tokens(sure, base, floor=Floor(0.95, bystanders=[level]))) == 0
    # Its pace moves on with each round priced and committed.
    level.advance(1, 17.0, 17.0)
    assert (level.rounds, level.tokens, level.seconds) == (11, 11.0, 187.0)
