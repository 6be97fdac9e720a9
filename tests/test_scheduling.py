"""The one γ policy the engine and the router share, without Ray: the
load-aware scheduler, per-request acceptance and the price of a drafter
catching up (the learned cost curves: tests/test_costs.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scheduling_helpers import MODEL
from scheduling_helpers import decoding_run as _run

from specray.actors.drafting.base import DraftPaths, DraftProposal, DraftUpdate
from specray.actors.engine.backlog import backlog_after, fed_steps
from specray.actors.engine.costs import RoundCostModel
from specray.actors.engine.gamma import (
    RoundShape,
    SurvivalEstimate,
    expected_tokens,
    schedule_gammas,
)
from specray.actors.engine.scheduling import GammaScheduler

# -- the γ scheduler -----------------------------------------------------------


def _by(cost: Callable[[int, int], float]) -> Callable[[RoundShape], float]:
    """A round cost from verified tokens and draft depth only."""
    return lambda shape: cost(shape.verify_tokens, shape.depth)


def _throughput(alphas: list[float], gammas: list[int], seconds: float) -> float:
    return sum(expected_tokens(a, g) for a, g in zip(alphas, gammas, strict=True)) / seconds


def test_flat_verify_cost_drafts_everything_worth_anything() -> None:
    """Verifying extra tokens is free (bf16 on CPU, a GPU at low load): draft to the cap."""
    gammas = schedule_gammas([0.8, 0.5, 0.1], [4, 4, 2], _by(lambda tokens, depth: 1.0))
    assert gammas == [4, 4, 2]


def test_linear_verify_cost_turns_speculation_off() -> None:
    """Compute-bound (fp32 on CPU at high load): a token costs as much as it
    earns at best, so any α < 1 loses and γ drops to 0."""
    gammas = schedule_gammas([0.9] * 8, [4] * 8, _by(lambda tokens, depth: float(tokens)))
    assert gammas == [0] * 8


def test_load_shrinks_gamma() -> None:
    """The same requests get less speculation as the batch grows."""

    def cost(tokens: int, depth: int) -> float:  # flat up to 16 tokens, then linear
        return max(1.0, tokens / 16)

    alone = schedule_gammas([0.7], [8], _by(cost))
    crowded = schedule_gammas([0.7] * 16, [8] * 16, _by(cost))
    assert alone[0] > 0 and max(crowded) < alone[0]


def test_confident_requests_get_the_budget_first() -> None:
    def cost(tokens: int, depth: int) -> float:
        return max(1.0, tokens / 6)

    low, high = schedule_gammas([0.3, 0.95], [4, 4], _by(cost))
    assert high > low


def test_draft_depth_cost_limits_gamma() -> None:
    """A slow draft model makes deep proposals not worth it."""
    cheap = schedule_gammas([0.8], [8], _by(lambda tokens, depth: 1.0 + 0.01 * depth))
    slow = schedule_gammas([0.8], [8], _by(lambda tokens, depth: 1.0 + 0.5 * depth))
    assert cheap == [8] and slow[0] < 3


def test_a_block_drafter_pays_one_step_for_its_block() -> None:
    """The slow drafter above, drafting its five in one forward (DSpark):
    more drafts cost only their verification, so it drafts its block; a
    sixth starts a second step. Chained, the same step cost stops it at 2."""
    cost = _by(lambda tokens, depth: 1.0 + 0.01 * tokens + 0.5 * depth)
    assert schedule_gammas([0.8], [5], cost) == [2]
    assert schedule_gammas([0.8], [5], cost, block=5) == [5]
    assert schedule_gammas([0.8], [6], cost, block=5) == [5]
    assert schedule_gammas([0.8, 0.8], [5, 5], cost, block=5) == [5, 5]


def test_a_prefill_is_sunk_so_drafts_riding_on_it_pay_their_own_way() -> None:
    """Compute-bound verify: a lone decode step should not speculate, and a
    long prefill in the same forward does not change that (its 100 tokens
    cost the same whatever is drafted); memory-bound, drafts pay either way.
    A 5 s catch-up spread thin over a prefill round of 100 s would look cheap
    against that round's rate: against decoding's it does not."""

    def linear(tokens: int, depth: int) -> float:
        return float(tokens)

    def flat(tokens: int, depth: int) -> float:
        return max(1.0, tokens / 64)

    assert schedule_gammas([0.6], [4], _by(linear)) == [0]
    assert schedule_gammas([0.6], [4], _by(linear), base_tokens=100) == [0]
    assert schedule_gammas([0.6], [4], _by(flat), base_tokens=100) == [4]
    assert schedule_gammas([0.9], [4], _by(flat), base_tokens=100, entry_seconds=[5.0]) == [0]


@settings(max_examples=200, deadline=None)
@given(
    alphas=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12),
    limit=st.integers(0, 8),
    flat=st.integers(1, 64),
    draft_cost=st.floats(0.0, 0.5),
    entries=st.lists(st.floats(0.0, 3.0), min_size=12, max_size=12),
)
def test_schedule_never_expects_less_than_no_speculation(
    alphas: list[float], limit: int, flat: int, draft_cost: float, entries: list[float]
) -> None:
    entry = entries[: len(alphas)]

    def cost(shape: RoundShape) -> float:  # a draft step costs more the more it feeds
        draft = sum(draft_cost * max(1.0, tokens / 8) for tokens in shape.draft_steps)
        return max(1.0, shape.verify_tokens / flat) + draft

    gammas = schedule_gammas(alphas, [limit] * len(alphas), cost, entry_seconds=entry)
    assert all(0 <= g <= limit for g in gammas)
    tokens = len(alphas) + sum(gammas)
    plain = _throughput(alphas, [0] * len(alphas), cost(RoundShape(len(alphas))))
    entered = sum(e for e, g in zip(entry, gammas, strict=True) if g > 0)
    chosen = cost(RoundShape.of(tokens, gammas)) + entered
    assert _throughput(alphas, gammas, chosen) >= plain - 1e-9


def test_a_request_with_a_costly_entry_waits_while_the_others_draft() -> None:
    """Catching up costs more than its drafts earn this round; the requests
    in step draft as if it were not there."""

    def cost(shape: RoundShape) -> float:
        return 1.0 + 0.05 * shape.depth

    alphas, limits = [0.9, 0.8, 0.8], [4, 4, 4]
    assert schedule_gammas(alphas, limits, cost)[0] > 0
    gammas = schedule_gammas(alphas, limits, cost, entry_seconds=[5.0, 0.0, 0.01])
    assert gammas[0] == 0 and gammas[1] > 0 and gammas[2] > 0


def test_round_shape_counts_the_backlog_in_the_first_step() -> None:
    shape = RoundShape.of(10, [3, 0, 1], [40, 7, 1])
    assert shape.draft_steps == (41, 1, 1) and shape.depth == 3
    assert RoundShape.of(3, [0, 0, 0]).draft_steps == ()
    # A block drafter: the block in the first step, a longer γ in a second.
    assert RoundShape.of(10, [5, 3, 0], [4, 1, 1], block=5).draft_steps == (5,)
    assert RoundShape.of(10, [7, 5], [4, 1], block=5).draft_steps == (5, 1)


def test_survival_estimate_counts_only_tested_drafts() -> None:
    """α = 0.8 i.i.d. at γ = 4: drafted-based estimate reads low, tested-based does not."""
    gen = torch.Generator().manual_seed(0)
    tested = SurvivalEstimate(decay=1.0)
    accepted_sum = drafted_sum = 0
    for _ in range(3000):
        accepted = 0
        while accepted < 4 and torch.rand((), generator=gen).item() < 0.8:
            accepted += 1
        accepted_sum, drafted_sum = accepted_sum + accepted, drafted_sum + 4
        tested.update(4, accepted)
    assert abs(tested.alpha - 0.8) < 0.02
    assert accepted_sum / drafted_sum < 0.65  # what counting every draft would read


def test_survival_prior_and_drift() -> None:
    estimate = SurvivalEstimate.with_prior(0.9)
    assert estimate.alpha == pytest.approx(0.9)
    for _ in range(5):
        estimate.update(4, 0)
    assert estimate.alpha < 0.3
    for _ in range(100):
        estimate.update(0, 0)  # not drafting: drifts back toward its prior
    assert estimate.alpha == pytest.approx(0.9, abs=0.01)


# -- what a drafter feeds ---------------------------------------------------------


def test_backlog_after_a_round() -> None:
    update = DraftUpdate("r", 2, [5, 6, 7], None)  # 2 of 4 drafts accepted, plus one
    assert backlog_after(1, 4, update) == 1  # both accepted drafts were fed
    assert backlog_after(1, 2, update) == 2  # only the first draft was fed
    assert backlog_after(9, 0, DraftUpdate("r", 0, [5], None)) == 10


def test_a_hidden_state_drafter_has_no_prompt_to_catch_up() -> None:
    """A draft model taking a request over feeds its whole context; a
    drafter of the target's hidden states gets one row after the prompt."""
    hidden = DraftPaths(model=True, lookup=False, reads_prompt=False)
    assert GammaScheduler(MODEL).start_backlog(300) == 300
    assert GammaScheduler(hidden).start_backlog(300) == 1
    assert GammaScheduler(None).start_backlog(300) == 300


