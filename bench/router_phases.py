"""Where a served router's rounds spend their time, speculation on and off.

Starts the router a ``specray serve`` config describes (on an embedded Ray,
no front door: the rounds are the router's), sends the shipped prompts
closed loop at each concurrency, alternating arms (speculation on, then off
with ``num_speculative_tokens = 0``) after one unmeasured target-only pass
that fills the prefix cache, and reads :meth:`Router.timings` after each
arm: per round, the wait for the draft replicas against the lookup or
model compute inside them, the wait for the target against its forward,
and the router's own work. The waits less the compute are what crossing
Ray costs a round.

    python -m specray.bench.router_phases --config SERVE.yaml --concurrency 1,4,16
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import ray

from specray.actors.engine.request import GenerationRequest, RequestOutput
from specray.actors.sampling.params import StoppingCriteria
from specray.bench import round_sizes
from specray.bench.common import (
    cell,
    config_stem,
    int_list,
    report_head,
    run_record,
    table,
    write_report,
)
from specray.bench.serve_dataset import shipped_prompts, warmup_prompts
from specray.cluster.router import RouterTimings, open_stream
from specray.deploy.config import load_config
from specray.deploy.router_backend import launch, start_ray_for

ARMS = ("spec", "none")


@dataclass
class ArmResult:
    """One arm at one concurrency: every request served to completion."""

    arm: str
    concurrency: int
    pair: int
    requests: int
    tokens: int
    wall_s: float
    rounds: int
    request_rounds: int
    round_ms: float  # the rest: per round
    propose_wait_ms: float
    draft_compute_ms: float
    verify_wait_ms: float
    target_compute_ms: float
    local_ms: float
    draft_tokens: int
    accepted_tokens: int
    verified_per_round: float  # tokens the target computed, per round
    priced_verify_ms: float  # what the verify cost model priced them at, per round
    # by tokens verified in a round: its rounds, mean price and mean wait in ms
    verify_by_size: dict[str, dict[str, float]]
    # the router's verify cost model when the arm began (level, shape, fixed part)
    verify_costs: dict[str, Any] | None = None
    # the budget's shared copy estimates when the arm began (VerifyBudget.describe)
    copy_estimates: dict[str, Any] | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s


def _requests(prompts: Sequence[Any], tag: str, arm: str, max_tokens: int) -> list[Any]:
    stopping = StoppingCriteria(max_tokens=max_tokens)
    out = []
    for i, prompt in enumerate(prompts):
        request = GenerationRequest(f"{tag}-{i}", list(prompt.prompt), stopping=stopping)
        out.append(request if arm == "spec" else replace(request, num_speculative_tokens=0))
    return out


async def _serve(router: Any, requests: list[Any], concurrency: int) -> list[RequestOutput]:
    """Closed loop: ``concurrency`` requests in flight; each request's last chunk."""
    gate = asyncio.Semaphore(concurrency)
    finished: list[RequestOutput] = []

    async def one(request: Any) -> None:
        async with gate:
            async for ref in open_stream(router, request):
                chunk: RequestOutput = await ref
                if chunk.finished:
                    finished.append(chunk)

    await asyncio.gather(*(one(r) for r in requests))
    return finished


def run_arm(
    router: Any, prompts: Sequence[Any], arm: str, concurrency: int, pair: int, max_tokens: int
) -> ArmResult:
    requests = _requests(prompts, f"{arm}-c{concurrency}-{pair}", arm, max_tokens)
    ray.get(router.timings.remote(True))
    state = ray.get(router.state.remote())
    began = time.perf_counter()
    finished = asyncio.run(_serve(router, requests, concurrency))
    wall = time.perf_counter() - began
    timings: RouterTimings = ray.get(router.timings.remote())
    phases = timings.router
    per_round = 1e3 / max(phases.rounds, 1)
    return ArmResult(
        arm=arm,
        concurrency=concurrency,
        pair=pair,
        requests=len(finished),
        tokens=sum(c.stats.num_output_tokens for c in finished),
        wall_s=wall,
        rounds=phases.rounds,
        request_rounds=phases.request_rounds,
        round_ms=phases.round_s * per_round,
        propose_wait_ms=phases.propose_s * per_round,
        draft_compute_ms=timings.draft_compute_s * per_round,
        verify_wait_ms=phases.verify_s * per_round,
        target_compute_ms=timings.target_compute_s * per_round,
        local_ms=phases.local_s * per_round,
        draft_tokens=sum(c.stats.draft_tokens for c in finished),
        accepted_tokens=sum(c.stats.accepted_tokens for c in finished),
        verified_per_round=phases.verified_tokens / max(phases.rounds, 1),
        priced_verify_ms=phases.priced_verify_s * per_round,
        verify_by_size=round_sizes.sizes_ms(
            {str(tokens): asdict(size) for tokens, size in phases.by_verified.items()}
        ),
        verify_costs=state.verify_costs,
        copy_estimates=state.copy_estimates,
    )


