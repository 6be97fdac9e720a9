"""Greedy speculation under a random verify budget: token-identical to
target-only decoding whatever shapes the target verifies.

The adaptive budget chooses how many drafted tokens a round verifies from
measured timings, so the verify shapes a target sees change from run to
run, and a shape that rounds one row differently from a one-token decode
would flip a near-tie in some runs and not in others. Here a seeded
:class:`RandomBudget` replaces the budget: every round keeps a uniformly
random number of each request's drafted tokens (a tree its first nodes, as
the budget cuts it), so one run verifies chains and trees of every size,
prompts prefilled with drafts riding along, and accepted side branches moved
into place, on the real model with its prefix cache. The shipped agentic
sessions run turn by turn through a target-only engine and a suffix-drafting
engine on one loaded model; every turn's output must be the same.

    python -m specray.bench.budget_fuzz --target qwen2.5-coder-1.5b-instruct \\
        --weights gguf --resend --tag _avx512bf16

Writes ``budget_fuzz_<target>_<weights>[<tag>].{json,md}`` under ``--out``.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from specray.actors.drafting.base import DraftProposal
from specray.actors.drafting.suffix.drafter import SuffixConfig, SuffixDrafter
from specray.actors.engine.costs import RoundCostModel
from specray.actors.engine.engine import SpecEngine
from specray.actors.engine.request import GenerationRequest, RunningRequest
from specray.actors.engine.verify_budget import VerifyBudget
from specray.actors.sampling.params import StoppingCriteria
from specray.bench.common import bench_parser, run_record, table, write_report
from specray.bench.prompts import Prompt
from specray.bench.session_turns import (
    LoadedTarget,
    add_session_flags,
    replay,
    report_top,
    run_turn,
)


class RandomBudget(VerifyBudget):
    """The verify budget with its cut made at random: each draft keeps a
    uniformly random number of its tokens, seeded. It remembers how many it
    kept per request per round (empty drafts left out)."""

    def __init__(self, costs: RoundCostModel, block: int, seed: int) -> None:
        super().__init__(costs, block)
        self._rng = random.Random(seed)
        self.kept: list[int] = []

    def trim(
        self, batch: Sequence[RunningRequest], drafts: Sequence[DraftProposal]
    ) -> list[DraftProposal]:
        kept = [draft.clipped(self._rng.randint(0, len(draft))) for draft in drafts]
        self.kept += [len(draft) for draft in kept if len(draft)]
        return kept


def fuzzed(engine: SpecEngine, seed: int) -> RandomBudget:
    """``engine`` with its verify budget replaced by a :class:`RandomBudget`
    (which the scheduler asks only when adaptive)."""
    scheduler = engine.scheduler
    scheduler.budget = budget = RandomBudget(scheduler.costs, scheduler.block, seed)
    scheduler.adaptive = True
    return budget


def first_difference(reference: Sequence[int], got: Sequence[int]) -> int | None:
    """The first position where the two differ (the shorter's length when one
    is a prefix of the other); None when equal."""
    if list(reference) == list(got):
        return None
    pairs = zip(reference, got, strict=False)
    return next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(reference), len(got)))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = LoadedTarget.load(args)
    reference = loaded.engine(None, 0, args.max_len, args.prefix_tokens)
    drafter = SuffixDrafter(SuffixConfig(tree=True))
    spec = loaded.engine(drafter, args.k, args.max_len, args.prefix_tokens)
    budget = fuzzed(spec, args.seed)
    stopping = StoppingCriteria(max_tokens=args.max_tokens)
    rows = []

    def run(prompt: Prompt, prompt_ids: list[int]) -> list[int]:
        expected = run_turn(
            reference, GenerationRequest(f"r-{prompt.id}", prompt_ids, stopping=stopping)
        )
        rounds_before = len(budget.kept)
        got = run_turn(spec, GenerationRequest(f"s-{prompt.id}", prompt_ids, stopping=stopping))
        rows.append(
            {
                "id": prompt.id,
                "turn": prompt.turn,
                "prompt_tokens": len(prompt_ids),
                "output_tokens": len(expected.token_ids),
                "seconds": got.seconds,
                "rounds": got.stats.rounds,
                "draft_tokens": got.stats.draft_tokens,
                "accepted_tokens": got.stats.accepted_tokens,
                "largest_verify": max(budget.kept[rounds_before:], default=0),
                "first_difference": first_difference(expected.token_ids, got.token_ids),
            }
        )
        print(rows[-1], flush=True)
        return expected.token_ids

    replay(loaded.tokenizer, args, run)
    flags = ("target", "weights", "dtype", "threads", "split", "max_tokens", "k", "seed", "resend")
    result = run_record(
        "specray.bench.budget_fuzz", argv, args, flags, prefix_tokens=args.prefix_tokens, rows=rows
    )
    result["summary"] = {
        "identical": sum(r["first_difference"] is None for r in rows),
        "turns": len(rows),
        "verified_sizes": sorted(set(budget.kept)),
    }
    stem = f"budget_fuzz_{Path(args.target).name}_{args.weights}{args.tag}"
    write_report(args.out, stem, result, markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    subject = "Suffix drafting under a random verify budget"
    lines = report_top(subject, result, f"seed {result['seed']}")
    headers = [
        "prompt",
        "turn",
        "prompt tokens",
        "output tokens",
        "rounds",
        "drafts verified",
        "accepted",
        "largest verify",
        "identical",
    ]
    cells = [
        [
            r["id"],
            r["turn"],
            r["prompt_tokens"],
            r["output_tokens"],
            r["rounds"],
            r["draft_tokens"],
            r["accepted_tokens"],
            r["largest_verify"],
            "yes" if r["first_difference"] is None else f"no, at {r['first_difference']}",
        ]
        for r in result["rows"]
    ]
    summary = result["summary"]
    sizes = summary["verified_sizes"]
    lines += table(headers, cells, 2)
    lines += [
        "",
        f"- Greedy outputs identical to target-only in {summary['identical']} of "
        f"{summary['turns']} turns.",
        f"- Draft tokens kept per request per round: {len(sizes)} distinct sizes, "
        f"{min(sizes, default=0)} to {max(sizes, default=0)}.",
        "",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser(__doc__, target="qwen2.5-coder-0.5b-instruct", dtype="bfloat16")
    add_session_flags(p, max_tokens=256)
    p.add_argument("--seed", type=int, default=0, help="the random budget's seed")
    p.add_argument(
        "--prefix-tokens", type=int, default=8192, help="each engine's prefix cache (0: none)"
    )
    return p


if __name__ == "__main__":
    main()
