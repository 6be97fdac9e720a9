"""Suffix drafting through the router: real Ray actors on loopback, a tiny
fp32 target, one draft replica whose suffix cache serves later requests.
Token trees travel from the draft replica to the target as flat tokens plus
parents; greedy output must equal target-only decoding."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import ray
from router_helpers import router_config, stream_all, target_only, tiny_request, wait_idle

from specray.actors.drafting.spec import DrafterSpec
from specray.cluster.local_ray import start_ray
from specray.cluster.router import launch_router


@pytest.fixture(scope="module")
def suffix_router(tiny_dir_factory) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    info = start_ray(num_cpus=4)
    config = router_config(tiny_dir_factory("qwen2"), DrafterSpec("suffix"), k=16)
    router = launch_router(config)
    yield router
    ray.get(router.shutdown.remote())
    if info.started_here:
        ray.shutdown()


@pytest.mark.slow
def test_greedy_with_suffix_trees_equals_target_only(
    suffix_router: Any,
    tiny_dir_factory,  # type: ignore[no-untyped-def]
) -> None:
    first = [tiny_request(i, max_tokens=32, prefix="first") for i in range(3)]
    again = [replace(r, request_id=r.request_id.replace("first", "again")) for r in first]

    async def run(requests: list[Any]) -> dict[str, Any]:
        results = await asyncio.gather(*(stream_all(suffix_router, r) for r in requests))
        return {r.request_id: result for r, result in zip(requests, results, strict=True)}

    # Fixed speculation: every round verifies its whole copy, past the budget.
    fixed = [
        replace(r, request_id=r.request_id.replace("first", "fixed"), fixed_speculation=True)
        for r in first
    ]
    done = asyncio.run(run(first))
    done |= asyncio.run(run(again))  # the draft replica's cache holds the first answers
    done |= asyncio.run(run(fixed))
    tokens = {rid: t for rid, (t, _) in done.items()}
    assert tokens == target_only(tiny_dir_factory("qwen2"), first + again + fixed)
    repeated = [done[r.request_id][1].stats for r in again + fixed]
    assert all(s.accepted_tokens > s.rounds for s in repeated)  # whole stretches per round
    state = wait_idle(suffix_router)
    assert all(d.tracked == 0 for d in state.drafts)
