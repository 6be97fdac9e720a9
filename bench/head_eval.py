"""Acceptance of drafters on held-out prompts: τ and α by γ, greedy and sampled.

For each drafter, γ and sampling setting, every chosen prompt runs through the
engine at once (continuous batching, fixed γ): acceptance does not depend on
the batch, so one batched run per setting gives the same τ and α as runs one
by one, in a fraction of the time. No timing is reported here (see
``spec_bench`` for speed); the numbers are deterministic for a seed.

    python -m specray.bench.head_eval --target qwen2.5-coder-0.5b-instruct \\
        --drafters ngram,head:~/.cache/specray/heads/qwen2.5-coder-0.5b-instruct

τ: tokens committed per round, over rounds after the first (which prefills and
which a head cannot draft in: it has no hidden state yet); α: accepted /
drafted over all rounds. Writes ``head_eval_<target>[_<tag>].{json,md}``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from specray.actors.drafting.base import Drafter, DraftProposal, DraftRequest, DraftUpdate
from specray.actors.drafting.build import build_drafter as build
from specray.actors.drafting.dspark.calibration import Calibration
from specray.actors.drafting.dspark.drafter import DSparkDrafter
from specray.actors.drafting.dspark.held_out import survival_ece
from specray.actors.drafting.spec import DrafterSpec
from specray.actors.engine.engine import EngineConfig, SpecEngine
from specray.actors.engine.request import GenerationRequest
from specray.actors.engine.target import LocalTarget
from specray.actors.engine.tokenizer import eos_token_ids
from specray.actors.model.config import ModelConfig
from specray.actors.model.loader import load_model
from specray.actors.sampling.params import SamplingParams, StoppingCriteria
from specray.bench.common import chat_ids, command_line, resolve_preferring, write_report
from specray.bench.prompts import CATEGORIES, Prompt, load_prompts

ALL = "all"


@dataclass
class RequestTally:
    """One request's rounds under one setting."""

    category: str
    round_tokens: list[int]  # tokens committed per round
    drafted: int = 0
    accepted: int = 0


@dataclass
class ProposalOutcome:
    """One verified proposal of a drafter that reports confidences."""

    confidence: list[float]  # [n]: the drafter's c_k as it reported them
    verified: int
    accepted: int


class RoundRecorder:
    """A drafter that records, per verified proposal, the confidences it
    reported and how many drafts the target accepted (the labels a
    confidence head is calibrated against, from real rounds)."""

    def __init__(self, drafter: Drafter) -> None:
        self.drafter = drafter
        self.outcomes: list[ProposalOutcome] = []
        self._pending: dict[str, DraftProposal] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.drafter, name)

    def start(self, request_id: str, prompt_ids: Sequence[int], sampling: SamplingParams) -> None:
        self.drafter.start(request_id, prompt_ids, sampling)

    def propose(self, requests: Sequence[DraftRequest]) -> list[DraftProposal]:
        proposals = self.drafter.propose(requests)
        for request, proposal in zip(requests, proposals, strict=True):
            self._pending[request.request_id] = proposal
        return proposals

    def accept(self, update: DraftUpdate) -> None:
        proposal = self._pending.pop(update.request_id, None)
        if proposal is not None and len(proposal) and proposal.confidence is not None:
            self.outcomes.append(
                ProposalOutcome(list(proposal.confidence), len(proposal), update.num_accepted)
            )
        self.drafter.accept(update)

    def finish(self, request_id: str) -> None:
        self._pending.pop(request_id, None)
        self.drafter.finish(request_id)


