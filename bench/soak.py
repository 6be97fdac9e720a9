"""Soak: many concurrent gRPC streams against a router-backed server while a
chaos task SIGKILLs a random draft replica at intervals.

Every request is greedy and is compared, token for token, with the same
prompt's target-only output (``speculative=false``, computed through the same
server before the chaos starts). A request that fails is lost; one whose
tokens differ is garbled. The goal is none of either, with the killed draft
replicas restarted (the pool back to its size at the end).

    python -m specray.bench.soak --target smollm2-135m-instruct --dtype float32 \\
        --draft ngram --minutes 4 --num-slots 64 --categories chat,math,translation

On a CPU, size ``--num-slots`` (prefills of one round) and ``--concurrency``
to the machine: a round slower than ``--timeout`` looks like a hung group
(docs/reliability.md).

``tests/test_soak.py`` runs the same soak on a tiny model. Reports only: the
command prints a summary and optionally writes it as JSON; nothing is timed
against a threshold.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from specray.bench.common import machine_info
from specray.cluster.router_state import RouterState
from specray.protos.messages import build_request
from specray.protos.specray.v1 import generation_pb2_grpc as pb_grpc

Prompt = str | list[int]


@dataclass(frozen=True)
class SoakConfig:
    duration_s: float  # new requests start until then; those in flight finish
    concurrency: int = 64  # streams open at once
    max_tokens: int = 32
    kill_every_s: float = 5.0  # mean interval between draft kills (jittered ±50%)
    request_timeout_s: float = 600.0  # a request slower than this counts as lost
    seed: int = 0


@dataclass
class SoakReport:
    requests: int = 0  # finished with every token
    tokens: int = 0
    failures: list[str] = field(default_factory=list)  # lost requests: their errors
    mismatches: list[str] = field(default_factory=list)  # garbled outputs
    fallbacks: int = 0  # requests that lost their draft replica mid-request
    kills: int = 0
    draft_restarts: int = 0
    draft_restart_s: list[float] = field(default_factory=list)
    pool_restored: bool = False  # the draft pool was back to its size at the end
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures and not self.mismatches and self.pool_restored

    def summary(self) -> str:
        restart = self.draft_restart_s
        mean = f"{sum(restart) / len(restart):.2f} s" if restart else "-"
        lines = [
            f"requests {self.requests}  tokens {self.tokens}  in {self.seconds:.0f} s "
            f"({self.tokens / max(self.seconds, 1e-9):.0f} tokens/s)",
            f"failures {len(self.failures)}  mismatches {len(self.mismatches)}  "
            f"fallbacks {self.fallbacks}",
            f"draft kills {self.kills}  restarts {self.draft_restarts} (mean {mean})  "
            f"pool restored {self.pool_restored}",
        ]
        lines += [f"  lost: {f}" for f in self.failures[:5]]
        lines += [f"  garbled: {m}" for m in self.mismatches[:5]]
        return "\n".join(lines)


async def _generate(
    stub: pb_grpc.GenerationStub, prompt: Prompt, max_tokens: int, timeout_s: float, **extra: Any
) -> tuple[list[int], bool]:
    """One greedy streamed request: its tokens and whether it fell back."""
    request = build_request(
        prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **extra
    )
    tokens: list[int] = []
    fallback = False
    async for chunk in stub.GenerateStream(request, timeout=timeout_s):
        tokens += chunk.token_ids
        fallback = chunk.spec_stats.fallback
    return tokens, fallback


async def reference_outputs(
    address: str, prompts: Sequence[Prompt], config: SoakConfig
) -> list[list[int]]:
    """Each prompt's target-only greedy output, through the server."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        results = await asyncio.gather(
            *(
                _generate(stub, p, config.max_tokens, config.request_timeout_s, speculative=False)
                for p in prompts
            )
        )
    return [tokens for tokens, _ in results]


async def run_soak(
    address: str, router: Any, prompts: Sequence[Prompt], config: SoakConfig
) -> SoakReport:
    """Soak the server at ``address`` whose router actor is ``router`` (for
    the chaos task's victims and the restart counts); see the module doc."""
    reference = await reference_outputs(address, prompts, config)
    before: RouterState = await router.state.remote()
    wanted_drafts = len(before.drafts)
    report = SoakReport()
    began = time.monotonic()
    stop_at = began + config.duration_s
    numbers = itertools.count()

    async def client(stub: pb_grpc.GenerationStub) -> None:
        while time.monotonic() < stop_at:
            number = next(numbers)
            index = number % len(prompts)
            try:
                tokens, fallback = await _generate(
                    stub, prompts[index], config.max_tokens, config.request_timeout_s
                )
            except grpc.aio.AioRpcError as error:
                report.failures.append(f"request {number}: {error.code().name} {error.details()}")
                continue
            report.requests += 1
            report.tokens += len(tokens)
            report.fallbacks += fallback
            if tokens != reference[index]:
                report.mismatches.append(
                    f"request {number} (prompt {index}): {tokens} != {reference[index]}"
                )

    chaos = asyncio.create_task(_chaos(router, config, stop_at, report))
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.GenerationStub(channel)
            await asyncio.gather(*(client(stub) for _ in range(config.concurrency)))
    finally:
        chaos.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await chaos
    report.seconds = time.monotonic() - began
    after = await _settled(router, wanted_drafts, before.recovery.draft_failures + report.kills)
    report.pool_restored = sum(not d.draining for d in after.drafts) == wanted_drafts
    restarts = after.recovery.draft_restarts - before.recovery.draft_restarts
    report.draft_restarts = restarts
    report.draft_restart_s = list(after.recovery.draft_restart_s[-restarts:]) if restarts else []
    return report


