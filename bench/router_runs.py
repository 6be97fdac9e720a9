"""What the router benchmark runs: batches of requests through the
in-process engine and through a router, closed loop, and the actor round
trips; every try is kept (:attr:`RunResult.attempt`), the fastest reported."""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import ray

from specray.actors.drafting.base import DraftRequest
from specray.actors.drafting.ngram import NgramDrafter
from specray.actors.drafting.spec import DrafterSpec
from specray.actors.engine.engine import EngineConfig, SpecEngine
from specray.actors.engine.request import GenerationRequest, RequestOutput
from specray.actors.engine.target import LocalTarget
from specray.actors.model.loader import load_model
from specray.actors.sampling.params import SamplingParams, StoppingCriteria
from specray.actors.workers.draft_worker import DraftWorker, DraftWorkerSpec
from specray.bench.common import timed_ms
from specray.cluster.router import RouterConfig, RouterTimings, open_stream
from specray.deploy.config import DrafterConfig, RouterSettings
from specray.deploy.router_backend import router_config as build_router_config


@dataclass
class RunResult:
    """One batch of requests served to completion."""

    where: str  # "engine" or "router"
    mode: str  # "none" (target-only) or a speculative mode
    phase: str  # the router configuration that served it
    concurrency: int
    requests: int
    output_tokens: int
    rounds: int  # summed over requests
    wall_s: float
    draft_tokens: int
    accepted_tokens: int
    mean_ttft_s: float
    outputs: dict[str, list[int]]
    # Router only: its own phase timings against the replicas' compute (ms per round).
    round_ms: float = 0.0
    transport_ms: float = 0.0
    attempt: int = 0  # which try of the same batch (the fastest is reported)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s

    @property
    def tau(self) -> float:
        """Tokens per request-round, the bonus token included."""
        return self.output_tokens / self.rounds if self.rounds else 0.0

    def summary(self) -> dict[str, Any]:
        row = {k: v for k, v in asdict(self).items() if k != "outputs"}
        row["tokens_per_s"] = round(self.tokens_per_s, 3)
        row["tau"] = round(self.tau, 3)
        return row


def build_requests(
    prompts: Sequence[list[int]], count: int, max_tokens: int, tag: str
) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            f"{tag}-{i}",
            list(prompts[i % len(prompts)]),
            stopping=StoppingCriteria(max_tokens=max_tokens),
        )
        for i in range(count)
    ]


def run_engine(
    model: Any,
    requests: list[GenerationRequest],
    concurrency: int,
    k: int,
    eos: tuple[int, ...],
    mode: str,
    max_len: int,
) -> RunResult:
    """Closed loop: ``concurrency`` requests in flight, like the router's clients."""
    drafter = NgramDrafter() if mode != "none" else None
    target = LocalTarget(model, concurrency, max_len)
    engine = SpecEngine(
        target, drafter, None, eos, EngineConfig(concurrency, k if drafter else 0, adaptive=False)
    )
    outputs: dict[str, list[int]] = {r.request_id: [] for r in requests}
    finished: list[RequestOutput] = []
    pending = list(requests)
    began = time.perf_counter()
    while pending and len(engine.running) + len(engine.waiting) < concurrency:
        engine.add_request(pending.pop(0))
    while engine.has_work:
        for chunk in engine.step():
            outputs[chunk.request_id] += chunk.token_ids
            if chunk.finished:
                finished.append(chunk)
                if pending:
                    engine.add_request(pending.pop(0))
    wall = time.perf_counter() - began
    return _result("engine", mode, "engine", concurrency, finished, outputs, wall)


def _result(
    where: str,
    mode: str,
    phase: str,
    concurrency: int,
    finished: Sequence[RequestOutput],
    outputs: dict[str, list[int]],
    wall: float,
) -> RunResult:
    ttfts = [
        c.stats.first_token_at - c.stats.created_at
        for c in finished
        if c.stats.first_token_at is not None
    ]
    return RunResult(
        where=where,
        mode=mode,
        phase=phase,
        concurrency=concurrency,
        requests=len(finished),
        output_tokens=sum(len(v) for v in outputs.values()),
        rounds=sum(c.stats.rounds for c in finished),
        wall_s=wall,
        draft_tokens=sum(c.stats.draft_tokens for c in finished),
        accepted_tokens=sum(c.stats.accepted_tokens for c in finished),
        mean_ttft_s=statistics.fmean(ttfts) if ttfts else 0.0,
        outputs=outputs,
    )


def router_config(args: argparse.Namespace, target_dir: Path, mode: str) -> RouterConfig:
    """The router ``specray serve`` would build from these settings, without
    a tokenizer (ids only) and with a long deadline for a loaded machine."""
    slots = max(args.concurrency_levels)
    drafter = DrafterConfig.from_spec(DrafterSpec("ngram")).model_copy(
        update={"num_slots": slots, "threads": 1, "cpus": 0.5}
    )
    settings = RouterSettings.model_validate(
        {
            "target": str(target_dir),
            "tp": 1,
            "dtype": args.dtype,
            "num_slots": slots,
            "max_len": args.max_len,
            "threads_per_shard": args.threads,
            "cpus_per_shard": 1,
            "timeout_s": 600,
            "drafts": [drafter.model_dump()],
            "k": args.k,
            "adaptive": mode in ("spec", "spec-overlap"),
            "overlap": mode == "spec-overlap",
        }
    )
    config = build_router_config(settings)
    assert config.draft is not None
    return replace(config, draft=replace(config.draft, timeout_s=600), tokenizer_dir=None)


