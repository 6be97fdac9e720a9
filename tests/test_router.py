"""The router actor end to end on CPU: real Ray actors on loopback, tiny fp32
models, greedy output compared token for token with target-only decoding in
one process.

Each router here runs one target shard and one or two draft replicas with one
torch thread each.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import ray
from router_helpers import (
    MAX_LEN,
    router_config,
    router_state,
    run_all,
    stream_all,
    target_only,
    tiny_request,
    wait_idle,
)

from specray.actors.drafting.draft_model import DraftModelDrafter
from specray.actors.drafting.spec import DrafterSpec
from specray.actors.engine.engine import EngineConfig, SpecEngine
from specray.actors.engine.errors import RequestCancelledError
from specray.actors.engine.request import GenerationRequest
from specray.actors.engine.target import LocalTarget
from specray.actors.model.loader import load_model
from specray.actors.sampling.params import SamplingParams
from specray.cluster.router import launch_router, open_stream
from specray.cluster.router_state import RouterState

# Logical CPUs for placement only (each actor uses 1 thread): the three
# module-scoped routers hold 2 each while a test scales its own up to 6.
RAY_CPUS = 16


@pytest.fixture(scope="module")
def ngram_router(local_ray: None, tiny_dir_factory) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    config = router_config(
        tiny_dir_factory("qwen2"),
        DrafterSpec("ngram", max_ngram=3),
        metrics_port=0,
        model_name="tiny",
    )
    router = launch_router(config)
    yield router
    ray.get(router.shutdown.remote())


@pytest.fixture(scope="module")
def model_router(local_ray: None, tiny_dir_factory) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    """A draft model, two overlapped micro-batches and a fixed γ (so sampled
    output can be compared with the in-process engine's)."""
    spec = DrafterSpec("model", str(tiny_dir_factory("qwen2", 7)))
    config = router_config(tiny_dir_factory("qwen2"), spec, overlap=True, adaptive=False, k=3)
    router = launch_router(config)
    yield router
    ray.get(router.shutdown.remote())


@pytest.fixture(scope="module")
def hybrid_router(local_ray: None, tiny_dir_factory) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    """Draft replicas that look up n-grams first and fall back to a model,
    with two overlapped micro-batches (their proposals interleave)."""
    spec = DrafterSpec("hybrid", str(tiny_dir_factory("qwen2", 7)), max_ngram=3)
    config = router_config(tiny_dir_factory("qwen2"), spec, overlap=True, adaptive=False)
    router = launch_router(config)
    yield router
    ray.get(router.shutdown.remote())


@pytest.mark.parametrize("router_name", ["ngram_router", "model_router", "hybrid_router"])
def test_greedy_equals_target_only_at_concurrency_1_and_8(
    request: pytest.FixtureRequest,
    tiny_dir_factory,  # type: ignore[no-untyped-def]
    router_name: str,
) -> None:
    router = request.getfixturevalue(router_name)
    requests = [tiny_request(i, prefix=router_name) for i in range(9)]
    alone = asyncio.run(run_all(router, requests[:1]))
    together = asyncio.run(run_all(router, requests[1:]))
    assert {**alone, **together} == target_only(tiny_dir_factory("qwen2"), requests)
    state = wait_idle(router)
    assert all(d.tracked == 0 for d in state.drafts)
    assert all(not t.requests for t in state.targets)


def test_sampled_output_equals_the_in_process_engine(model_router: Any, tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    """Seeded sampling through actors draws exactly what one process draws."""
    sampling = SamplingParams(temperature=0.9, top_p=0.95, seed=4321)
    requests = [replace(tiny_request(i, prefix="p"), sampling=sampling) for i in range(4)]
    drafter = DraftModelDrafter(load_model(tiny_dir_factory("qwen2", 7)), 8, MAX_LEN)
    target = LocalTarget(load_model(tiny_dir_factory("qwen2")), num_slots=8, max_len=MAX_LEN)
    engine = SpecEngine(target, drafter, None, (), EngineConfig(8, 3, adaptive=False))
    expected: dict[str, list[int]] = {r.request_id: [] for r in requests}
    for chunk in engine.generate(requests):
        expected[chunk.request_id] += chunk.token_ids
    assert asyncio.run(run_all(model_router, requests)) == expected
    assert expected != target_only(tiny_dir_factory("qwen2"), requests)  # really sampled


def test_cost_shapes_are_profiled_at_start(model_router: Any, ngram_router: Any) -> None:
    """The verify shape and, for a drafter with a cache, its feed shape are
    timed once every replica is up; lookup has no feed to time. The state
    says how long the start and each of its parts took."""
    for router, feeds in ((model_router, True), (ngram_router, False)):
        state: RouterState = ray.get(router.state.remote())
        assert 1 in state.verify_costs["shape"] and state.verify_costs["level_s"] > 0
        assert "overall" in state.copy_estimates["pool"]  # what copies are priced from
        assert bool(state.draft_costs["shape"]) == feeds
        if feeds:
            assert max(state.draft_costs["shape"]) >= 64  # catch-ups of a prompt's length
        # ... and the start says what they took, beside loading the replicas
        startup = state.startup
        assert startup is not None and startup.replicas_s > 0
        assert startup.profile.verify_sizes == tuple(sorted(state.verify_costs["shape"]))
        assert (startup.profile.draft_s > 0) == feeds
        parts = startup.replicas_s + startup.profile.verify_s + startup.profile.draft_s
        assert parts <= startup.total_s
        assert f"{len(startup.profile.verify_sizes)} sizes" in startup.describe()
        # ... and what each kind of replica was told to load (a lookup loads nothing)
        assert set(state.weights) == ({"target", "draft"} if feeds else {"target"})
        assert state.weights["target"].startswith("dense (")


def test_unary_generate(ngram_router: Any, tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    requests = [tiny_request(i, prefix="u") for i in range(3)]
    outputs = ray.get([ngram_router.generate.remote(r) for r in requests])
    assert {o.request_id: o.token_ids for o in outputs} == target_only(
        tiny_dir_factory("qwen2"), requests
    )
    assert all(o.finish_reason == "length" and o.stats.rounds > 0 for o in outputs)


def test_timings_price_every_verified_round_by_its_size(ngram_router: Any) -> None:
    """Each round with a verify lands in the bucket of the tokens it
    verified, with the price the cost model gave it and its wait; the
    buckets add up to the totals. The n-gram drafter runs in the router's
    process: its rounds wait on no Ray call."""
    ray.get(ngram_router.timings.remote(True))
    asyncio.run(run_all(ngram_router, [tiny_request(i, prefix="t") for i in range(2)]))
    phases = ray.get(ngram_router.timings.remote()).router
    sizes = phases.by_verified
    assert phases.rounds >= 1 and sum(s.rounds for s in sizes.values()) == phases.rounds
    assert phases.verified_tokens >= phases.request_rounds  # each request feeds a token a round
    assert sum(s.wait_s for s in sizes.values()) == pytest.approx(phases.verify_s)
    assert all(s.priced_s > 0 and s.wait_s > 0 for s in sizes.values())
    assert [d.placement for d in router_state(ngram_router).drafts] == ["router"]


@pytest.mark.slow
def test_target_only_router(local_ray: None, tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    model_dir = tiny_dir_factory("qwen2")
    requests = [tiny_request(i, prefix="t") for i in range(3)]
    router = launch_router(router_config(model_dir, None))
    try:
        outputs = ray.get([router.generate.remote(r) for r in requests])
        assert {o.request_id: o.token_ids for o in outputs} == target_only(model_dir, requests)
        assert all(o.stats.draft_tokens == 0 for o in outputs)
        assert router_state(router).drafts == ()
    finally:
        ray.get(router.shutdown.remote())


@pytest.mark.slow
def test_scale_drafts_and_targets_during_a_stream(local_ray: None, tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    """1 → 2 → 1 drafts and targets while 8 clients keep sending requests:
    none lost, every output identical, and requests really moved. Six slots
    per target: back on one replica, two running requests go back to the
    queue with their state and re-prefill later. Two lanes (overlap)."""
    model_dir = tiny_dir_factory("qwen2")
    spec = DrafterSpec("ngram", max_ngram=3)
    router = launch_router(
        router_config(model_dir, spec, adaptive=False, overlap=True, num_slots=6)
    )
    submitted: list[GenerationRequest] = []
    outputs: dict[str, list[int]] = {}

    async def scenario() -> list[Any]:
        scaling_done = asyncio.Event()
        in_flight = asyncio.Semaphore(8)

        async def client(request: GenerationRequest) -> None:
            try:
                outputs[request.request_id] = (await stream_all(router, request))[0]
            finally:
                in_flight.release()

        async def producer() -> None:
            clients = []
            i = 0
            while not scaling_done.is_set() or i < 24:
                await in_flight.acquire()
                request = tiny_request(i, max_tokens=30 + (13 * i) % 40, prefix="s")
                submitted.append(request)
                clients.append(asyncio.create_task(client(request)))
                i += 1
            await asyncio.gather(*clients)

        stream = asyncio.create_task(producer())
        # Scale once the router holds the stream, not when the clients have
        # merely sent it: a scale that finds no request pinned moves none.
        while sum(d.pinned for d in (await router.state.remote()).drafts) < 4:
            await asyncio.sleep(0.01)
        reports = [
            await router.scale.remote(drafts=2),
            await router.scale.remote(targets=2),
            await router.scale.remote(drafts=1, targets=1),
        ]
        scaling_done.set()
        await stream
        return reports

    try:
        reports = asyncio.run(scenario())
        assert [(r.drafts, r.targets) for r in reports] == [(2, 1), (2, 2), (1, 1)]
        assert outputs == target_only(model_dir, submitted)  # none lost, all identical
        state = wait_idle(router)
        assert len(state.targets) == 1 and len(state.drafts) == 1
        assert state.target_moves > 0 and state.draft_moves > 0
        assert all(d.tracked == 0 for d in state.drafts)
    finally:
        ray.get(router.shutdown.remote())


def test_cancel_frees_state_on_every_actor(ngram_router: Any, tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    router = ngram_router
    long = [tiny_request(i, max_tokens=MAX_LEN - 40, prefix="c") for i in range(2)]

    async def scenario() -> None:
        by_ray, by_router = (open_stream(router, r) for r in long)
        for stream in (by_ray, by_router):
            await (await anext(stream))
        state = router_state(router)
        assert state.running == 2 and state.drafts[0].tracked == 2
        ray.cancel(by_ray)  # the caller goes away
        assert await router.cancel.remote(long[1].request_id)
        with pytest.raises(RequestCancelledError):
            async for ref in by_router:
                await ref

    asyncio.run(scenario())
    state = wait_idle(router)
    assert state.targets[0].requests == () and state.targets[0].releasing == 0
    assert state.drafts[0].tracked == 0 and state.drafts[0].pinned == 0
    # Every target slot is free again: a full house of new requests runs.
    fresh = [tiny_request(i, prefix="f") for i in range(8)]
    assert asyncio.run(run_all(router, fresh)) == target_only(tiny_dir_factory("qwen2"), fresh)


def test_metrics_endpoint_serves_vllm_names(ngram_router: Any) -> None:
    state = router_state(ngram_router)
    assert state.metrics_port is not None

    def scrape() -> str:
        url = f"http://127.0.0.1:{state.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as page:
            return str(page.read().decode())

    def e2e_count(text: str) -> float:
        prefix = 'specray:e2e_request_latency_seconds_count{model_name="tiny"}'
        return float(
            next(line for line in text.splitlines() if line.startswith(prefix)).split()[-1]
        )

    before = e2e_count(scrape())
    asyncio.run(run_all(ngram_router, [tiny_request(i, prefix="m") for i in range(3)]))
    text = scrape()
    names = [
        "specray:spec_decode_num_drafts_total",
        "specray:spec_decode_num_draft_tokens_total",
        "specray:spec_decode_num_accepted_tokens_total",
        'specray:spec_decode_num_accepted_tokens_per_pos_total{model_name="tiny",position="0"}',
        "specray:time_to_first_token_seconds_bucket",
        "specray:inter_token_latency_seconds_bucket",
        "specray:e2e_request_latency_seconds_count",
        "specray:num_requests_running",
        "specray:num_requests_waiting",
        'specray:replica_failures_total{kind="draft",model_name="tiny"}',
        "specray:draft_restarts_total",
        "specray:target_restarts_total",
        "specray:spec_decode_fallbacks_total",
        'specray:target_replicas_up{model_name="tiny"} 1.0',
    ]
    for name in names:
        assert name in text, name
    assert e2e_count(text) == before + 3
