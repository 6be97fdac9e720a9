"""Faults against the router on CPU, for real: SIGKILLed draft replicas and
target shards (Ray actor processes on loopback), a restart that cannot
finish, and a round that breaks every group it meets. Greedy output is
compared token for token with target-only decoding in one process, and the
router's own counts (replicas, restarts, fallbacks) and metrics are checked.

See docs/reliability.md for what each fault does and its figures.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path

import pytest
import ray
from ray.exceptions import RayTaskError
from router_helpers import (
    finish_streams,
    first_chunks,
    router_config,
    router_state,
    run_all,
    sample,
    scrape,
    target_only,
    tiny_request,
    wait_for,
    wait_idle,
)

from specray.actors.drafting.spec import DrafterSpec
from specray.actors.engine.request import RequestOutput
from specray.cluster.errors import TargetGroupError
from specray.cluster.recovery import RecoveryConfig
from specray.cluster.router import RouterState, launch_router


@pytest.mark.slow
def test_killed_draft_replica_falls_back_with_identical_output(
    local_ray: None,
    tiny_dir_factory,  # type: ignore[no-untyped-def]
) -> None:
    model_dir = tiny_dir_factory("qwen2")
    requests = [tiny_request(i, max_tokens=60, prefix="k") for i in range(2)]
    reference = target_only(model_dir, requests)
    # Fixed γ: every round asks the drafts, so the death is seen mid-request.
    spec = DrafterSpec("ngram", max_ngram=3)
    config = router_config(model_dir, spec, "actor", num_drafts=2, adaptive=False, metrics_port=0)
    router = launch_router(config)
    victim_pid = router_state(router).drafts[0].pid

    async def scenario() -> list[tuple[list[int], RequestOutput]]:
        streams, firsts = await first_chunks(router, requests)
        os.kill(victim_pid, signal.SIGKILL)
        return await finish_streams(streams, firsts)

    try:
        results = asyncio.run(scenario())
        assert {r.request_id: t for r, (t, _) in zip(requests, results, strict=True)} == reference
        fallbacks = [last.stats.fallback for _, last in results]
        assert sorted(fallbacks) == [False, True]  # one request was pinned to each replica
        # The lost replica is replaced: the pool is back to its configured size.
        state = wait_for(router, lambda s: s.recovery.draft_restarts == 1)
        assert state.draft_failures == 1 and state.recovery.fallbacks == 1
        assert len(state.drafts) == 2 and victim_pid not in {d.pid for d in state.drafts}
        state = wait_idle(router)
        assert all(d.tracked == 0 for d in state.drafts)
        text = scrape(state)
        assert sample(text, "specray:draft_restarts_total") == 1
        assert sample(text, "specray:spec_decode_fallbacks_total") == 1
        assert sample(text, "specray:replica_failures_total", kind="draft") == 1
        # Both replicas draft for new requests, with identical output.
        again = [tiny_request(5 + i, prefix="k") for i in range(4)]
        assert asyncio.run(run_all(router, again)) == target_only(model_dir, again)
        assert all(d.pinned == 0 for d in wait_idle(router).drafts)
    finally:
        ray.get(router.shutdown.remote())


@pytest.mark.slow
def test_killed_target_replica_moves_its_requests(local_ray: None, tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    """A shard of one target replica dies mid-request: its requests re-prefill
    on the other replica and finish with identical greedy output, and a fresh
    group replaces the broken one."""
    model_dir = tiny_dir_factory("qwen2")
    config = router_config(model_dir, DrafterSpec("ngram", max_ngram=3), num_targets=2)
    router = launch_router(config)
    requests = [tiny_request(i, max_tokens=200, prefix="d") for i in range(4)]

    async def scenario() -> dict[str, list[int]]:
        streams, firsts = await first_chunks(router, requests)
        state = router_state(router)
        assert all(t.requests for t in state.targets)  # both replicas serve someone
        os.kill(state.targets[0].shard_pids[0], signal.SIGKILL)
        done = await finish_streams(streams, firsts)
        return {r.request_id: t for r, (t, _) in zip(requests, done, strict=True)}

    try:
        assert asyncio.run(scenario()) == target_only(model_dir, requests)
        assert router_state(router).target_moves >= 1
        # The broken group is replaced by a fresh one: two replicas again.
        state = wait_for(router, lambda s: s.recovery.target_restarts == 1)
        assert len(state.targets) == 2 and state.recovery.target_failures == 1
        state = wait_idle(router)
        assert all(d.tracked == 0 for d in state.drafts)
    finally:
        ray.get(router.shutdown.remote())


@pytest.mark.slow
def test_gang_restart_of_the_only_target_group_replays_its_requests(
    local_ray: None, tiny_dir_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """One target replica of two TP shards; one shard dies mid-request. The
    whole group is replaced (both shards are new processes) while the
    requests wait with their committed tokens, then re-prefill on the new
    group and finish with identical greedy output; nobody sees an error.

    The first restart attempts fail (the weights are moved away until the
    test has seen the outage), so the outage is observable without timing:
    no target replica is up, health says so, and the restart is retried."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_dir_factory("qwen2"), model_dir)
    # Long enough to be mid-stream when the shard dies (the context allows 512).
    requests = [tiny_request(i, max_tokens=480, prefix="g") for i in range(3)]
    reference = target_only(model_dir, requests)
    spec = DrafterSpec("ngram", max_ngram=3)
    recovery = RecoveryConfig(backoff_s=0.2)
    config = router_config(model_dir, spec, tp=2, max_len=512, recovery=recovery)
    router = launch_router(config)
    weights = model_dir / "model.safetensors"

    async def scenario() -> dict[str, list[int]]:
        streams, firsts = await first_chunks(router, requests)
        old_pids = router_state(router).targets[0].shard_pids
        weights.rename(weights.with_suffix(".away"))
        os.kill(old_pids[1], signal.SIGKILL)
        down = await asyncio.to_thread(wait_for, router, _outage_with_a_failed_restart)
        assert down.targets == () and down.running == 0 and down.waiting == len(requests)
        health = await router.health.remote()
        assert not health.serving and health.outage_s is not None
        weights.with_suffix(".away").rename(weights)
        done = await finish_streams(streams, firsts)
        (target,) = router_state(router).targets
        assert set(target.shard_pids).isdisjoint(old_pids)  # the whole group is new
        return {r.request_id: t for r, (t, _) in zip(requests, done, strict=True)}

    try:
        assert asyncio.run(scenario()) == reference
        state = wait_idle(router)
        assert state.recovery.target_restarts == 1 and state.recovery.target_failures == 1
        assert state.recovery.outage_s is None and ray.get(router.health.remote()).serving
        assert all(d.tracked == 0 for d in state.drafts)
        again = [tiny_request(9, prefix="g")]
        assert asyncio.run(run_all(router, again)) == target_only(model_dir, again)
    finally:
        ray.get(router.shutdown.remote())


