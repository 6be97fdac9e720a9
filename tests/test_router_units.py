"""The router's pure pieces, without Ray: the load-aware γ scheduler, the
learned cost curves, the draft worker's fused update-and-propose call, the
metrics registry and the recovery's backoff and outage clock."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import VOCAB

from specray.actors.drafting.base import DraftProposal, DraftRequest
from specray.actors.drafting.draft_model import DraftModelDrafter
from specray.actors.engine.engine import start_request
from specray.actors.engine.gamma import (
    AcceptanceEstimate,
    RoundShape,
    SurvivalEstimate,
    expected_tokens,
    schedule_gammas,
)
from specray.actors.engine.request import GenerationRequest
from specray.actors.engine.round import DraftUpdate
from specray.actors.model.loader import load_model
from specray.actors.sampling.params import SamplingParams, StoppingCriteria
from specray.actors.sampling.rejection import RejectionResult
from specray.actors.workers.draft_worker import DraftWorker, DraftWorkerSpec
from specray.cluster.costs import CostCurve, ProfiledCurve, RoundCostModel, StepCost
from specray.cluster.metrics import RouterMetrics
from specray.cluster.recovery import Backoff, OutageClock, RecoveryConfig
from specray.cluster.round_drafts import (
    DraftPaths,
    backlog_after,
    choose_gammas,
    entry_seconds,
    fed_steps,
    record_verdict,
)
from specray.cluster.router_state import Footprint
from specray.cluster.tracked import Tracked

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


def test_survival_estimate_counts_only_tested_drafts() -> None:
    """α = 0.8 i.i.d. at γ = 4: drafted-based estimate reads low, tested-based does not."""
    gen = torch.Generator().manual_seed(0)
    drafted, tested = AcceptanceEstimate(decay=1.0), SurvivalEstimate(decay=1.0)
    for _ in range(3000):
        accepted = 0
        while accepted < 4 and torch.rand((), generator=gen).item() < 0.8:
            accepted += 1
        drafted.update(4, accepted)
        tested.update(4, accepted)
    assert abs(tested.alpha - 0.8) < 0.02
    assert drafted.alpha < 0.65


def test_survival_prior_and_drift() -> None:
    estimate = SurvivalEstimate.with_prior(0.9)
    assert estimate.alpha == pytest.approx(0.9)
    for _ in range(5):
        estimate.update(4, 0)
    assert estimate.alpha < 0.3
    for _ in range(100):
        estimate.update(0, 0)  # not drafting: drifts back toward its prior
    assert estimate.alpha == pytest.approx(0.9, abs=0.01)


# -- learned costs ------------------------------------------------------------------


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


def test_backlog_after_a_round() -> None:
    update = DraftUpdate("r", 2, [5, 6, 7], None)  # 2 of 4 drafts accepted, plus one
    assert backlog_after(1, 4, update) == 1  # both accepted drafts were fed
    assert backlog_after(1, 2, update) == 2  # only the first draft was fed
    assert backlog_after(9, 0, DraftUpdate("r", 0, [5], None)) == 10


# -- the draft worker ------------------------------------------------------------


def test_draft_worker_fuses_rollback_into_propose(tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    """One propose call carrying the last rounds' updates drafts exactly what
    a drafter told separately does, including rounds with no proposal."""
    draft_dir: Path = tiny_dir_factory("qwen2", 7)
    worker = DraftWorker(DraftWorkerSpec("model", str(draft_dir), num_slots=2, max_len=128))
    direct = DraftModelDrafter(load_model(draft_dir), 2, 128)
    prompt = torch.randint(3, VOCAB, (9,), generator=torch.Generator().manual_seed(3)).tolist()
    for drafter in (worker, direct):
        drafter.start("a", prompt, SamplingParams())
    # Round 1 keeps 1 of 3 drafts; round 2 drafts nothing; round 3 keeps all.
    first_w = worker.propose([DraftRequest("a", 3)])
    first_d = direct.propose([DraftRequest("a", 3)])
    assert first_w[0].token_ids == first_d[0].token_ids
    round1 = DraftUpdate("a", 1, [first_d[0].token_ids[0], 7], None)
    round2 = DraftUpdate("a", 0, [11], None)
    direct.accept("a", round1.num_accepted, round1.new_token_ids)
    direct.accept("a", round2.num_accepted, round2.new_token_ids)
    again_w = worker.propose([DraftRequest("a", 2)], [round1, round2])
    again_d = direct.propose([DraftRequest("a", 2)])
    assert again_w[0].token_ids == again_d[0].token_ids
    # Asking for fewer than a drafter returns is clipped; 0 asks nothing.
    assert [len(p) for p in worker.propose([DraftRequest("a", 0)])] == [0]
    assert worker.num_requests() == 1
    assert worker.finish(["a", "unknown"]) == 1 and worker.num_requests() == 0


def test_ngram_worker_restart_from_committed_tokens() -> None:
    """A request moved to a fresh replica drafts as if it had been there all along."""
    tokens = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]
    moved, stayed = DraftWorker(DraftWorkerSpec()), DraftWorker(DraftWorkerSpec())
    stayed.start("r", tokens[:4], SamplingParams())
    stayed.propose([], [DraftUpdate("r", 0, [t], None) for t in tokens[4:]])
    moved.start("r", tokens, SamplingParams())
    ask = [DraftRequest("r", 4)]
    assert moved.propose(ask)[0].token_ids == stayed.propose(ask)[0].token_ids == [7, 8, 5, 6]


def test_draft_worker_spec_validation() -> None:
    with pytest.raises(ValueError, match="model_dir"):
        DraftWorkerSpec("model")
    with pytest.raises(ValueError, match="kind"):
        DraftWorkerSpec("eagle")


# -- metrics ------------------------------------------------------------------------


def test_metrics_count_like_vllm_and_serve_on_loopback() -> None:
    metrics = RouterMetrics("m", num_positions=3)
    metrics.observe_round(RejectionResult([[1, 2], [3], [4]], [1, 0, 0], [3, 2, 0]))
    metrics.observe_first_token(0.05)
    metrics.set_queues(running=2, waiting=1)
    metrics.observe_failure("draft")
    metrics.observe_restart("draft")
    metrics.observe_fallbacks(3)
    metrics.set_targets_up(1)
    port = metrics.serve(0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
            text = page.read().decode()
    finally:
        metrics.close()
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert samples['specray:spec_decode_num_drafts_total{model_name="m"}'] == 2
    assert samples['specray:spec_decode_num_draft_tokens_total{model_name="m"}'] == 5
    assert samples['specray:spec_decode_num_accepted_tokens_total{model_name="m"}'] == 1
    per_pos = 'specray:spec_decode_num_accepted_tokens_per_pos_total{model_name="m",position="%d"}'
    assert [samples[per_pos % i] for i in range(3)] == [1, 0, 0]
    assert samples['specray:num_requests_running{model_name="m"}'] == 2
    assert samples['specray:num_requests_waiting{model_name="m"}'] == 1
    assert samples['specray:time_to_first_token_seconds_count{model_name="m"}'] == 1
    # Failures and restarts (specray's own names).
    assert samples['specray:replica_failures_total{kind="draft",model_name="m"}'] == 1
    assert samples['specray:replica_failures_total{kind="target",model_name="m"}'] == 0
    assert samples['specray:draft_restarts_total{model_name="m"}'] == 1
    assert samples['specray:target_restarts_total{model_name="m"}'] == 0
    assert samples['specray:spec_decode_fallbacks_total{model_name="m"}'] == 3
    assert samples['specray:target_replicas_up{model_name="m"}'] == 1


# -- recovery -----------------------------------------------------------------------


def test_backoff_doubles_to_its_cap_and_resets() -> None:
    backoff = Backoff(0.5, 3.0)
    assert [backoff.next() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    backoff.reset()
    assert backoff.next() == 0.5


def test_outage_clock_runs_from_the_first_loss_until_a_target_is_back() -> None:
    clock = OutageClock()
    clock.update(up=True, now=1.0)
    assert clock.seconds(2.0) is None and not clock.expired(2.0, bound_s=0)
    clock.update(up=False, now=10.0)
    clock.update(up=False, now=12.0)  # still down: the outage began at 10
    assert clock.seconds(13.0) == 3.0
    assert not clock.expired(14.9, bound_s=5) and clock.expired(15.0, bound_s=5)
    assert clock.expired(10.0, bound_s=0)  # a zero bound: fail at once
    clock.update(up=True, now=16.0)
    assert clock.seconds(17.0) is None and not clock.expired(100.0, bound_s=5)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"target_restart_timeout_s": -1}, "target_restart_timeout_s"),
        ({"watch_interval_s": 0}, "watch_interval_s"),
        ({"max_replays": -1}, "max_replays"),
        ({"backoff_s": 0}, "backoff_s"),
        ({"backoff_s": 5, "max_backoff_s": 1}, "max_backoff_s"),
    ],
)
def test_recovery_config_names_the_bad_field(options: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        RecoveryConfig(**options)


def test_footprint_totals_every_actor() -> None:
    idle = Footprint(router_requests=0, target_slots={0: (0, 0)}, draft_requests={0: 0, 1: 0})
    busy = Footprint(router_requests=2, target_slots={0: (2, 2)}, draft_requests={0: 1, 1: 1})
    assert (idle.total, busy.total) == (0, 8)


# -- catching drafts up -------------------------------------------------------------


def _tracked(
    request_id: str, backlog: int, alpha: float, lookup_alpha: float = 0.5, max_tokens: int = 256
) -> Tracked:
    stopping = StoppingCriteria(max_tokens=max_tokens)
    run = start_request(
        GenerationRequest(request_id, [3] * backlog, stopping=stopping), (), None, 4
    )
    run.cached_len = len(run.tokens) - 1  # decoding: the target verifies one token each
    return Tracked(
        run,
        asyncio.Queue(),
        target=0,
        draft=0,
        draft_backlog=backlog,
        model_acceptance=SurvivalEstimate.with_prior(alpha),
        lookup_acceptance=SurvivalEstimate.with_prior(lookup_alpha),
    )


MODEL = DraftPaths(model=True, lookup=False)


def _flat_verify_costs() -> RoundCostModel:
    """Verifying is flat; feeding 256 tokens costs the drafter 40 one-token steps."""
    costs = RoundCostModel()
    costs.verify.set_profile([(1, 0.1), (64, 0.1)])
    costs.draft.set_profile([(1, 0.01), (8, 0.01), (256, 0.4)])
    return costs


def test_a_catch_up_is_spread_over_the_rounds_left() -> None:
    costs = _flat_verify_costs()
    in_step, new, ending = (
        _tracked("a", 1, 0.9),
        _tracked("b", 300, 0.9),
        _tracked("c", 300, 0.9, max_tokens=3),
    )
    assert entry_seconds(in_step, 0.9, 4, costs, True) == 0.0
    feed = costs.draft.seconds((300,)) - costs.draft.seconds((1,))
    assert feed > 0.4
    assert entry_seconds(new, 0.9, 4, costs, True) == pytest.approx(
        feed * expected_tokens(0.9, 4) / 256
    )
    assert entry_seconds(ending, 0.9, 4, costs, True) == pytest.approx(feed)  # one round left
    assert entry_seconds(new, 0.9, 4, costs, False) == pytest.approx(feed)  # no later drafts


def test_a_request_far_behind_drafts_only_if_its_catch_up_pays_off() -> None:
    """Three requests 300 tokens behind: the two with many tokens left
    draft (their catch-up, spread over ~60 rounds, is cheap); the one about
    to end would pay the whole feed for one round, so it decodes plainly
    while the others draft."""
    costs = _flat_verify_costs()
    batch = [
        _tracked("long", 300, 0.9),
        _tracked("ending", 300, 0.9, max_tokens=6),
        _tracked("in step", 1, 0.8),
    ]
    choose_gammas(batch, MODEL, adaptive=True, costs=costs)
    gammas = [t.run.gamma for t in batch]
    assert gammas[0] > 0 and gammas[1] == 0 and gammas[2] > 0
    assert [t.lookup_gamma for t in batch] == [0, 0, 0]
    # Timed by what each path did: "ending"'s proposal came from a lookup.
    drafts = [DraftProposal([1] * gammas[0]), DraftProposal([1, 2], from_lookup=True)]
    drafts.append(DraftProposal([1] * gammas[2]))
    fed = RoundShape.of(0, [gammas[0], 0, gammas[2]], [300, 300, 1]).draft_steps
    assert fed_steps(batch, drafts) == fed and fed[0] == 301
    assert fed_steps(batch, drafts, lookup=True) == (1, 1)


def test_compute_bound_verify_drafts_nothing_behind_or_not() -> None:
    costs = RoundCostModel()
    costs.verify.set_profile([(1, 0.1), (64, 6.4)])
    costs.draft.set_profile([(1, 0.01), (256, 0.4)])
    batch = [_tracked("a", 300, 0.6), _tracked("b", 1, 0.6)]
    choose_gammas(batch, MODEL, adaptive=True, costs=costs)
    assert [t.run.gamma for t in batch] == [0, 0]


def test_a_hybrid_copies_where_model_drafts_do_not_pay() -> None:
    """A draft model that costs most of a target step drafts nothing at
    batch 1; lookups cost a round trip, so copying is still asked for (and
    a lookup drafter alone never prices a backlog)."""
    costs = RoundCostModel()
    costs.verify.set_profile([(1, 0.1), (8, 0.1)])
    costs.draft.set_profile([(1, 0.08), (8, 0.09)])
    costs.lookup.observe((1, 1), 0.002)
    batch = [_tracked("a", 1, 0.6, lookup_alpha=0.7)]
    hybrid = DraftPaths(model=True, lookup=True)
    choose_gammas(batch, hybrid, adaptive=True, costs=costs)
    assert batch[0].run.gamma == 0 and batch[0].lookup_gamma == 4
    batch = [_tracked("a", 300, 0.6, lookup_alpha=0.7)]
    choose_gammas(batch, DraftPaths(model=False, lookup=True), True, costs)
    assert batch[0].run.gamma == 0 and batch[0].lookup_gamma == 4
    # Fixed γ: each path the drafter has gets the ceiling.
    choose_gammas(batch, hybrid, adaptive=False, costs=costs)
    assert batch[0].run.gamma == batch[0].lookup_gamma == 4


def test_verdicts_update_the_path_they_came_by() -> None:
    tracked = _tracked("a", 1, 0.5, lookup_alpha=0.5)
    record_verdict(tracked, DraftProposal([1, 2, 3, 4], from_lookup=True), 4)
    assert tracked.lookup_acceptance.alpha > 0.5 and tracked.model_acceptance.alpha == 0.5
    record_verdict(tracked, DraftProposal([1, 2]), 0)
    assert tracked.model_acceptance.alpha < 0.5
