"""The serving benchmark's metric math on synthetic timestamps, every
expected value worked out by hand."""

from __future__ import annotations

import random

import numpy as np
import pytest

from specray.bench.serve_metrics import (
    RequestRecord,
    busy_seconds,
    category_rows,
    mode_summary,
    output_agreement,
    percentile,
    request_latency,
)
from specray.bench.serve_report import attach_limit


def record(
    send: float,
    chunks: list[tuple[float, int]],
    *,
    prompt_id: str = "p",
    category: str = "chat",
    speculative: bool = True,
    error: str | None = None,
    counters: tuple[int, int, int] = (0, 0, 0),  # draft, accepted, rounds
    token_ids: list[int] | None = None,
) -> RequestRecord:
    draft, accepted, rounds = counters
    out = RequestRecord(
        prompt_id,
        category,
        speculative,
        send,
        chunk_s=[t for t, _ in chunks],
        chunk_tokens=[n for _, n in chunks],
        draft_tokens=draft,
        accepted_tokens=accepted,
        rounds=rounds,
        error=error,
    )
    out.token_ids = token_ids if token_ids is not None else list(range(out.output_tokens))
    return out


def test_latencies_count_a_multi_token_chunk_as_one_gap() -> None:
    # Tokens arrive 1, 3 and 2 at a time; the last response only finishes.
    timed = record(10.0, [(10.5, 1), (10.7, 3), (11.0, 2), (11.2, 0)])
    latency = request_latency(timed)
    assert latency is not None
    assert latency.ttft == pytest.approx(0.5)
    assert latency.e2el == pytest.approx(1.2)
    assert latency.tpot == pytest.approx((1.2 - 0.5) / (6 - 1))  # 0.14 s per token
    # Two gaps between the three token-carrying chunks, not five per-token ones.
    assert latency.itl == pytest.approx([0.2, 0.3])


def test_ttft_skips_leading_empty_chunks_and_one_token_has_no_tpot() -> None:
    latency = request_latency(record(0.0, [(0.1, 0), (0.4, 1)]))
    assert latency is not None
    assert (latency.ttft, latency.e2el, latency.tpot, latency.itl) == (0.4, 0.4, None, [])


def test_failed_requests_have_no_latency() -> None:
    assert request_latency(record(0.0, [(0.5, 2)], error="UNAVAILABLE")) is None
    assert request_latency(record(0.0, [], error="INVALID_ARGUMENT")) is None


def test_percentile_interpolates_linearly_between_ranks() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 50) == pytest.approx(2.5)
    # rank (4 − 1) · 0.99 = 2.97: 3 + 0.97 · (4 − 3)
    assert percentile(values, 99) == pytest.approx(3.97)
    assert (percentile(values, 0), percentile(values, 100)) == (1.0, 4.0)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError, match=r"q must be in \[0, 100\], got 101"):
        percentile(values, 101)


def test_percentile_agrees_with_numpy_default() -> None:
    rng = random.Random(5)
    for size in (2, 3, 10, 101):
        values = [rng.uniform(0, 100) for _ in range(size)]
        for q in (1, 25, 50, 90, 99):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_busy_seconds_is_the_union_of_request_intervals() -> None:
    overlapping = [record(0.0, [(1.0, 1)]), record(0.5, [(2.0, 1)]), record(3.0, [(3.5, 1)])]
    assert busy_seconds(overlapping) == pytest.approx(2.0 + 0.5)
    nested = [record(0.0, [(4.0, 1)]), record(1.0, [(2.0, 1)])]
    assert busy_seconds(nested) == pytest.approx(4.0)
    assert busy_seconds([]) == 0.0


def test_mode_summary_counts_failures_but_keeps_them_out_of_the_numbers() -> None:
    records = [
        record(0.0, [(0.2, 1), (0.6, 4), (1.0, 0)], counters=(8, 3, 2)),  # 5 tokens
        record(0.5, [(0.6, 1), (1.1, 1), (2.0, 2)], counters=(6, 2, 3)),  # 4 tokens
        record(0.1, [], error="INVALID_ARGUMENT"),
        record(0.2, [(9.0, 7)], error="UNAVAILABLE", counters=(50, 50, 1)),  # died mid-stream
    ]
    stats = mode_summary(records)
    assert (stats["requests"], stats["completed"], stats["failed"]) == (4, 2, 2)
    assert stats["failures"] == {"INVALID_ARGUMENT": 1, "UNAVAILABLE": 1}
    assert stats["output_tokens"] == 9
    assert stats["duration_s"] == pytest.approx(2.0)  # [0, 1] ∪ [0.5, 2]
    assert stats["output_tokens_per_s"] == pytest.approx(4.5)
    assert stats["requests_per_s"] == pytest.approx(1.0)
    # TTFT 0.2 and 0.1 s; E2EL 1.0 and 1.5 s; TPOT 0.8/4 = 0.2 and 1.4/3 s.
    assert stats["ttft_ms"]["mean"] == pytest.approx(150.0)
    assert stats["ttft_ms"]["median"] == pytest.approx(150.0)
    assert stats["ttft_ms"]["p99"] == pytest.approx(100.0 + 0.99 * 100.0)
    assert stats["e2el_ms"]["mean"] == pytest.approx(1250.0)
    assert stats["tpot_ms"]["mean"] == pytest.approx((200.0 + 1400.0 / 3) / 2)
    # ITL: gaps 0.4 (first request) and 0.5, 0.9 (second).
    assert stats["itl_ms"]["mean"] == pytest.approx(600.0)
    assert stats["itl_ms"]["median"] == pytest.approx(500.0)
    # Counters of the successful requests only: 5 accepted of 14 in 5 rounds.
    assert stats["acceptance_rate"] == pytest.approx(5 / 14)
    assert stats["tau"] == pytest.approx((5 + 5) / 5)

    records[1].prompt_tokens, records[1].cached_tokens = 64, 48  # a second send, cached
    records[3].prompt_tokens, records[3].cached_tokens = 64, 64  # failed: not counted
    stats = mode_summary(records)
    assert (stats["prompt_tokens"], stats["cached_tokens"]) == (64, 48)


