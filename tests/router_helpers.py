"""Shared pieces of the router tests: tiny requests with mixed lengths and a
repeat for the n-gram drafter, target-only reference decoding in this
process, router configs with one torch thread per actor, and waiting on the
router's state (bounds that stop a hang, never timing assertions)."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import torch
from tiny_models import VOCAB

from specray.actors.engine.engine import EngineConfig, SpecEngine
from specray.actors.engine.request import GenerationRequest, RequestOutput
from specray.actors.engine.target import LocalTarget
from specray.actors.model.loader import load_model
from specray.actors.sampling.params import StoppingCriteria
from specray.actors.workers.draft_worker import DraftWorkerSpec
from specray.cluster.draft_pool import DraftPoolConfig
from specray.cluster.router import RouterConfig, RouterState, open_stream
from specray.cluster.target_group import ShardedTargetConfig

MAX_LEN = 256


def tiny_prompt(i: int) -> list[int]:
    gen = torch.Generator().manual_seed(1000 + i)
    body = torch.randint(3, VOCAB, (3 + (7 * i) % 23,), generator=gen).tolist()
    return body + body[:4]  # a repeat so n-gram lookup finds matches


def tiny_request(i: int, max_tokens: int | None = None, prefix: str = "r") -> GenerationRequest:
    tokens = max_tokens if max_tokens is not None else 8 + (11 * i) % 29  # mixed lengths
    return GenerationRequest(
        f"{prefix}{i}",
        tiny_prompt(i),
        stopping=StoppingCriteria(max_tokens=tokens, ignore_eos=True),
    )


def target_only(
    model_dir: Path, requests: list[GenerationRequest], max_len: int = MAX_LEN
) -> dict[str, list[int]]:
    """Target-only greedy decoding in this process: the ground truth."""
    target = LocalTarget(load_model(model_dir), num_slots=16, max_len=max_len)
    engine = SpecEngine(target, None, None, (), EngineConfig(16, 0, adaptive=False))
    outputs: dict[str, list[int]] = {r.request_id: [] for r in requests}
    for chunk in engine.generate(requests):
        outputs[chunk.request_id] += chunk.token_ids
    return outputs


def router_config(
    model_dir: Path, draft: DraftWorkerSpec | None = None, **options: Any
) -> RouterConfig:
    target = ShardedTargetConfig(
        str(model_dir),
        tp=options.pop("tp", 1),
        threads_per_shard=1,
        num_slots=options.pop("num_slots", 8),
        max_len=options.pop("max_len", MAX_LEN),
        timeout_s=options.pop("timeout_s", 60),
    )
    pool = DraftPoolConfig(draft, num_cpus=1, timeout_s=60) if draft is not None else None
    return RouterConfig(target=target, draft=pool, **options)


async def stream_all(router: Any, request: GenerationRequest) -> tuple[list[int], RequestOutput]:
    tokens: list[int] = []
    last = None
    async for ref in open_stream(router, request):
        chunk: RequestOutput = await ref
        tokens += chunk.token_ids
        last = chunk
    assert last is not None and last.finished
    return tokens, last


async def run_all(router: Any, requests: list[GenerationRequest]) -> dict[str, list[int]]:
    results = await asyncio.gather(*(stream_all(router, r) for r in requests))
    return {r.request_id: tokens for r, (tokens, _) in zip(requests, results, strict=True)}


def router_state(router: Any) -> RouterState:
    state: RouterState = ray.get(router.state.remote())
    return state


def wait_for(router: Any, condition: Callable[[RouterState], bool]) -> RouterState:
    """The router's state once ``condition`` holds (a bound, not a timing assertion)."""
    for _ in range(6000):
        state = router_state(router)
        if condition(state):
            return state
        time.sleep(0.01)
    raise AssertionError(f"condition never held: {state}")


def scrape(state: RouterState) -> str:
    assert state.metrics_port is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{state.metrics_port}/metrics") as page:
        return str(page.read().decode())


def sample(text: str, name: str, **labels: str) -> float:
    """The value of the series ``name`` whose labels include ``labels``."""
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    for line in text.splitlines():
        if line.startswith(name + "{") and all(w in line for w in wanted):
            return float(line.split()[-1])
    raise AssertionError(f"{name} {labels} not in the metrics")


def wait_idle(router: Any) -> RouterState:
    """The router's state once every slot release is confirmed (a generous
    bound on a loaded machine, not a timing assertion)."""
    for _ in range(3000):
        state = router_state(router)
        if not state.running and not state.waiting and not any(t.releasing for t in state.targets):
            return state
        time.sleep(0.01)
    raise AssertionError(f"router never went idle: {state}")