def calibration_rows(
    outcomes: Sequence[ProposalOutcome], calibration: Calibration
) -> list[dict[str, float]]:
    """Per position k: proposals reaching k, the observed rate of "drafts
    1..k all accepted", and the ECE of the survival product a_k with the
    raw head (every temperature 1) and with ``calibration``."""
    block = len(calibration.temperatures)
    n = len(outcomes)
    logits = torch.zeros(n, block)
    survived = torch.zeros(n, block, dtype=torch.float64)
    reached = torch.zeros(n, block, dtype=torch.bool)
    temps = torch.tensor(calibration.temperatures)
    for row, outcome in enumerate(outcomes):
        width = min(outcome.verified, len(outcome.confidence), block)
        reported = torch.tensor(outcome.confidence[:width]).clamp(1e-6, 1 - 1e-6)
        logits[row, :width] = torch.logit(reported) * temps[:width]  # undo the temperatures
        survived[row, :width] = (torch.arange(1, width + 1) <= outcome.accepted).double()
        reached[row, :width] = True
    raw = survival_ece(logits, survived, reached, Calibration.identity(block))
    fitted = survival_ece(logits, survived, reached, calibration)
    return [
        {
            "position": k + 1,
            "proposals": int(reached[:, k].sum()),
            "survived": float(survived[reached[:, k], k].mean()) if reached[:, k].any() else 0.0,
            "ece_raw": raw[k],
            "ece_calibrated": fitted[k],
        }
        for k in range(block)
    ]


def run_setting(
    target: LocalTarget,
    drafter: Drafter,
    prompts: Sequence[Prompt],
    prompt_ids: dict[str, list[int]],
    eos: tuple[int, ...],
    gamma: int,
    sampling: SamplingParams,
    max_tokens: int,
) -> list[RequestTally]:
    """Every prompt through the engine at once, fixed γ."""
    engine = SpecEngine(
        target, drafter, None, eos, EngineConfig(len(prompts), gamma, adaptive=False)
    )
    tallies = {p.id: RequestTally(p.category, []) for p in prompts}
    requests = [
        GenerationRequest(p.id, prompt_ids[p.id], sampling, StoppingCriteria(max_tokens=max_tokens))
        for p in prompts
    ]
    for chunk in engine.generate(requests):
        tally = tallies[chunk.request_id]
        tally.round_tokens.append(len(chunk.token_ids))
        tally.drafted, tally.accepted = chunk.stats.draft_tokens, chunk.stats.accepted_tokens
    return list(tallies.values())


def summarize(tallies: Sequence[RequestTally]) -> dict[str, float]:
    later = [n for t in tallies for n in t.round_tokens[1:]]
    drafted = sum(t.drafted for t in tallies)
    return {
        "tau": sum(later) / len(later) if later else float("nan"),
        "alpha": sum(t.accepted for t in tallies) / drafted if drafted else 0.0,
        "rounds": len(later),
        "tokens": sum(sum(t.round_tokens) for t in tallies),
    }


def build_drafter(name: str, target_dir: Path, dtype: str, slots: int, max_len: int) -> Drafter:
    """``name`` as ``--draft`` names it, preferring the store's copy in ``dtype``."""
    spec = DrafterSpec.parse(name)
    if spec is None:
        raise ValueError("head_eval compares drafters: `none` is not one")
    if spec.kind in ("model", "hybrid"):
        assert spec.model is not None
        spec = spec.with_model(resolve_preferring(spec.model, dtype))
    return build(spec, dtype, slots, max_len, target_dir)


def confidence_calibration(drafter: Drafter) -> Calibration | None:
    """The calibration of a drafter whose confidences come from a trained
    confidence head (DSpark); None for every other drafter."""
    if isinstance(drafter, DSparkDrafter) and drafter.model.confidence_head is not None:
        return drafter.calibration
    return None