def _outage_with_a_failed_restart(state: RouterState) -> bool:
    """No target replica is up, and a restart attempt has already failed."""
    recovery = state.recovery
    return not state.targets and recovery.target_failures == 1 and recovery.failed_restarts >= 1


@pytest.mark.slow
def test_a_round_that_breaks_every_group_is_not_replayed_forever(
    local_ray: None,
    tiny_dir_factory,  # type: ignore[no-untyped-def]
) -> None:
    """Shards that never answer within their deadline (1 µs here; a batch too
    slow for the deadline looks the same): each round breaks its group, which
    is gang-restarted, and the request is replayed ``max_replays`` times, then
    fails with TargetGroupError instead of looping."""
    recovery = RecoveryConfig(max_replays=1, backoff_s=0.2)
    config = router_config(
        tiny_dir_factory("qwen2"), None, timeout_s=1e-6, profile=False, recovery=recovery
    )
    router = launch_router(config)
    try:
        with pytest.raises(RayTaskError) as caught:
            ray.get(router.generate.remote(tiny_request(0)))
        assert isinstance(caught.value.cause, TargetGroupError)
        assert caught.value.cause.reason == "timeout"
        state = wait_for(router, lambda s: s.recovery.target_restarts == 2)
        assert state.recovery.target_failures == 2  # the first round and its one replay
        assert (state.running, state.waiting, len(state.targets)) == (0, 0, 1)
    finally:
        ray.get(router.shutdown.remote())