def test_mode_summary_of_only_failures_has_no_numbers() -> None:
    stats = mode_summary([record(0.0, [], error="RESOURCE_EXHAUSTED")])
    assert (stats["completed"], stats["failed"]) == (0, 1)
    assert stats["output_tokens_per_s"] is None and stats["tau"] is None
    assert stats["ttft_ms"] == {"mean": None, "median": None, "p99": None}


def test_target_only_has_tau_one_and_no_acceptance_rate() -> None:
    stats = mode_summary([record(0.0, [(0.1, 1), (0.2, 1)], speculative=False, counters=(0, 0, 2))])
    assert stats["tau"] == 1.0 and stats["acceptance_rate"] is None


def test_category_rows_pair_the_arms_and_pool_them() -> None:
    records = [
        # chat: spec 8 tokens in 1 s, no-spec 8 tokens in 2 s.
        record(0.0, [(0.2, 2), (1.0, 6)], prompt_id="c1", counters=(8, 6, 2)),
        record(1.0, [(1.2, 1), (3.0, 7)], prompt_id="c1", speculative=False, counters=(0, 0, 8)),
        # math: spec 4 tokens in 2 s, no-spec 4 tokens in 1 s (speculation loses).
        record(3.0, [(3.5, 1), (5.0, 3)], prompt_id="m1", category="math", counters=(6, 0, 4)),
        record(5.0, [(5.1, 1), (6.0, 3)], prompt_id="m1", category="math", speculative=False),
        # A prompt whose no-spec arm failed is left out of every row.
        record(6.0, [(6.1, 5)], prompt_id="c2", counters=(9, 9, 1)),
        record(6.0, [], prompt_id="c2", speculative=False, error="INTERNAL"),
    ]
    rows = {row["category"]: row for row in category_rows(records)}
    assert list(rows) == ["chat", "math", "all"]
    chat, math, pooled = rows["chat"], rows["math"], rows["all"]
    assert (chat["pairs"], math["pairs"], pooled["pairs"]) == (1, 1, 2)
    assert chat["speedup"] == pytest.approx(2.0)
    assert math["speedup"] == pytest.approx(0.5)
    assert pooled["speedup"] == pytest.approx((12 / 3) / (12 / 3))
    # TPOT: chat spec 0.8/7, no-spec 1.8/7; math spec 1.5/3, no-spec 0.9/3.
    assert chat["tpot_speedup"] == pytest.approx(1.8 / 0.8)
    assert math["tpot_speedup"] == pytest.approx(0.9 / 1.5)
    assert chat["spec_tpot_ms"] == pytest.approx(800 / 7)
    assert (chat["acceptance_rate"], chat["tau"]) == (0.75, 4.0)
    assert (math["acceptance_rate"], math["tau"]) == (0.0, 1.0)
    assert pooled["tau"] == pytest.approx((6 + 6) / 6)


def test_output_agreement_reports_where_the_arms_diverge() -> None:
    records = [
        record(0.0, [(1.0, 3)], prompt_id="a", token_ids=[1, 2, 3]),
        record(0.0, [(1.0, 3)], prompt_id="a", speculative=False, token_ids=[1, 2, 3]),
        record(0.0, [(1.0, 3)], prompt_id="b", token_ids=[1, 2, 3]),
        record(0.0, [(1.0, 3)], prompt_id="b", speculative=False, token_ids=[1, 5, 3]),
        record(0.0, [], prompt_id="c", error="UNAVAILABLE"),
        record(0.0, [(1.0, 1)], prompt_id="c", speculative=False),
    ]
    agreement = output_agreement(records)
    assert (agreement["pairs"], agreement["identical"]) == (2, 1)
    assert agreement["identical_fraction"] == 0.5
    assert agreement["first_divergence"] == {"a": None, "b": 1}


def test_analytic_limit_from_the_measured_tau() -> None:
    # τ of α = 0.8 at γ = 4: (1 − 0.8⁵) / (1 − 0.8) = 3.3616.
    rows = [{"tau": 3.3616, "tpot_speedup": 1.5}, {"tau": None, "tpot_speedup": None}]
    attach_limit(rows, gamma=4, draft_cost=0.1, verify_cost=1.2)
    measured, failed = rows
    assert measured["alpha_eff"] == pytest.approx(0.8)
    assert measured["S"] == pytest.approx(3.3616 / (4 * 0.1 + 1.2))  # 2.101: γc + v
    assert measured["achieved"] == pytest.approx(1.5 / measured["S"])
    assert "alpha_eff" not in failed and "S" not in failed
    without_costs = [{"tau": 2.0, "tpot_speedup": 1.2}]
    attach_limit(without_costs, gamma=4, draft_cost=None, verify_cost=None)
    assert set(without_costs[0]) == {"tau", "tpot_speedup", "alpha_eff"}