def test_a_block_drafter_is_timed_as_one_step() -> None:
    """What observe_propose learns from: a DSpark call that returned 4 of
    its 5 drafts, and one that returned 5, each ran one forward."""
    runs = [_run("a", 3, 0.5), _run("b", 1, 0.5)]
    drafts = [DraftProposal([1, 2, 3, 4]), DraftProposal([1, 2, 3, 4, 5])]
    assert fed_steps(runs, drafts, block=5) == (4,)
    assert fed_steps(runs, drafts) == (4, 2, 2, 2, 1)


def test_a_dropped_draft_is_timed_and_tracked_as_the_step_it_was() -> None:
    """A draft model that made two drafts and dropped the second (its stop
    rule) ran two steps and fed its first draft: timed as two steps, not
    one (a 0.5B draft model read twice its cost), and left one token fewer
    behind once the draft it fed is accepted."""
    runs = [_run("a", 1, 0.5)]
    dropped = DraftProposal([7], dropped=1)
    assert dropped.model_steps == 2
    assert fed_steps(runs, [dropped]) == (1, 1)
    assert fed_steps(runs, [DraftProposal([7])]) == (1,)
    update = DraftUpdate("a", 1, [7, 8], None)
    assert backlog_after(1, dropped.model_steps, update) == 1
    assert backlog_after(1, len(dropped), update) == 2
    # A model's drafts cut off after the call count as dropped: they were
    # made. Copies cut off were never a step.
    assert DraftProposal([1, 2, 3, 4]).clipped(1).model_steps == 4
    assert DraftProposal([1, 2, 3], from_lookup=True).clipped(1).model_steps == 1


