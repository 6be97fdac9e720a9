"""The router's pure pieces, without Ray: the load-aware γ scheduler, the
learned cost curves, the draft worker's fused update-and-propose call, the
metrics registry and the recovery's backoff and outage clock."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import VOCAB

from specray.actors.drafting.base import DraftRequest
from specray.actors.drafting.draft_model import DraftModelDrafter
from specray.actors.engine.gamma import (
    AcceptanceEstimate,
    SurvivalEstimate,
    expected_tokens,
    schedule_gammas,
)
from specray.actors.engine.round import DraftUpdate
from specray.actors.model.loader import load_model
from specray.actors.sampling.params import SamplingParams
from specray.actors.sampling.rejection import RejectionResult
from specray.actors.workers.draft_worker import DraftWorker, DraftWorkerSpec
from specray.cluster.costs import CostCurve, ProfiledCurve, RoundCostModel
from specray.cluster.metrics import RouterMetrics
from specray.cluster.recovery import Backoff, OutageClock, RecoveryConfig
from specray.cluster.router_state import Footprint

# -- the γ scheduler -----------------------------------------------------------


def _throughput(alphas: list[float], gammas: list[int], seconds: float) -> float:
    return sum(expected_tokens(a, g) for a, g in zip(alphas, gammas, strict=True)) / seconds


def test_flat_verify_cost_drafts_everything_worth_anything() -> None:
    """Verifying extra tokens is free (bf16 on CPU, a GPU at low load): draft to the cap."""
    gammas = schedule_gammas([0.8, 0.5, 0.1], [4, 4, 2], lambda tokens, depth: 1.0)
    assert gammas == [4, 4, 2]


def test_linear_verify_cost_turns_speculation_off() -> None:
    """Compute-bound (fp32 on CPU at high load): a token costs as much as it
    earns at best, so any α < 1 loses and γ drops to 0."""
    gammas = schedule_gammas([0.9] * 8, [4] * 8, lambda tokens, depth: float(tokens))
    assert gammas == [0] * 8


def test_load_shrinks_gamma() -> None:
    """The same requests get less speculation as the batch grows."""

    def cost(tokens: int, depth: int) -> float:  # flat up to 16 tokens, then linear
        return max(1.0, tokens / 16)

    alone = schedule_gammas([0.7], [8], cost)
    crowded = schedule_gammas([0.7] * 16, [8] * 16, cost)
    assert alone[0] > 0 and max(crowded) < alone[0]


def test_confident_requests_get_the_budget_first() -> None:
    def cost(tokens: int, depth: int) -> float:
        return max(1.0, tokens / 6)

    low, high = schedule_gammas([0.3, 0.95], [4, 4], cost)
    assert high > low


def test_draft_depth_cost_limits_gamma() -> None:
    """A slow draft model makes deep proposals not worth it."""
    cheap = schedule_gammas([0.8], [8], lambda tokens, depth: 1.0 + 0.01 * depth)
    slow = schedule_gammas([0.8], [8], lambda tokens, depth: 1.0 + 0.5 * depth)
    assert cheap == [8] and slow[0] < 3


def test_prefill_tokens_count_toward_the_batch() -> None:
    """Compute-bound, a lone decode step should not speculate; riding along a
    long prefill in the same forward, a few more tokens cost relatively little."""

    def cost(tokens: int, depth: int) -> float:
        return float(tokens)

    assert schedule_gammas([0.6], [4], cost) == [0]
    assert schedule_gammas([0.6], [4], cost, base_tokens=100) == [4]


@settings(max_examples=200, deadline=None)
@given(
    alphas=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12),
    limit=st.integers(0, 8),
    flat=st.integers(1, 64),
    draft_cost=st.floats(0.0, 0.5),
)
def test_schedule_never_expects_less_than_no_speculation(
    alphas: list[float], limit: int, flat: int, draft_cost: float
) -> None:
    def cost(tokens: int, depth: int) -> float:
        return max(1.0, tokens / flat) + draft_cost * depth

    gammas = schedule_gammas(alphas, [limit] * len(alphas), cost)
    assert all(0 <= g <= limit for g in gammas)
    tokens = len(alphas) + sum(gammas)
    plain = _throughput(alphas, [0] * len(alphas), cost(len(alphas), 0))
    assert _throughput(alphas, gammas, cost(tokens, max(gammas))) >= plain - 1e-9


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
    model.draft.observe(2, 0.4)
    assert model.round_seconds(4, 0) == pytest.approx(1.0)
    assert model.round_seconds(4, 2) == pytest.approx(1.4)
    model.overlap = True
    assert model.round_seconds(4, 2) == pytest.approx(1.0)


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
