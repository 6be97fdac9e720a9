"""Router benchmark: what Ray costs against the in-process engine, the actor
round trips, and a concurrency sweep of speculative against target-only
decoding through the router, all in one run on the same model and prompts.

1. Round trips: an empty call to a plain actor, to the async router actor,
   and a draft replica's fused update-and-propose for 8 requests.
2. Ray overhead: the same requests through the in-process engine
   (``SpecEngine`` + ``LocalTarget``) and through the router, target-only and
   with a fixed γ (so both run the same rounds), alternating, fastest of a
   few each; overhead = router seconds per round ÷ engine seconds per round
   − 1.
   The router also times itself: its propose and verify waits minus the
   replicas' own compute is the transport cost per round, a measure that
   machine load skews much less.
3. Sweep: for each concurrency, ``max(c, --requests)`` requests served by
   ``c`` closed-loop clients, target-only (``none``: the same requests with
   ``num_speculative_tokens=0``) against one router configuration per mode:
   ``spec`` (adaptive γ), ``spec-fixed`` (γ = k always) and ``spec-overlap``
   (adaptive, two micro-batches). One router lives at a time (memory);
   within it the two are interleaved in alternating order over
   ``--passes`` passes, fastest kept, so machine noise hits both alike.
   Greedy; outputs are checked against ``none``.

    python -m specray.bench.router_bench --target qwen2.5-coder-0.5b-instruct \\
        --dtype bfloat16 --max-tokens 64 --concurrency 1,2,4,8,16

Writes ``router_<target>_<dtype>[_<tag>].{json,md}`` under ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import ray
import torch
from transformers import AutoTokenizer

from specray.actors.drafting.base import DraftRequest
from specray.actors.drafting.ngram import NgramDrafter
from specray.actors.engine.engine import EngineConfig, SpecEngine
from specray.actors.engine.request import GenerationRequest, RequestOutput
from specray.actors.engine.target import LocalTarget
from specray.actors.model.config import ModelConfig
from specray.actors.model.loader import load_model
from specray.actors.sampling.params import SamplingParams, StoppingCriteria
from specray.actors.store.resolve import resolve_model
from specray.actors.workers.draft_worker import DraftWorker, DraftWorkerSpec
from specray.bench.prompts import load_prompts
from specray.bench.spec_bench import chat_ids, eos_ids
from specray.cluster.draft_pool import DraftPoolConfig
from specray.cluster.local_ray import start_ray
from specray.cluster.router import (
    RouterConfig,
    RouterState,
    RouterTimings,
    launch_router,
    open_stream,
)
from specray.cluster.target_group import ShardedTargetConfig

SPEC_MODES = ("spec", "spec-fixed", "spec-overlap")
NICENESS_ENV = "RAY_worker_niceness"  # read by Ray's raylet when it starts


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


# -- requests ------------------------------------------------------------------


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


# -- the in-process engine -----------------------------------------------------------


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


# -- the router ----------------------------------------------------------------


def router_config(args: argparse.Namespace, target_dir: Path, mode: str) -> RouterConfig:
    slots = max(args.concurrency_levels)
    target = ShardedTargetConfig(
        str(target_dir),
        dtype=args.dtype,
        num_slots=slots,
        max_len=args.max_len,
        threads_per_shard=args.threads,
        cpus_per_shard=1,
        timeout_s=600,
    )
    spec = DraftWorkerSpec("ngram", num_slots=slots, num_threads=1)
    return RouterConfig(
        target=target,
        draft=DraftPoolConfig(spec, num_cpus=0.5, timeout_s=600),
        num_speculative_tokens=args.k,
        adaptive=mode in ("spec", "spec-overlap"),
        overlap=mode == "spec-overlap",
        eos_token_ids=None,
        tokenizer_dir=None,
    )


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


def fastest(runs: Sequence[RunResult]) -> RunResult:
    return min(runs, key=lambda r: r.wall_s)


# -- round trips -----------------------------------------------------------------


class _Echo:
    def echo(self, value: Any) -> Any:
        return value


def _median_ms(call: Any, repeats: int) -> float:
    call()  # warm
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        call()
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1e3


def round_trips(router: Any, prompts: Sequence[list[int]], repeats: int) -> dict[str, float]:
    echo: Any = ray.remote(_Echo).options(num_cpus=0).remote()
    draft: Any = ray.remote(DraftWorker).options(num_cpus=0).remote(DraftWorkerSpec())
    for i in range(8):
        ray.get(draft.start.remote(f"q{i}", prompts[i % len(prompts)], SamplingParams()))
    asks = [DraftRequest(f"q{i}", 4) for i in range(8)]
    result = {
        "plain_actor_call_ms": _median_ms(lambda: ray.get(echo.echo.remote(None)), repeats),
        "async_router_call_ms": _median_ms(lambda: ray.get(router.ping.remote()), repeats),
        "draft_propose_8_requests_ms": _median_ms(
            lambda: ray.get(draft.propose.remote(asks, [])), repeats
        ),
    }
    ray.kill(echo)
    ray.kill(draft)
    return result


# -- main -------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    args.concurrency_levels = [int(c) for c in args.concurrency.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in SPEC_MODES for m in modes):
        raise SystemExit(f"--modes takes a comma list of {', '.join(SPEC_MODES)}")
    torch.set_num_threads(args.threads)  # this script's own process
    target_dir = resolve_model(args.target, fetch_missing=False, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    eos = eos_ids(ModelConfig.from_pretrained(target_dir), tokenizer)
    categories = args.categories.split(",") if args.categories else None
    prompts = [chat_ids(tokenizer, p.prompt) for p in load_prompts(categories, split="eval")]
    # Interleave categories so every batch mixes them.
    prompts = [prompts[i] for i in sorted(range(len(prompts)), key=lambda i: (i % 8, i))]
    started = time.perf_counter()

    # Ray starts its workers at nice 15; the in-process engine runs at 0. On
    # a shared machine that alone makes the actors slower, so compare at the
    # same priority (as on a dedicated machine).
    os.environ.setdefault(NICENESS_ENV, str(args.worker_niceness))
    start_ray(num_cpus=8)

    # One router (one target replica) alive at a time, to fit in memory next
    # to other people's jobs. Each serves its mode and, interleaved, the
    # target-only baseline (the same requests with num_speculative_tokens=0).
    trips: dict[str, float] = {}
    engine_runs: list[RunResult] = []
    overhead_runs: list[RunResult] = []
    sweep: list[RunResult] = []
    states: dict[str, RouterState] = {}
    for mode in modes:
        router = launch_router(router_config(args, target_dir, mode))
        if not trips:
            trips = round_trips(router, prompts, args.round_trip_repeats)
            print(f"round trips: {trips}", flush=True)
        if mode == "spec-fixed":
            engine, routed = measure_overhead(args, router, target_dir, prompts, eos)
            engine_runs += engine
            overhead_runs += routed
        sweep += run_sweep(args, router, prompts, mode)
        states[mode] = ray.get(router.state.remote())
        ray.get(router.shutdown.remote())
        ray.kill(router)

    result = {
        "target": args.target,
        "dtype": args.dtype,
        "max_tokens": args.max_tokens,
        "k": args.k,
        "threads": args.threads,
        "requests_per_level": args.requests,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "ray": ray.__version__,
            "load_avg_at_end": os.getloadavg(),
            "ray_worker_niceness": os.environ.get(NICENESS_ENV),
        },
        "round_trips_ms": trips,
        "overhead": overhead_table(engine_runs, overhead_runs),
        "sweep": sweep_table(sweep),
        "goals": goals(sweep),
        "learned_costs": {
            m: {"verify_s": s.verify_costs, "draft_s": s.draft_costs} for m, s in states.items()
        },
        "runs": [r.summary() for r in [*engine_runs, *overhead_runs, *sweep]],
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    write_outputs(result, args.out, args.tag)
    return result


def measure_overhead(
    args: argparse.Namespace,
    router: Any,
    target_dir: Path,
    prompts: Sequence[list[int]],
    eos: tuple[int, ...],
) -> tuple[list[RunResult], list[RunResult]]:
    """The in-process engine and the router on the same requests, target-only
    and fixed γ, alternating, fastest of ``--overhead-repeats`` each (the
    minimum is the least disturbed run on a shared machine)."""
    model = load_model(target_dir, args.dtype)
    engine_runs, router_runs = [], []
    for concurrency in args.overhead_concurrency:
        count = max(concurrency, args.requests)
        requests = build_requests(prompts, count, args.max_tokens, f"e{concurrency}")
        for mode in ("none", "spec-fixed"):
            engine_tries, router_tries = [], []
            for _ in range(args.overhead_repeats):
                engine_tries.append(
                    run_engine(model, requests, concurrency, args.k, eos, mode, args.max_len)
                )
                router_tries.append(run_router(router, requests, concurrency, mode, "spec-fixed"))
            engine_runs.append(fastest(engine_tries))
            router_runs.append(fastest(router_tries))
            print(
                f"{mode} c={concurrency}: engine {engine_runs[-1].tokens_per_s:.2f} tok/s, "
                f"router {router_runs[-1].tokens_per_s:.2f} tok/s",
                flush=True,
            )
    del model
    gc.collect()
    return engine_runs, router_runs


def run_sweep(
    args: argparse.Namespace, router: Any, prompts: Sequence[list[int]], phase: str
) -> list[RunResult]:
    """Every concurrency, target-only and ``phase`` interleaved in alternating
    order over ``--passes`` passes, fastest of each kept."""
    sweep: list[RunResult] = []
    modes = ["none", phase]
    for concurrency in args.concurrency_levels:
        count = max(concurrency, args.requests)
        requests = build_requests(prompts, count, args.max_tokens, f"s{concurrency}")
        tries: dict[str, list[RunResult]] = {mode: [] for mode in modes}
        for n in range(args.passes):
            for mode in modes if n % 2 == 0 else reversed(modes):
                run = run_router(router, requests, concurrency, mode, phase)
                tries[mode].append(run)
                print(
                    f"[{phase}] {mode} c={concurrency}: {run.tokens_per_s:.2f} tok/s "
                    f"tau={run.tau:.2f} ({run.wall_s:.1f} s, {run.round_ms:.0f} ms/round, "
                    f"transport {run.transport_ms:.1f} ms/round)",
                    flush=True,
                )
        sweep += [fastest(tries[mode]) for mode in modes]
    return sweep


def overhead_table(engine: list[RunResult], router: list[RunResult]) -> list[dict[str, Any]]:
    """Per batched round: wall × concurrency ÷ request-rounds (same requests,
    same greedy output and fixed γ, so both sides run the same rounds)."""
    rows = []
    for e in engine:
        match = [r for r in router if (r.mode, r.concurrency) == (e.mode, e.concurrency)]
        if not match:
            continue
        r = match[0]
        engine_round = e.wall_s * e.concurrency / e.rounds
        router_round = r.wall_s * r.concurrency / r.rounds
        rows.append(
            {
                "mode": e.mode,
                "concurrency": e.concurrency,
                "engine_tokens_per_s": round(e.tokens_per_s, 3),
                "router_tokens_per_s": round(r.tokens_per_s, 3),
                "engine_round_ms": round(1e3 * engine_round, 2),
                "router_round_ms": round(1e3 * router_round, 2),
                "overhead_pct": round(100 * (router_round / engine_round - 1), 2),
                "router_transport_ms": round(r.transport_ms, 2),
                "router_transport_pct": round(100 * r.transport_ms / max(r.round_ms, 1e-9), 2),
                "same_rounds": e.rounds == r.rounds,
                "same_output": _same(e.outputs, r.outputs),
            }
        )
    return rows


def _same(a: dict[str, list[int]], b: dict[str, list[int]]) -> float:
    """Fraction of requests (matched by position) with identical tokens."""
    left, right = list(a.values()), list(b.values())
    return sum(x == y for x, y in zip(left, right, strict=True)) / max(len(left), 1)


def sweep_table(sweep: list[RunResult]) -> list[dict[str, Any]]:
    baseline = {(r.phase, r.concurrency): r for r in sweep if r.mode == "none"}
    rows = []
    for r in sweep:
        base = baseline[(r.phase, r.concurrency)]
        rows.append(
            {
                "phase": r.phase,
                "mode": r.mode,
                "concurrency": r.concurrency,
                "requests": r.requests,
                "tokens_per_s": round(r.tokens_per_s, 3),
                "vs_none": round(r.tokens_per_s / base.tokens_per_s, 3),
                "tau": round(r.tau, 3),
                "draft_tokens": r.draft_tokens,
                "accepted_tokens": r.accepted_tokens,
                "mean_ttft_s": round(r.mean_ttft_s, 3),
                "wall_s": round(r.wall_s, 2),
                "round_ms": round(r.round_ms, 2),
                "transport_ms": round(r.transport_ms, 2),
                "same_output_as_none": _same(base.outputs, r.outputs),
            }
        )
    return rows


def goals(sweep: list[RunResult]) -> dict[str, Any]:
    by = {(r.phase, r.mode, r.concurrency): r for r in sweep}
    levels = sorted({r.concurrency for r in sweep})
    phases = sorted({r.phase for r in sweep})
    spec_vs_none = {
        phase: {
            f"c={c}": round(
                by[(phase, phase, c)].tokens_per_s / by[(phase, "none", c)].tokens_per_s, 3
            )
            for c in levels
        }
        for phase in phases
    }
    scaling = {
        f"{phase}/{mode}": round(
            by[(phase, mode, 8)].tokens_per_s / by[(phase, mode, 1)].tokens_per_s, 3
        )
        for phase in phases
        for mode in ("none", phase)
        if (phase, mode, 1) in by and (phase, mode, 8) in by
    }
    return {"spec_vs_none": spec_vs_none, "tokens_per_s_c8_over_c1": scaling}


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Router benchmark: {result['target']} ({result['dtype']})",
        "",
        f"max_tokens {result['max_tokens']}, k {result['k']}, target threads "
        f"{result['threads']}, {result['machine']['cpus']} CPUs, load average at the end "
        f"{', '.join(f'{x:.1f}' for x in result['machine']['load_avg_at_end'])}; "
        f"{result['elapsed_s']} s in all.",
        "",
        "## Actor round trips (median)",
        "",
        "| call | ms |",
        "|---|---:|",
        *(f"| {k} | {v:.2f} |" for k, v in result["round_trips_ms"].items()),
        "",
        "## Ray overhead against the in-process engine",
        "",
        "| mode | c | engine tok/s | router tok/s | engine ms/round | router ms/round "
        "| wall overhead | transport ms/round | transport share | same rounds | same output |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
        *(
            f"| {r['mode']} | {r['concurrency']} | {r['engine_tokens_per_s']} | "
            f"{r['router_tokens_per_s']} | {r['engine_round_ms']} | {r['router_round_ms']} | "
            f"{r['overhead_pct']}% | {r['router_transport_ms']} | "
            f"{r['router_transport_pct']}% | {r['same_rounds']} | {r['same_output']:.2f} |"
            for r in result["overhead"]
        ),
        "",
        "## Concurrency sweep through the router",
        "",
        "| router | mode | c | requests | tok/s | × none | τ | drafted | accepted | TTFT s "
        "| ms/round | transport ms/round | same output |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {r['phase']} | {r['mode']} | {r['concurrency']} | {r['requests']} | "
            f"{r['tokens_per_s']} | "
            f"{r['vs_none']} | {r['tau']} | {r['draft_tokens']} | {r['accepted_tokens']} | "
            f"{r['mean_ttft_s']} | {r['round_ms']} | {r['transport_ms']} | "
            f"{r['same_output_as_none']:.2f} |"
            for r in result["sweep"]
        ),
        "",
        "## Goals",
        "",
        f"- spec ÷ none per concurrency: {result['goals']['spec_vs_none']}",
        f"- tokens/s at c=8 ÷ c=1: {result['goals']['tokens_per_s_c8_over_c1']}",
        "",
    ]
    return "\n".join(lines)


def write_outputs(result: dict[str, Any], out_dir: Path, tag: str | None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"router_{Path(result['target']).name}_{result['dtype']}" + (f"_{tag}" if tag else "")
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    (out_dir / f"{stem}.md").write_text(text)
    print(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--target", default="qwen2.5-coder-0.5b-instruct", help="name or path")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--k", type=int, default=4, help="γ ceiling (spec) or γ (spec-fixed)")
    p.add_argument("--concurrency", default="1,2,4,8,16")
    p.add_argument(
        "--overhead-concurrency",
        type=lambda s: [int(c) for c in s.split(",")],
        default=[1, 8],
        help="levels compared with the in-process engine",
    )
    p.add_argument("--requests", type=int, default=8, help="requests per level (at least c)")
    p.add_argument("--overhead-repeats", type=int, default=2)
    p.add_argument("--passes", type=int, default=2, help="sweep passes; fastest kept")
    p.add_argument("--modes", default=",".join(SPEC_MODES), help="routers to sweep, in order")
    p.add_argument("--categories", default=None, help="comma list; default all")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the target")
    p.add_argument("--round-trip-repeats", type=int, default=200)
    p.add_argument(
        "--worker-niceness", type=int, default=0, help="of Ray's workers (Ray's default: 15)"
    )
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--tag", default=None)
    return p


if __name__ == "__main__":
    main()
