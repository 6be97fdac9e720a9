"""Prefix caching through the real router and the gRPC and OpenAI front
doors: multi-turn chats over two target replicas and a draft-model replica,
each turn resending the conversation, equal the no-cache reference; later
turns are placed on the replica that holds their earlier turns and report
the cached prompt tokens; the vLLM counters count them; every pin is let
go. Placement by prefix, of target and draft replicas, is also tested on
its own, without Ray."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import ray
import torch
from references import greedy_reference
from router_helpers import sample, scrape
from serving_helpers import ServingThread, save_served_model

from specray.actors.drafting.spec import DrafterSpec
from specray.actors.model.prefix_cache import DEFAULT_BLOCK_SIZE
from specray.actors.sampling.params import SamplingParams
from specray.actors.workers.draft_worker import DraftWorkerSpec
from specray.actors.workers.shard_model import ShardModel
from specray.cluster.affinity import PrefixAffinity
from specray.cluster.draft_pool import DraftPool, DraftPoolConfig, DraftReplica, affinity_blocks
from specray.cluster.events import Inbox
from specray.cluster.local_ray import start_ray
from specray.cluster.router_state import Footprint, RouterState
from specray.cluster.target_group_config import ShardedTargetConfig
from specray.cluster.target_pool import TargetPool, TargetReplica
from specray.deploy.client import GenerationResult, SpecrayClient
from specray.deploy.config import ServeConfig

MAX_TOKENS = 8


def _ids(length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 400, (length,), generator=gen).tolist()


# -- placement, without Ray ----------------------------------------------------------


def _pool(affinity: bool) -> TargetPool:
    config = ShardedTargetConfig(ShardModel("unused", num_slots=8, prefix_tokens=1024))
    pool = TargetPool(config, Inbox(), prefix_affinity=affinity)
    for replica_id in (0, 1):
        capacity = 1024 // DEFAULT_BLOCK_SIZE if affinity else 0
        replica = TargetReplica(replica_id, cast(Any, None), affinity=PrefixAffinity(capacity))
        pool.replicas[replica_id] = replica
    return pool


def test_placement_prefers_the_replica_sent_the_prefix_within_the_imbalance_bound() -> None:
    pool = _pool(affinity=True)
    chat = _ids(60, 1)
    first = pool.prefix_hashes(chat)
    assert len(first) == 60 // DEFAULT_BLOCK_SIZE
    assert pool.pick(first) is pool.replicas[0]  # a tie: the least occupied, lowest id
    pool.pin(pool.replicas[1], "a", first)  # suppose it went to replica 1
    later = pool.prefix_hashes(chat + _ids(30, 2))
    assert pool.pick(later) is pool.replicas[1]  # one request above replica 0: within 2
    pool.replicas[1].requests |= {"b", "c"}  # three above: balance wins
    assert pool.pick(later) is pool.replicas[0]
    assert pool.pick(pool.prefix_hashes(_ids(60, 3))) is pool.replicas[0]  # nothing shared

    plain = _pool(affinity=False)
    assert plain.prefix_hashes(chat) == []
    plain.pin(plain.replicas[1], "a", first)
    assert plain.pick(first) is plain.replicas[0]  # least occupied only


def test_a_next_turn_follows_its_cache_while_the_last_release_is_in_flight() -> None:
    """Slots still being released hold no work: they must not push a
    chat's next turn off the replica that caches it (a CI failure)."""
    pool = _pool(affinity=True)
    chat = _ids(60, 1)
    pool.pin(pool.replicas[1], "a", pool.prefix_hashes(chat))
    pool.replicas[1].requests.discard("a")
    pool.replicas[1].releasing |= {"a", "b", "c", "d"}  # four releases unconfirmed
    assert pool.replicas[1].occupied == 4 and pool.replicas[1].load == 0
    assert pool.pick(pool.prefix_hashes(chat + _ids(20, 2))) is pool.replicas[1]
    pool.replicas[1].releasing |= {f"x{i}" for i in range(4)}  # every slot taken: no room
    assert pool.pick(pool.prefix_hashes(chat + _ids(20, 2))) is pool.replicas[0]


