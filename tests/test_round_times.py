"""Where a round's wall time goes: the wait for the drafters apart from
the budget's cut, which is the round's own work; and what the verify cost
model priced the round's forwards at, beside what they took."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import torch
from scheduling_helpers import decoding_run

from specray.actors.drafting.base import DraftPaths, DraftProposal, DraftRequest, DraftUpdate
from specray.actors.engine.request import RunningRequest
from specray.actors.engine.round import speculative_round
from specray.actors.engine.scheduling import GammaScheduler
from specray.actors.engine.target import VerifyInput, VerifyOutput

DRAFTER_S = 0.02
BUDGET_S = 0.3


class _SlowDrafter:
    hidden_layers: tuple[int, ...] = ()

    async def propose(
        self, replica: int, asks: list[DraftRequest], updates: list[DraftUpdate]
    ) -> list[DraftProposal] | None:
        await asyncio.sleep(DRAFTER_S)
        return [DraftProposal([5, 6], from_lookup=True) for _ in asks]


class _LostTarget:
    verifies_trees = True

    async def verify(
        self, replica: int | None, inputs: list[VerifyInput], hidden_layers: tuple[int, ...]
    ) -> list[VerifyOutput] | None:
        return None  # the replica failed: the round ends without committing


class _SlowBudget(GammaScheduler):
    def trim(
        self, batch: Sequence[RunningRequest], drafts: Sequence[DraftProposal]
    ) -> list[DraftProposal]:
        time.sleep(BUDGET_S)
        return list(drafts)


def test_the_drafter_wait_leaves_out_the_budget() -> None:
    run = decoding_run("r", 1, 0.5, max_tokens=40)
    scheduler = _SlowBudget(DraftPaths(model=False, lookup=True))
    result = asyncio.run(speculative_round([run], _SlowDrafter(), _LostTarget(), scheduler))
    assert result.requests == []
    assert DRAFTER_S <= result.times.propose_s < BUDGET_S
    assert result.times.local_s >= BUDGET_S


class _ArgmaxTarget:
    """Answers every row with token 5: the first draft survives, the second not."""

    verifies_trees = True

    async def verify(
        self, replica: int | None, inputs: list[VerifyInput], hidden_layers: tuple[int, ...]
    ) -> list[VerifyOutput] | None:
        await asyncio.sleep(VERIFY_S)
        return [VerifyOutput(None, argmax_ids=torch.full((i.num_logits,), 5)) for i in inputs]


VERIFY_S = 0.05


def test_a_round_reports_its_verified_tokens_at_the_price_the_budget_saw() -> None:
    """The price is the cost model's before it learns from the round, so a
    benchmark can hold the budget's prediction against the wait."""
    run = decoding_run("r", 1, 0.5, max_tokens=40)
    scheduler = GammaScheduler(DraftPaths(model=False, lookup=True), adaptive=False)
    scheduler.costs.verify.set_profile([(1, 0.01), (3, 0.02), (8, 0.04)])
    priced = scheduler.costs.verify.seconds(3)  # the newest token and the two copies
    result = asyncio.run(speculative_round([run], _SlowDrafter(), _ArgmaxTarget(), scheduler))
    assert result.rejection is not None and result.rejection.num_accepted == [1]
    assert result.times.verified_tokens == 3
    assert result.times.priced_verify_s == priced
    assert result.times.verify_s >= VERIFY_S
    assert scheduler.costs.verify.seconds(3) > priced  # it learned the slower round after
