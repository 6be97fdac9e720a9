"""Shared pieces of the router tests: tiny requests with mixed lengths and a
repeat for the n-gram drafter, target-only reference decoding (a no-cache
loop over the model), router configs with one torch thread per actor, and waiting on the
router's state (bounds that stop a hang, never timing assertions)."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray
import torch
from references import greedy_reference
from tiny_models import VOCAB

from specray.actors.drafting.spec import DrafterSpec
from specray.actors.engine.request import GenerationRequest, RequestOutput
from specray.actors.sampling.params import StoppingCriteria
from specray.cluster.router import RouterConfig, RouterState, open_stream
from specray.deploy.config import DrafterConfig, RouterSettings
from specray.deploy.router_backend import router_config as build_router_config

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


def target_only(model_dir: Path, requests: list[GenerationRequest]) -> dict[str, list[int]]:
    """Greedy decoding by a no-cache loop over the model: the ground truth."""
    prompts = {r.request_id: r.prompt_ids for r in requests}
    counts = {r.request_id: r.stopping.max_tokens for r in requests}
    return greedy_reference(model_dir, prompts, counts)


def router_config(
    model_dir: Path,
    draft: DrafterSpec | None = None,
    draft_placement: str = "auto",
    **options: Any,
) -> RouterConfig:
    """A router over a tiny checkpoint, built the way ``specray serve`` builds
    one (from :class:`RouterSettings`): fp32, one thread and one Ray CPU per
    actor; ``draft`` placed as ``draft_placement`` says (auto: a lookup
    drafter in the router's process). ``options`` set settings; any other
    :class:`RouterConfig` field is replaced afterwards."""
    fields: dict[str, Any] = {
        "target": str(model_dir),
        "dtype": "float32",
        "tp": 1,
        "threads_per_shard": 1,
        "max_len": MAX_LEN,
        "drafts": []
        if draft is None
        else [DrafterConfig.from_spec(draft).model_dump() | {"placement": draft_placement}],
    }
    extras = {}
    for key, value in options.items():
        if key in RouterSettings.model_fields:
            fields[key] = value
        else:
            extras[key] = value
    config = build_router_config(RouterSettings.model_validate(fields))
    if config.draft is not None:  # slack for a loaded machine
        extras["draft"] = replace(config.draft, timeout_s=60)
    return replace(config, **extras)


async def stream_all(router: Any, request: GenerationRequest) -> tuple[list[int], RequestOutput]:
    tokens: list[int] = []
    last = None
    async for ref in open_stream(router, request):
        chunk: RequestOutput = await ref
        tokens += chunk.token_ids
        last = chunk
    assert last is not None and last.finished
    return tokens, last


async def first_chunks(
    router: Any, requests: list[GenerationRequest]
) -> tuple[list[Any], list[RequestOutput]]:
    """Each request's open stream and its first chunk: every request is
    mid-stream (admitted, holding router state) when this returns."""
    streams = [open_stream(router, r) for r in requests]
    firsts = [await (await anext(s)) for s in streams]
    return streams, firsts


async def finish_streams(
    streams: list[Any], firsts: list[RequestOutput]
) -> list[tuple[list[int], RequestOutput]]:
    """Each stream of :func:`first_chunks` read to its end: all its tokens,
    the first chunk's included, and its last chunk."""

    async def rest(stream: Any, first: RequestOutput) -> tuple[list[int], RequestOutput]:
        tokens, last = list(first.token_ids), first
        async for ref in stream:
            last = await ref
            tokens += last.token_ids
        return tokens, last

    return await asyncio.gather(*(rest(s, f) for s, f in zip(streams, firsts, strict=True)))


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
    """The router's state once every slot release is confirmed and no draft
    replica holds request state any more (its ``finish`` is fire-and-forget,
    so it can land after the target's release). A generous bound on a loaded
    machine, not a timing assertion."""
    for _ in range(3000):
        state = router_state(router)
        if (
            not state.running
            and not state.waiting
            and not any(t.releasing for t in state.targets)
            and not any(d.tracked > 0 for d in state.drafts)
        ):
            return state
        time.sleep(0.01)
    raise AssertionError(f"router never went idle: {state}")