def _draft_pool(kind: str, affinity: bool = True) -> DraftPool:
    spec = DraftWorkerSpec(drafter=DrafterSpec(kind), num_slots=8)
    pool = DraftPool(DraftPoolConfig(spec, affinity=affinity))
    for replica_id in (0, 1):
        replica = DraftReplica(
            replica_id, _Actor(), 0, affinity=PrefixAffinity(affinity_blocks(spec))
        )
        pool.replicas[replica_id] = replica
    return pool


class _Call:
    def remote(self, *args: object) -> None:
        return None


class _Actor:
    """A draft replica's handle as placement uses it: calls it never awaits."""

    start = finish = _Call()


def test_a_conversation_drafts_on_the_replica_that_drafted_its_earlier_turns() -> None:
    """A suffix drafter's global cache holds the outputs of the requests it
    drafted for: a chat's next turn (its earlier turns plus their outputs)
    goes back to that replica, within the imbalance bound. An n-gram
    drafter keeps nothing across requests: load alone decides."""
    pool = _draft_pool("suffix")
    assert affinity_blocks(pool.config.spec) > 0
    first_turn, output = _ids(40, 1), _ids(20, 2)
    hashes = pool.prefix_hashes(first_turn)
    pool.attach(pool.replicas[1], "turn-1", first_turn, SamplingParams(), hashes)
    pool.detach(1, ["turn-1"], first_turn + output)  # finished: its output is in the cache
    next_turn = first_turn + output + _ids(10, 3)
    assert pool.pick(pool.prefix_hashes(next_turn)) is pool.replicas[1]
    pool.replicas[1].requests |= {"x", "y", "z"}  # three above the other: balance wins
    assert pool.pick(pool.prefix_hashes(next_turn)) is pool.replicas[0]

    for plain in (_draft_pool("ngram"), _draft_pool("suffix", affinity=False)):
        assert plain.prefix_hashes(first_turn) == []
        plain.attach(plain.replicas[1], "turn-1", first_turn, SamplingParams())
        plain.detach(1, ["turn-1"], first_turn + output)
        assert plain.pick(plain.prefix_hashes(next_turn)) is plain.replicas[0]


def test_affinity_remembers_the_most_recent_blocks_up_to_its_capacity() -> None:
    affinity = PrefixAffinity(capacity=4)
    pool = _pool(affinity=True)
    old, new = pool.prefix_hashes(_ids(48, 4)), pool.prefix_hashes(_ids(32, 5))
    affinity.record(old)
    affinity.record(new)
    assert len(affinity) == 4
    assert affinity.match(new) == 2 and affinity.match(old) == 0  # old[0] was dropped first


# -- through the router, gRPC and HTTP -------------------------------------------


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    info = start_ray(num_cpus=8)
    yield
    if info.started_here:
        ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_served_model(tmp_path_factory.mktemp("prefix-served"))


@pytest.fixture(scope="module")
def server(
    local_ray: None, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServingThread]:
    draft_dir = save_served_model(tmp_path_factory.mktemp("prefix-draft"), seed=1)
    router = {
        "target": str(model_dir),
        "tp": 1,
        "dtype": "float32",
        "drafts": [{"kind": "model", "model": str(draft_dir)}],
        "num_targets": 2,
        "k": 3,
        "adaptive": False,
        # Eight slots: placement may put a request at most num_slots // 4 = 2
        # above the least loaded replica, so the multi-turn test's chats (at
        # most 3 of 4 on one replica) always follow their cache.
        "num_slots": 8,
        "max_len": 256,
        "max_num_batched_tokens": 32,
        "threads_per_shard": 1,
        "profile": False,
        "metrics_port": 0,
        "timeout_s": 60,
        "start_timeout_s": 120,
    }
    config = ServeConfig.model_validate(
        {
            "backend": "router",
            "router": router,
            "port": 0,
            "http_port": 0,
            "drain_timeout_s": 60,
            "limits": {"max_tokens": 64, "max_queued_requests": 8},
        }
    )
    with ServingThread(config) as serving:
        yield serving


def _router_state(server: ServingThread) -> RouterState:
    state: RouterState = ray.get(server.router_backend.router.state.remote(), timeout=60)
    return state


