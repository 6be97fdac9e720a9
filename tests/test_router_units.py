"""The router's pure pieces, without Ray: the draft worker's fused
update-and-propose call and the drafter naming, the metrics registry and the
recovery's backoff and outage clock."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
import torch
from tiny_models import VOCAB

from specray.actors.drafting.base import DraftRequest, DraftUpdate
from specray.actors.drafting.draft_model import DraftModelDrafter
from specray.actors.drafting.spec import DrafterSpec
from specray.actors.model.loader import load_model
from specray.actors.sampling.params import SamplingParams
from specray.actors.sampling.rejection import RejectionResult
from specray.actors.workers.draft_worker import DraftWorker, DraftWorkerSpec
from specray.cluster.metrics import RouterMetrics
from specray.cluster.recovery import Backoff, OutageClock, RecoveryConfig
from specray.cluster.router_state import Footprint

# -- the draft worker ------------------------------------------------------------


def test_draft_worker_fuses_rollback_into_propose(tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    """One propose call carrying the last rounds' updates drafts exactly what
    a drafter told separately does, including rounds with no proposal."""
    draft_dir: Path = tiny_dir_factory("qwen2", 7)
    spec = DraftWorkerSpec(DrafterSpec("model", str(draft_dir)), num_slots=2, max_len=128)
    worker = DraftWorker(spec)
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
    direct.accept(round1)
    direct.accept(round2)
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


def test_drafter_spec_validation() -> None:
    with pytest.raises(ValueError, match="needs `model`"):
        DrafterSpec("model")
    with pytest.raises(ValueError, match="kind"):
        DrafterSpec("eagle")
    with pytest.raises(ValueError, match="num_threads"):
        DraftWorkerSpec(num_threads=0)


@pytest.mark.parametrize(
    ("text", "kind", "model"),
    [
        ("ngram", "ngram", None),
        ("m", "model", "m"),
        ("ngram+m", "hybrid", "m"),
        ("suffix", "suffix", None),
        ("suffix+m", "suffix_hybrid", "m"),
        ("head:d", "head", "d"),
    ],
)
def test_drafter_spec_parses_what_it_names(text: str, kind: str, model: str | None) -> None:
    spec = DrafterSpec.parse(text)
    assert spec is not None and (spec.kind, spec.model, spec.name) == (kind, model, text)
    assert DrafterSpec.parse("none") is None


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