async def _chaos(router: Any, config: SoakConfig, stop_at: float, report: SoakReport) -> None:
    """SIGKILL a random live draft replica's process every ``kill_every_s`` (jittered)."""
    rng = random.Random(config.seed)
    killed: set[int] = set()
    while True:
        await asyncio.sleep(config.kill_every_s * rng.uniform(0.5, 1.5))
        if time.monotonic() >= stop_at:
            return
        state: RouterState = await router.state.remote()
        # A replica killed a moment ago can still be listed before the router
        # notices: killing it again would count a second kill of one failure.
        # One in the router's process has no process of its own to kill.
        victims = [
            d
            for d in state.drafts
            if d.placement == "actor" and d.tracked >= 0 and not d.draining
            if d.pid not in killed
        ]
        if not victims:  # every replica is down or restarting: wait for one
            continue
        victim = rng.choice(victims).pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
            killed.add(victim)
            report.kills += 1


async def _settled(router: Any, drafts: int, failures: int, bound_s: float = 300.0) -> RouterState:
    """The router's state once ``failures`` replicas are known lost and the
    pool is back to ``drafts`` live replicas (or the bound ran out)."""
    deadline = time.monotonic() + bound_s
    while True:
        state: RouterState = await router.state.remote()
        live = sum(not d.draining and d.tracked >= 0 for d in state.drafts)
        if (live == drafts and state.recovery.draft_failures >= failures) or (
            time.monotonic() > deadline
        ):
            return state
        await asyncio.sleep(0.1)


# -- the command -------------------------------------------------------------------


def _serve_config(args: argparse.Namespace) -> Any:
    from specray.deploy.config import ServeConfig

    router: dict[str, Any] = {
        "target": args.target,
        "tp": args.tp,
        "dtype": args.dtype,
        "num_drafts": args.drafts,
        "num_slots": args.num_slots,
        "max_len": args.max_len,
        "k": args.k,
        "timeout_s": args.timeout,
    }
    router["drafts"] = [
        {"kind": "ngram"} if args.draft == "ngram" else {"kind": "model", "model": args.draft}
    ]
    # The chaos kills replica processes: each drafter in an actor of its own.
    router["drafts"][0]["placement"] = "actor"
    return ServeConfig.model_validate(
        {
            "backend": "router",
            "router": router,
            "port": 0,
            "http_port": None,
            "limits": {"max_tokens": args.max_tokens, "max_queued_requests": args.concurrency},
        }
    )


def _prompts(count: int, categories: str) -> list[Prompt]:
    from specray.bench.prompts import load_prompts

    chosen = categories.split(",") if categories else None
    texts: list[Prompt] = [p.prompt for p in load_prompts(chosen, split="eval")]
    return texts[:count]


async def _soak_in_process(args: argparse.Namespace) -> SoakReport:
    from specray.deploy.router_backend import RouterBackend
    from specray.deploy.serve import Service

    service = Service(_serve_config(args))
    await service.start()
    try:
        await service.load()
        backend = service.backend
        assert isinstance(backend, RouterBackend)
        config = SoakConfig(
            duration_s=args.minutes * 60,
            concurrency=args.concurrency,
            max_tokens=args.max_tokens,
            kill_every_s=args.kill_every,
            seed=args.seed,
        )
        prompts = _prompts(args.prompts, args.categories)
        return await run_soak(service.grpc.address, backend.router, prompts, config)
    finally:
        await service.shutdown()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--target", default="qwen2.5-coder-0.5b-instruct", help="name or path")
    p.add_argument("--draft", default="ngram", help="ngram, or a draft model's name or path")
    p.add_argument("--drafts", type=int, default=2, help="draft replicas (>= 2 to keep one)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--k", type=int, default=4)
    p.add_argument(
        "--num-slots",
        type=int,
        default=16,
        help="requests one target batches (their prompts prefill in one forward)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="deadline of one shard call; a slower verify counts as a hung group",
    )
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompts", type=int, default=16, help="distinct prompts, cycled")
    p.add_argument("--categories", default="", help="prompt categories (default: all)")
    p.add_argument("--kill-every", type=float, default=10.0, help="mean seconds between kills")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the report as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from specray.deploy.router_backend import start_ray_for, stop_ray

    started = start_ray_for(_serve_config(args))
    try:
        report = asyncio.run(_soak_in_process(args))
    finally:
        if started:
            stop_ray()
    print(report.summary())
    if args.out is not None:
        record = {"machine": machine_info(), "args": vars(args), "report": asdict(report)}
        args.out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