def _footprint(server: ServingThread) -> Footprint:
    footprint: Footprint = ray.get(server.router_backend.router.footprint.remote(), timeout=60)
    return footprint


@pytest.mark.slow
def test_multi_turn_chats_through_grpc_reuse_their_replicas_prefix(
    server: ServingThread, model_dir: Path
) -> None:
    """Four chats of three turns, run a turn at a time and concurrently
    within a turn; two share a 40-token system prompt. The first chat's
    first turn runs alone before the others: requests that arrive together
    prefill in the same round, where none can reuse another's blocks. With
    4 slots per replica the placement bound (1 above the least loaded) sent
    a chat away from its cache whenever three chats shared a replica and
    their turns arrived first: by design, so the server has 8."""
    system = _ids(40, 9)
    chats = [
        [system + _ids(12, 10), _ids(9, 11), _ids(7, 12)],
        [system + _ids(15, 20), _ids(6, 21), _ids(10, 22)],
        [_ids(45, 30), _ids(8, 31), _ids(5, 32)],
        [_ids(50, 40), _ids(11, 41), _ids(6, 42)],
    ]
    prompts: list[list[int]] = [[] for _ in chats]
    previous: list[int] = [0] * len(chats)
    offered = 0  # prompt tokens over every turn
    results: dict[tuple[int, int], GenerationResult] = {}

    async def turn(client: SpecrayClient, i: int, prompt: list[int]) -> GenerationResult:
        options = {"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
        return await asyncio.to_thread(client.generate, prompt, **options)

    async def run_turn(t: int) -> list[GenerationResult]:
        with SpecrayClient(server.grpc_address, timeout_s=120) as client:
            first = [await turn(client, 0, prompts[0])] if t == 0 else []
            rest = enumerate(prompts[len(first) :], len(first))
            return first + list(await asyncio.gather(*(turn(client, i, p) for i, p in rest)))

    for t in range(3):
        for i, chat in enumerate(chats):
            before = prompts[i] + (results[(i, t - 1)].token_ids if t else [])
            previous[i] = len(prompts[i])
            prompts[i] = before + chat[t]
            offered += len(prompts[i])
        expected = greedy_reference(model_dir, dict(enumerate(prompts)), MAX_TOKENS)
        for i, result in enumerate(asyncio.run(run_turn(t))):
            assert result.token_ids == expected[i], (t, i)
            results[(i, t)] = result
            if t:  # the earlier turn's prompt is cached where this turn ran
                block_floor = previous[i] // DEFAULT_BLOCK_SIZE * DEFAULT_BLOCK_SIZE
                assert result.cached_tokens >= block_floor, (t, i, result.cached_tokens)
    assert results[(1, 0)].cached_tokens >= 32  # the shared system prompt's two blocks

    state = _router_state(server)
    metrics = scrape(state)
    hits = sample(metrics, "specray:prefix_cache_hits_total", model_name=model_dir.name)
    queries = sample(metrics, "specray:prefix_cache_queries_total", model_name=model_dir.name)
    assert hits >= sum(r.cached_tokens for r in results.values())
    assert queries >= offered > hits
    _assert_let_go(server)


@pytest.mark.slow
def test_openai_usage_reports_cached_prompt_tokens(server: ServingThread) -> None:
    body = {"prompt": _ids(70, 50), "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    first, second = (_post(f"{server.http_url}/v1/completions", body) for _ in range(2))
    assert first["choices"][0]["text"] == second["choices"][0]["text"]
    details = [r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in (first, second)]
    assert details[0] == 0 and details[1] == 64  # whole blocks, short of the last token
    _assert_let_go(server)


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=120) as r:
        result: dict[str, Any] = json.loads(r.read())
    return result


def _assert_let_go(server: ServingThread) -> None:
    """Every slot and every pin on shared blocks returns to zero once idle
    (a bound that stops a hang, not a timing assertion)."""
    for _ in range(600):
        footprint = _footprint(server)
        if footprint.total == 0:
            break
        asyncio.run(asyncio.sleep(0.05))
    assert footprint.total == 0, footprint
    assert footprint.target_prefix_pins and footprint.draft_prefix_pins  # really asked