# -- catching drafts up -------------------------------------------------------------


def _flat_verify_costs() -> RoundCostModel:
    """Verifying is flat; feeding 256 tokens costs the drafter 40 one-token steps."""
    costs = RoundCostModel()
    costs.verify.set_profile([(1, 0.1), (64, 0.1)])
    costs.draft.set_profile([(1, 0.01), (8, 0.01), (256, 0.4)])
    return costs


def test_a_catch_up_is_spread_over_the_rounds_left() -> None:
    costs = _flat_verify_costs()
    scheduler = GammaScheduler(MODEL, costs=costs)
    in_step, new, ending = (
        _run("a", 1, 0.9),
        _run("b", 300, 0.9),
        _run("c", 300, 0.9, max_tokens=3),
    )
    assert scheduler.entry_seconds(in_step, 0.9, 4, True) == 0.0
    feed = costs.draft.seconds((300,)) - costs.draft.seconds((1,))
    assert feed > 0.4
    assert scheduler.entry_seconds(new, 0.9, 4, True) == pytest.approx(
        feed * expected_tokens(0.9, 4) / 255  # 255 tokens left after the first
    )
    assert scheduler.entry_seconds(ending, 0.9, 4, True) == pytest.approx(feed)  # one round left
    assert scheduler.entry_seconds(new, 0.9, 4, False) == pytest.approx(feed)  # no later drafts