def markdown(result: dict[str, Any]) -> str:
    lines = report_head(f"Router phases: {result['config']}", result["machine"])
    lines += [f"`{result['command']}`", ""]
    lines += [
        "Per round, in ms: the router's whole round; its wait for the draft replicas and "
        "the compute inside them; the tokens the target computed (verified) and what the "
        "verify cost model priced them at before it learned from the round (priced); its "
        "wait for the target and the target's forward; "
        "its own work (γ, the budget's cut, accept, commit, stream). spec ÷ none: the "
        "arm's tokens/s over the target-only arm's of the same pair.",
        "",
    ]
    rows = []
    arms = result["rows"]
    for run in arms:
        base = next(
            (
                r
                for r in arms
                if r["arm"] == "none"
                and r["concurrency"] == run["concurrency"]
                and r["pair"] == run["pair"]
            ),
            None,
        )
        ratio = (
            run["tokens_per_s"] / base["tokens_per_s"] if base and run["arm"] == "spec" else None
        )
        drafted = run["draft_tokens"]
        rows.append(
            [
                run["concurrency"],
                run["pair"],
                run["arm"],
                cell(run["tokens_per_s"]),
                cell(ratio),
                run["rounds"],
                cell(run["round_ms"], 1),
                cell(run["propose_wait_ms"], 1),
                cell(run["draft_compute_ms"], 1),
                cell(run.get("verified_per_round"), 1),
                cell(run.get("priced_verify_ms"), 1),
                cell(run["verify_wait_ms"], 1),
                cell(run["target_compute_ms"], 1),
                cell(run["local_ms"], 1),
                drafted,
                cell(run["accepted_tokens"] / drafted if drafted else None),
            ]
        )
    headers = [
        "c",
        "pair",
        "arm",
        "tok/s",
        "spec ÷ none",
        "rounds",
        "round",
        "draft wait",
        "draft compute",
        "verified",
        "priced",
        "verify wait",
        "target compute",
        "router",
        "drafted",
        "acceptance",
    ]
    return "\n".join([*lines, *table(headers, rows, left=3), *by_size(arms), ""])


def _plain_sizes(arms: Sequence[dict[str, Any]], run: dict[str, Any]) -> round_sizes.Sizes:
    """The target-only arm's rounds by size at ``run``'s level and pair."""
    for other in arms:
        key = (other["arm"], other["concurrency"], other["pair"])
        if key == ("none", run["concurrency"], run["pair"]) and other.get("verify_by_size"):
            found: round_sizes.Sizes = other["verify_by_size"]
            return found
    return {}


def by_size(arms: Sequence[dict[str, Any]]) -> list[str]:
    """The speculative arms' rounds by verified size beside the same level's
    target-only round (:mod:`specray.bench.round_sizes`)."""
    rows = []
    for run in arms:
        plain = round_sizes.plain_round(_plain_sizes(arms, run)) if run["arm"] == "spec" else None
        if plain is None:
            continue
        for row in round_sizes.size_rows(run["verify_by_size"], plain):
            rows.append([run["concurrency"], run["pair"], *row])
    if not rows:
        return []
    return ["", round_sizes.TEXT, "", *table(["c", "pair", *round_sizes.HEADERS], rows, left=2)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", type=Path, required=True, help="a specray serve YAML (router)")
    p.add_argument("--concurrency", type=int_list, default=[1, 4, 16])
    p.add_argument("--prompts", type=int, default=None, help="per level; default max(c, 4)")
    p.add_argument("--categories", default="code_edit,agentic")
    p.add_argument("--split", default="eval")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--pairs", type=int, default=1, help="spec / none pairs per level")
    p.add_argument(
        "--warmup",
        type=int,
        default=0,
        help="random prompts sent first, speculation on and off, unmeasured "
        "(as specray bench serve --warmup)",
    )
    p.add_argument(
        "--prime-tokens",
        type=int,
        default=None,
        help="tokens per request of the unmeasured target-only pass (default --max-tokens; "
        "1 fills the prefix cache alone, as specray bench serve --prime-cache does)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    config = load_config(args.config)
    started_ray = start_ray_for(config)
    attachment = launch(config.router, config.home)
    router = attachment.router
    arms: list[ArmResult] = []
    try:
        if args.warmup:
            # What specray bench serve --warmup sends first: random prompts,
            # each with speculation on and off, nothing of them measured.
            if attachment.tokenizer is None:
                raise SystemExit("--warmup needs the target's tokenizer; its directory has none")
            fresh = warmup_prompts(args.warmup, attachment.tokenizer.vocab_size, args.seed)
            for arm in ARMS:
                run_arm(router, fresh, arm, 1, -2, args.max_tokens)
        for concurrency in args.concurrency:
            prompts = shipped_prompts(
                args.prompts or max(concurrency, 4),
                args.categories.split(","),
                args.split,
                args.seed,
                attachment.tokenizer,
            )
            # fills the prefix cache (and, with as many tokens as the arms, shows
            # the cost model rounds of this level before either arm)
            run_arm(router, prompts, "none", concurrency, -1, args.prime_tokens or args.max_tokens)
            for pair in range(args.pairs):
                for arm in ARMS:
                    arms.append(run_arm(router, prompts, arm, concurrency, pair, args.max_tokens))
                    print(arms[-1], flush=True)
        ray.get(router.shutdown.remote())
    finally:
        if started_ray:
            ray.shutdown()
    flags = ["concurrency", "prompts", "categories", "split", "max_tokens", "pairs", "seed"]
    flags += ["prime_tokens", "warmup"]
    result = run_record(
        "specray.bench.router_phases",
        argv,
        args,
        flags,
        config=str(args.config),
        rows=[{**vars(a), "tokens_per_s": a.tokens_per_s} for a in arms],
    )
    write_report(
        args.out,
        f"router_phases_{config_stem(args.config)}{args.tag}",
        result,
        markdown(result),
    )
    return result


if __name__ == "__main__":
    main()