async def _serve(router: Any, requests: list[GenerationRequest], concurrency: int) -> Any:
    outputs: dict[str, list[int]] = {r.request_id: [] for r in requests}
    finished: list[RequestOutput] = []
    queue = list(requests)

    async def client() -> None:
        while queue:
            request = queue.pop(0)
            async for ref in open_stream(router, request):
                chunk: RequestOutput = await ref
                outputs[chunk.request_id] += chunk.token_ids
                if chunk.finished:
                    finished.append(chunk)

    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return finished, outputs, time.perf_counter() - began


def run_router(
    router: Any, requests: list[GenerationRequest], concurrency: int, mode: str, phase: str
) -> RunResult:
    """``mode="none"``: the same requests with speculation off (γ = 0)."""
    if mode == "none":
        requests = [replace(r, num_speculative_tokens=0) for r in requests]
    ray.get(router.timings.remote(True))
    finished, outputs, wall = asyncio.run(_serve(router, requests, concurrency))
    result = _result("router", mode, phase, concurrency, finished, outputs, wall)
    timings: RouterTimings = ray.get(router.timings.remote())
    rounds = max(timings.router.rounds, 1)
    result.round_ms = 1e3 * timings.router.round_s / rounds
    result.transport_ms = 1e3 * timings.transport_s / rounds
    return result


def fastest(runs: Sequence[RunResult]) -> list[RunResult]:
    """Per (where, mode, phase, concurrency), the fastest try."""
    best: dict[tuple[str, str, str, int], RunResult] = {}
    for run in runs:
        key = (run.where, run.mode, run.phase, run.concurrency)
        if key not in best or run.wall_s < best[key].wall_s:
            best[key] = run
    return list(best.values())


class _Echo:
    def echo(self, value: Any) -> Any:
        return value


def round_trips(router: Any, prompts: Sequence[list[int]], repeats: int) -> dict[str, float]:
    echo: Any = ray.remote(_Echo).options(num_cpus=0).remote()
    draft: Any = ray.remote(DraftWorker).options(num_cpus=0).remote(DraftWorkerSpec())
    for i in range(8):
        ray.get(draft.start.remote(f"q{i}", prompts[i % len(prompts)], SamplingParams()))
    asks = [DraftRequest(f"q{i}", 4) for i in range(8)]
    result = {
        "plain_actor_call_ms": timed_ms(lambda: ray.get(echo.echo.remote(None)), repeats),
        "async_router_call_ms": timed_ms(lambda: ray.get(router.ping.remote()), repeats),
        "draft_propose_8_requests_ms": timed_ms(
            lambda: ray.get(draft.propose.remote(asks, [])), repeats
        ),
    }
    ray.kill(echo)
    ray.kill(draft)
    return result


def measure_overhead(
    args: argparse.Namespace,
    router: Any,
    target_dir: Path,
    prompts: Sequence[list[int]],
    eos: tuple[int, ...],
) -> tuple[list[RunResult], list[RunResult]]:
    """The in-process engine and the router on the same requests, target-only
    and fixed γ, alternating, ``--overhead-repeats`` tries each (the report
    keeps the fastest: the least disturbed run on a shared machine)."""
    model = load_model(target_dir, args.dtype)
    engine_runs, router_runs = [], []
    for concurrency in args.overhead_concurrency:
        count = max(concurrency, args.requests)
        requests = build_requests(prompts, count, args.max_tokens, f"e{concurrency}")
        for mode in ("none", "spec-fixed"):
            for attempt in range(args.overhead_repeats):
                run = run_engine(model, requests, concurrency, args.k, eos, mode, args.max_len)
                engine_runs.append(replace(run, attempt=attempt))
                run = run_router(router, requests, concurrency, mode, "spec-fixed")
                router_runs.append(replace(run, attempt=attempt))
            print(
                f"{mode} c={concurrency}: engine {engine_runs[-1].tokens_per_s:.2f} tok/s, "
                f"router {router_runs[-1].tokens_per_s:.2f} tok/s (last try)",
                flush=True,
            )
    del model
    gc.collect()
    return engine_runs, router_runs


def run_sweep(
    args: argparse.Namespace, router: Any, prompts: Sequence[list[int]], phase: str
) -> list[RunResult]:
    """Every concurrency, target-only and ``phase`` interleaved in alternating
    order over ``--passes`` passes; every pass is returned."""
    sweep: list[RunResult] = []
    modes = ["none", phase]
    for concurrency in args.concurrency_levels:
        count = max(concurrency, args.requests)
        requests = build_requests(prompts, count, args.max_tokens, f"s{concurrency}")
        for n in range(args.passes):
            for mode in modes if n % 2 == 0 else reversed(modes):
                run = replace(run_router(router, requests, concurrency, mode, phase), attempt=n)
                sweep.append(run)
                print(
                    f"[{phase}] {mode} c={concurrency}: {run.tokens_per_s:.2f} tok/s "
                    f"tau={run.tau:.2f} ({run.wall_s:.1f} s, {run.round_ms:.0f} ms/round, "
                    f"transport {run.transport_ms:.1f} ms/round)",
                    flush=True,
                )
    return sweep