def test_a_catch_up_in_chunks_is_charged_every_chunk_left() -> None:
    """With a round budget of 256 tokens, a request 1,024 tokens behind
    feeds four chunks before it drafts again: each of those rounds is
    charged all the chunks still to feed, against the rounds left once it
    drafts. Charged only the chunk it fed, it drafted (and stalled every
    round of the batch for a chunk) where the whole catch-up could not pay."""
    costs = _flat_verify_costs()
    scheduler = GammaScheduler(MODEL, costs=costs, max_batched_tokens=256)
    assert scheduler.catch_up_chunks(1024) == [256] * 4
    assert scheduler.catch_up_chunks(600) == [256, 256, 88]
    assert scheduler.catch_up_chunks(256) == [256]
    chunk = costs.draft.seconds((256,)) - costs.draft.seconds((1,))
    one_chunk, four_chunks = (
        _run("one", 256, 0.9, max_tokens=16),
        _run("four", 1024, 0.9, max_tokens=16),
    )
    per_round = expected_tokens(0.9, 4)
    assert scheduler.entry_seconds(one_chunk, 0.9, 4, True) == pytest.approx(chunk * per_round / 15)
    assert scheduler.entry_seconds(four_chunks, 0.9, 4, True) == pytest.approx(
        4 * chunk * per_round / (15 - 3)  # three rounds feed a chunk and commit one token each
    )
    assert scheduler.entry_seconds(four_chunks, 0.9, 4, False) == pytest.approx(4 * chunk)
    for run in (one_chunk, four_chunks):
        scheduler.choose([run])
    assert one_chunk.draft.gamma > 0 and four_chunks.draft.gamma == 0


def test_a_request_far_behind_drafts_only_if_its_catch_up_pays_off() -> None:
    """Three requests 300 tokens behind: the two with many tokens left
    draft (their catch-up, spread over ~60 rounds, is cheap); the one about
    to end would pay the whole feed for one round, so it decodes plainly
    while the others draft."""
    batch = [
        _run("long", 300, 0.9),
        _run("ending", 300, 0.9, max_tokens=6),
        _run("in step", 1, 0.8),
    ]
    GammaScheduler(MODEL, costs=_flat_verify_costs()).choose(batch)
    gammas = [r.draft.gamma for r in batch]
    assert gammas[0] > 0 and gammas[1] == 0 and gammas[2] > 0
    assert [r.draft.lookup_gamma for r in batch] == [0, 0, 0]
    # Timed by what each path did: "ending"'s proposal came from a lookup.
    drafts = [DraftProposal([1] * gammas[0]), DraftProposal([1, 2], from_lookup=True)]
    drafts.append(DraftProposal([1] * gammas[2]))
    fed = RoundShape.of(0, [gammas[0], 0, gammas[2]], [300, 300, 1]).draft_steps
    assert fed_steps(batch, drafts) == fed and fed[0] == 301
    assert fed_steps(batch, drafts, lookup=True) == (1, 1)