def calibration_markdown(entries: Sequence[dict[str, Any]]) -> list[str]:
    if not entries:
        return []
    lines = [
        "",
        "### Confidence head on real rounds: ECE of the survival product a_k",
        "",
        "a_k = c_1 ... c_k against whether drafts 1..k were all accepted, over the "
        "verified proposals that reached position k; raw: every temperature 1; "
        "calibrated: the checkpoint's STS temperatures.",
        "",
        "| drafter | sampling | γ | k | proposals | survived | ECE raw | ECE calibrated | T_k |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in entries:
        for row, temp in zip(entry["positions"], entry["temperatures"], strict=True):
            lines.append(
                f"| {entry['drafter']} | {entry['sampling']} | {entry['gamma']} | "
                f"{row['position']} | {row['proposals']} | {row['survived']:.2f} | "
                f"{row['ece_raw']:.3f} | {row['ece_calibrated']:.3f} | {temp:.2f} |"
            )
    return lines


def markdown(result: dict[str, Any]) -> str:
    gammas = result["gammas"]
    lines = [
        f"### τ / α on held-out prompts: {result['target']} ({result['dtype']}, "
        f"max {result['max_tokens']} tokens, {len(result['prompts'])} prompts)",
        "",
        "τ: tokens per round after the first; α: accepted / drafted. "
        f"Sampled: temperature {result['temperature']}, seed {result['seed']}.",
        "",
        "| drafter | sampling | category | "
        + " | ".join(f"τ γ={g} | α γ={g}" for g in gammas)
        + " |",
        "|---" * (3 + 2 * len(gammas)) + "|",
    ]
    for row in result["rows"]:
        cells = []
        for g in gammas:
            stats = row["by_gamma"][str(g)]
            cells += [f"{stats['tau']:.2f}", f"{stats['alpha']:.2f}"]
        lines.append(
            f"| {row['drafter']} | {row['sampling']} | {row['category']} | "
            + " | ".join(cells)
            + " |"
        )
    lines += calibration_markdown(result.get("calibration", []))
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    categories = args.categories.split(",") if args.categories else list(CATEGORIES)
    prompts = [p for c in categories for p in load_prompts([c], args.split)[: args.per_category]]
    target_dir = resolve_preferring(args.target, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    eos = eos_token_ids(ModelConfig.from_pretrained(target_dir), tokenizer)
    prompt_ids = {p.id: chat_ids(tokenizer, p.prompt) for p in prompts}
    gammas = [int(g) for g in args.gammas.split(",")]
    max_len = max(map(len, prompt_ids.values())) + args.max_tokens + 2 * max(gammas) + 8
    target = LocalTarget(load_model(target_dir, args.dtype), len(prompts), max_len)
    settings = {
        "greedy": SamplingParams(),
        f"T={args.temperature}": SamplingParams(temperature=args.temperature, seed=args.seed),
    }
    rows = []
    began = time.perf_counter()
    calibrations = []
    for name in [d.strip() for d in args.drafters.split(",") if d.strip()]:
        drafter = build_drafter(name, target_dir, args.dtype, len(prompts), max_len)
        for label, sampling in settings.items():
            by_gamma: dict[int, list[RequestTally]] = {}
            for gamma in gammas:
                recorder = RoundRecorder(drafter)
                by_gamma[gamma] = run_setting(
                    target, recorder, prompts, prompt_ids, eos, gamma, sampling, args.max_tokens
                )
                print(f"{name} {label} γ={gamma}: {summarize(by_gamma[gamma])}", flush=True)
                calibration = confidence_calibration(drafter)
                if calibration is not None and recorder.outcomes:
                    calibrations.append(
                        {
                            "drafter": name,
                            "sampling": label,
                            "gamma": gamma,
                            "temperatures": list(calibration.temperatures),
                            "positions": calibration_rows(recorder.outcomes, calibration),
                        }
                    )
            for category in [*categories, ALL]:
                chosen = {
                    str(g): summarize([t for t in ts if category in (ALL, t.category)])
                    for g, ts in by_gamma.items()
                }
                rows.append(
                    {"drafter": name, "sampling": label, "category": category, "by_gamma": chosen}
                )
    result = {
        "command": command_line("specray.bench.head_eval", argv),
        "target": args.target,
        "dtype": args.dtype,
        "max_tokens": args.max_tokens,
        "gammas": gammas,
        "temperature": args.temperature,
        "seed": args.seed,
        "split": args.split,
        "prompts": [p.id for p in prompts],
        "elapsed_s": time.perf_counter() - began,
        "rows": rows,
        "calibration": calibrations,
    }
    stem = f"head_eval_{Path(args.target).name}" + (f"_{args.tag}" if args.tag else "")
    write_report(args.out, stem, result, markdown(result))
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--target", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--drafters", default="ngram", help="comma list: ngram | head:DIR | NAME")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--gammas", default="3,5,8")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--per-category", type=int, default=4)
    p.add_argument("--categories", default=None, help=f"comma list from {', '.join(CATEGORIES)}")
    p.add_argument("--split", default="eval", choices=["train", "eval"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--tag", default=None)
    return p


if __name__ == "__main__":
    main()