def test_a_hybrid_copies_where_model_drafts_do_not_pay() -> None:
    """A draft model that costs most of a target step drafts nothing at
    batch 1; lookups cost a round trip, so copying is still asked for (and
    a lookup drafter alone never prices a backlog)."""
    costs = RoundCostModel()
    costs.verify.set_profile([(1, 0.1), (8, 0.1)])
    costs.draft.set_profile([(1, 0.08), (8, 0.09)])
    costs.lookup.observe((1, 1), 0.002)
    hybrid = DraftPaths(model=True, lookup=True)
    batch = [_run("a", 1, 0.6, lookup_alpha=0.7)]
    scheduler = GammaScheduler(hybrid, costs=costs)
    scheduler.choose(batch)  # the model path's one probe
    scheduler.choose(batch)
    assert batch[0].draft.gamma == 0 and batch[0].draft.lookup_gamma == 4
    batch = [_run("a", 300, 0.6, lookup_alpha=0.7)]
    GammaScheduler(DraftPaths(model=False, lookup=True), costs=costs).choose(batch)
    assert batch[0].draft.gamma == 0 and batch[0].draft.lookup_gamma == 4
    # Fixed γ: each path the drafter has gets the ceiling.
    GammaScheduler(hybrid, adaptive=False, costs=costs).choose(batch)
    assert batch[0].draft.gamma == batch[0].draft.lookup_gamma == 4


def test_fixed_speculation_drafts_its_ceiling_where_drafting_does_not_pay() -> None:
    """Verifying costs as much per token as it earns at best: the budget
    drafts nothing for a request, while one with fixed speculation drafts
    its whole ceiling beside it, with no stop rule."""
    costs = RoundCostModel()
    costs.verify.set_profile([(1, 0.1), (2, 0.2), (64, 6.4)])
    budgeted, fixed = _run("budgeted", 1, 0.9), _run("fixed", 1, 0.9)
    fixed.request = replace(fixed.request, fixed_speculation=True)
    scheduler = GammaScheduler(MODEL, costs=costs)
    scheduler.choose([budgeted, fixed])  # the model path's one probe
    scheduler.choose([budgeted, fixed])
    assert (budgeted.draft.gamma, fixed.draft.gamma) == (0, 4)
    assert fixed.draft.stop is None


def test_a_request_without_a_drafter_decodes_target_only() -> None:
    run = _run("a", 1, 0.9)
    run.draft.detach()
    GammaScheduler(MODEL, costs=_flat_verify_costs()).choose([run])
    assert run.draft.most == 0


def test_verdicts_update_the_path_they_came_by_and_queue_for_the_drafter() -> None:
    scheduler = GammaScheduler(DraftPaths(model=True, lookup=True))
    run = _run("a", 1, 0.5, lookup_alpha=0.5)
    update = DraftUpdate("a", 4, [1, 2, 3, 4, 5], None)
    scheduler.record(run, DraftProposal([1, 2, 3, 4], from_lookup=True), update)
    assert run.draft.lookup_acceptance.alpha > 0.5 and run.draft.model_acceptance.alpha == 0.5
    assert run.draft.updates == [update] and run.draft.backlog == 6  # copies fed nothing
    scheduler.record(run, DraftProposal([1, 2]), DraftUpdate("a", 0, [9], None))
    assert run.draft.model_acceptance.alpha < 0.5 and run.draft.backlog == 1
    # New requests start from the pool's acceptance of each path.
    fresh = scheduler.new_draft_state()
    assert fresh.lookup_acceptance.alpha > fresh.model_acceptance.alpha


def test_a_draft_model_waits_for_the_first_token_and_copies_do_not() -> None:
    """Before a request's first token the draft model would feed the whole
    prompt ahead of the target's verify: it drafts from the second token on,
    while copies (free) are asked for at once, and a drafter of the target's
    hidden states (nothing to catch up on) drafts at once too."""
    hybrid = DraftPaths(model=True, lookup=True)
    fresh = _run("fresh", 300, 0.9)
    fresh.output_ids.clear()
    in_step = _run("in step", 1, 0.9)
    in_step.output_ids.clear()
    GammaScheduler(hybrid, adaptive=False).choose([fresh, in_step])
    assert (fresh.draft.gamma, fresh.draft.lookup_gamma) == (0, 4)
    assert (in_step.draft.gamma, in_step.draft.lookup_gamma) == (4, 4)
    fresh.output_ids.append(5)
    GammaScheduler(hybrid, adaptive=False).choose([fresh])
    assert fresh.draft.gamma == 4
