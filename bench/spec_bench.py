"""Speculative-decoding benchmark of the single-process engine, against itself and HF.

For every prompt, in one run and interleaved so machine noise hits all alike:
target-only decoding through the engine (``--draft none``: the same code path),
then each drafter with a fixed γ (and, unless ``--no-adaptive``, with adaptive
γ), then HF ``generate()``: plain greedy, ``prompt_lookup_num_tokens`` for the
n-gram drafter and ``assistant_model`` for a draft model. Batch size 1, greedy.

Per category and drafter it reports tokens/s, α (accepted / drafted), τ
(tokens per round incl. the bonus), c (draft cost per token / target step),
v = cost(γ+1)/cost(1), the analytic limit S and the achieved fraction, HF's
tokens/s for the same drafter, and whether the greedy outputs match.

    python -m specray.bench.spec_bench --target qwen2.5-coder-1.5b-instruct \\
        --drafters none,ngram,qwen2.5-coder-0.5b-instruct --dtype bfloat16 --max-tokens 128 --k 8

A drafter may carry its own γ as ``NAME:K`` (``--drafters ngram:8,qwen...:4``); a
trained draft head is ``head:DIR`` (``head:DIR:5`` with its own γ).
Writes ``spec_<target>_<dtype>[_<tag>].{json,md,png}`` under ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from specray.actors.drafting.base import Drafter
from specray.actors.drafting.draft_model import DraftModelDrafter
from specray.actors.drafting.head.checkpoint import load_head
from specray.actors.drafting.head.cost import head_step_seconds
from specray.actors.drafting.head.drafter import HeadDrafter
from specray.actors.drafting.head.model import DraftHead
from specray.actors.drafting.ngram import NgramDrafter
from specray.actors.drafting.spec import DrafterSpec
from specray.actors.drafting.suffix import SuffixConfig, SuffixDrafter
from specray.actors.engine.profile import profile_costs
from specray.actors.engine.target import LocalTarget
from specray.actors.engine.tokenizer import eos_token_ids
from specray.actors.model.config import ModelConfig
from specray.actors.model.decoder import DecoderModel
from specray.actors.model.loader import load_model, parse_dtype
from specray.bench.common import (
    TARGET_ONLY,
    chat_ids,
    machine_info,
    parse_drafters,
    resolve_preferring,
)
from specray.bench.costs import CostModel, calibrate, step_seconds
from specray.bench.prompts import ALL_CATEGORIES, CATEGORIES, Prompt, load_prompts
from specray.bench.spec_analysis import compare_outputs, evaluate_goals, match_rates, summarize
from specray.bench.spec_report import write_outputs
from specray.bench.spec_runners import (
    ForwardCounter,
    HFRunner,
    OursRunner,
    Runner,
    run_interleaved,
    warm_up,
)

# ---------------------------------------------------------------- loading


@dataclass
class Loaded:
    target: DecoderModel
    hf_target: Any
    drafts: dict[str, DecoderModel]  # draft-model name → our model
    hf_drafts: dict[str, Any]
    heads: dict[str, DraftHead] = field(default_factory=dict)  # head:DIR → trained head


def load_all(
    target_dir: Path,
    draft_dirs: dict[str, Path],
    dtype: str,
    with_hf: bool,
    weights: str = "dense",
    draft_weights: str = "dense",
) -> Loaded:
    """HF first: casting an fp32 checkpoint on load peaks at about three times
    the bf16 size (10.6 GB for the 1.5B), best paid before anything else is
    resident. ``weights``: the target's; ``draft_weights``: the draft
    models' (as a served draft entry's ``weights``)."""
    torch_dtype = parse_dtype(dtype)
    hf_target = None
    hf_drafts: dict[str, Any] = {}
    if with_hf:
        hf_target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch_dtype).eval()
        gc.collect()
        for name, d in draft_dirs.items():
            hf_drafts[name] = AutoModelForCausalLM.from_pretrained(d, dtype=torch_dtype).eval()
            gc.collect()
    drafts = {name: load_model(d, dtype, weights=draft_weights) for name, d in draft_dirs.items()}
    for model in [*drafts.values(), *hf_drafts.values(), hf_target]:
        if model is not None:
            model.specray_counter = ForwardCounter(model)
    return Loaded(load_model(target_dir, dtype, weights=weights), hf_target, drafts, hf_drafts)


def build_runners(
    loaded: Loaded,
    drafters: Sequence[tuple[str, int]],
    tokenizer: PreTrainedTokenizerBase,
    eos: tuple[int, ...],
    max_len: int,
    adaptive: bool,
) -> list[Runner]:
    """In the order each prompt runs them: target-only, fixed γ, adaptive γ
    (profiled as the engine factory profiles), HF."""
    target = LocalTarget(loaded.target, 1, max_len)

    def drafter_for(name: str) -> Drafter:
        model = loaded.drafts.get(name)
        head = loaded.heads.get(name)
        if head is not None:
            drafter: Drafter = HeadDrafter(head, 1, max_len)
        elif name == "suffix":  # one cache per runner: later prompts draft from earlier outputs
            drafter = SuffixDrafter(SuffixConfig(tree=True))
        elif model is None:
            drafter = NgramDrafter()
        else:
            drafter = DraftModelDrafter(model, 1, max_len)
        return drafter

    speculative = [(n, k) for n, k in drafters if n != TARGET_ONLY]
    names = [n for n, _ in speculative]
    # A drafter listed with several k (ngram:4,ngram:16) is labelled by each.
    base_label = {(n, k): f"{n}:{k}" if names.count(n) > 1 else n for n, k in speculative}

    def speculative_runner(name: str, k: int, adaptive: bool) -> OursRunner:
        drafter = drafter_for(name)
        costs = profile_costs(target, drafter, 1, k, max_len) if adaptive else None
        model = loaded.drafts.get(name)
        label = base_label[name, k] + ("+adaptive" if adaptive else "")
        counter = None if model is None else cast(ForwardCounter, model.specray_counter)
        return OursRunner(label, target, drafter, tokenizer, eos, k, adaptive, costs, counter)

    runners: list[Runner] = [OursRunner(TARGET_ONLY, target, None, tokenizer, eos, 0, False)]
    runners += [speculative_runner(name, k, False) for name, k in speculative]
    if adaptive:  # once per drafter, its largest k the ceiling
        ceilings = {n: max(k for m, k in speculative if m == n) for n in names}
        runners += [speculative_runner(name, k, True) for name, k in ceilings.items()]
    if loaded.hf_target is not None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
        runners.append(HFRunner("plain", loaded.hf_target, eos, pad))
        for name, k in speculative:
            if name in loaded.heads or name == "suffix":
                continue  # HF has no counterpart of a hidden-state head or a suffix cache
            assistant = loaded.hf_drafts.get(name)
            runners.append(HFRunner(base_label[name, k], loaded.hf_target, eos, pad, k, assistant))
    return runners


def load_heads(
    drafters: Sequence[tuple[str, int]], target_dir: Path, dtype: str
) -> dict[str, DraftHead]:
    """Every ``head:DIR`` drafter's head, borrowing the target's embedding and LM head."""
    heads = {}
    for name, _ in drafters:
        spec = DrafterSpec.parse(name)
        if spec is not None and spec.kind == "head":
            assert spec.model_path is not None
            heads[name] = load_head(spec.model_path, target_dir, dtype)
    return heads


def measure_costs(
    loaded: Loaded, drafters: Sequence[tuple[str, int]], repeats: int
) -> dict[str, CostModel]:
    """Isolated costs per drafter, for the analytic speedup: c (a draft
    token) and v (a k-token verify), relative to one target step."""
    costs = {
        name: calibrate(
            loaded.target,
            loaded.drafts.get(name),
            k,
            timer=lambda model, n: step_seconds(model, n, repeats),
        )
        for name, k in drafters
        if name != TARGET_ONLY
    }
    one = step_seconds(loaded.target, 1, repeats)
    for name, head in loaded.heads.items():
        costs[name] = replace(costs[name], draft_cost=head_step_seconds(head, repeats) / one)
    return costs


# ---------------------------------------------------------------- main run


def fp32_check(
    target_dir: Path,
    tokenizer: PreTrainedTokenizerBase,
    eos: tuple[int, ...],
    prompts: Sequence[Prompt],
    prompt_ids: dict[str, list[int]],
    max_tokens: int,
    k: int,
) -> dict[str, Any]:
    """Greedy equality where bf16 near-ties cannot flip it: our target-only,
    our n-gram speculation and HF plain greedy, all in fp32."""
    loaded = load_all(target_dir, {}, "float32", with_hf=True)
    max_len = max(len(prompt_ids[p.id]) for p in prompts) + max_tokens + 2 * k + 8
    target = LocalTarget(loaded.target, 1, max_len)
    runners: list[Runner] = [
        OursRunner(TARGET_ONLY, target, None, tokenizer, eos, 0, False),
        OursRunner("ngram", target, NgramDrafter(), tokenizer, eos, k, False),
        HFRunner("plain", loaded.hf_target, eos, tokenizer.pad_token_id or eos[0]),
    ]
    records = run_interleaved(runners, prompts, prompt_ids, max_tokens)
    comparisons = compare_outputs(records)
    return {
        "max_tokens": max_tokens,
        "prompts": [p.id for p in prompts],
        "comparisons": comparisons,
        "match_vs_target_only": match_rates(comparisons, "vs_target_only"),
        "match_vs_hf_plain": match_rates(comparisons, "vs_hf_plain"),
    }


def pick_prompts(args: argparse.Namespace) -> list[Prompt]:
    categories = args.categories.split(",") if args.categories else list(CATEGORIES)
    split = None if args.split == "all" else args.split
    if args.prompt_ids:  # e.g. the prompts a `specray bench serve` run recorded
        wanted = args.prompt_ids.split(",")
        by_id = {p.id: p for p in load_prompts(ALL_CATEGORIES, None)}
        unknown = [i for i in wanted if i not in by_id]
        if unknown:
            raise SystemExit(f"--prompt-ids: unknown {unknown}")
        return [by_id[i] for i in wanted]
    chosen = []
    for category in categories:
        chosen += load_prompts([category], split)[: args.prompts_per_category]
    return chosen


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    drafters = parse_drafters(args.drafters, args.k)
    if not any(name == TARGET_ONLY for name, _ in drafters):
        drafters.insert(0, (TARGET_ONLY, 0))  # the baseline is never optional
    prompts = pick_prompts(args)
    categories = list(dict.fromkeys(p.category for p in prompts))
    info = machine_info()

    target_dir = resolve_preferring(args.target, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    config = ModelConfig.from_pretrained(target_dir)
    eos = eos_token_ids(config, tokenizer)
    draft_dirs = {
        name: resolve_preferring(name, args.dtype)
        for name, _ in drafters
        if _drafter_kind(name) in ("model", "hybrid")
    }
    prompt_ids = {p.id: chat_ids(tokenizer, p.prompt) for p in prompts}
    max_k = max(k for _, k in drafters)
    max_len = max(map(len, prompt_ids.values())) + args.max_tokens + 2 * max_k + 8

    load_start = time.perf_counter()
    loaded = load_all(
        target_dir, draft_dirs, args.dtype, not args.no_hf, args.weights, args.draft_weights
    )
    loaded.heads = load_heads(drafters, target_dir, args.dtype)
    print(f"loaded in {time.perf_counter() - load_start:.1f} s", flush=True)
    costs = measure_costs(loaded, drafters, args.calibration_repeats)
    one = step_seconds(loaded.target, 1, args.calibration_repeats)
    isolated = {
        "target_step_ms": one * 1e3,
        "verify_cost": {
            str(n): step_seconds(loaded.target, n, args.calibration_repeats) / one
            for n in (2, max(max_k, 1) + 1)
        },
        "calibration": {name: asdict(c) for name, c in costs.items()},
    }
    runners = build_runners(loaded, drafters, tokenizer, eos, max_len, not args.no_adaptive)
    warm_up(runners, prompts[0], prompt_ids[prompts[0].id])
    bench_start = time.perf_counter()
    records = run_interleaved(runners, prompts, prompt_ids, args.max_tokens, args.repeats)
    bench_s = time.perf_counter() - bench_start

    rows = summarize(records, categories)
    comparisons = compare_outputs(records)
    result: dict[str, Any] = {
        "command": "python -m specray.bench.spec_bench " + " ".join(argv or _argv()),
        "target": args.target,
        "drafters": drafters,
        "dtype": args.dtype,
        "weights": args.weights,
        "draft_weights": args.draft_weights,
        "max_tokens": args.max_tokens,
        "threads": args.threads,
        "repeats": args.repeats,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "split": args.split,
        "prompts": [p.id for p in prompts],
        "machine": info,
        "loadavg_after": os.getloadavg(),
        "bench_s": bench_s,
        "isolated_costs": isolated,
        "hf_settings": {
            "plain": "generate(do_sample=False)",
            "ngram": "prompt_lookup_num_tokens=k (max_matching_ngram_size default 2)",
            "draft model": "assistant_model, num_assistant_tokens=k, schedule constant, "
            "default assistant_confidence_threshold",
        },
        "rows": rows,
        "match_vs_target_only": match_rates(comparisons, "vs_target_only"),
        "match_vs_hf_plain": match_rates(comparisons, "vs_hf_plain"),
        "comparisons": comparisons,
        "goals": evaluate_goals(rows),
        "survival_calibration": {
            r.label: r.engine.scheduler.budget.calibration.report()
            for r in runners
            if isinstance(r, OursRunner) and r.adaptive
        },
        "records": [asdict(r) for r in records],
    }
    if args.fp32_check > 0 and args.dtype != "float32":
        del runners, loaded
        gc.collect()
        check_prompts = _spread(prompts, args.fp32_check)
        result["fp32_check"] = fp32_check(
            target_dir, tokenizer, eos, check_prompts, prompt_ids, args.fp32_max_tokens, max_k
        )
    write_outputs(result, args.out, args.tag)
    return result


def _drafter_kind(name: str) -> str:
    spec = DrafterSpec.parse(name)
    return "none" if spec is None else spec.kind


def _argv() -> list[str]:
    return sys.argv[1:]


def _spread(prompts: Sequence[Prompt], n: int) -> list[Prompt]:
    """``n`` prompts from different categories where possible."""
    firsts = list({p.category: p for p in reversed(prompts)}.values())[::-1]
    rest = [p for p in prompts if p not in firsts]
    return (firsts + rest)[:n]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--target", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--drafters", default="none,ngram", help="comma list: none|ngram|NAME[:K]")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--k", type=int, default=8, help="γ for drafters without their own :K")
    p.add_argument("--prompts-per-category", type=int, default=2)
    p.add_argument(
        "--categories", default=None, help=f"comma list from {', '.join(ALL_CATEGORIES)}"
    )
    p.add_argument(
        "--weights",
        default="dense",
        choices=["dense", "gguf"],
        help="the target's: the checkpoint in --dtype, or its GGUF's blocks (low-bit kernels)",
    )
    p.add_argument(
        "--draft-weights",
        default="dense",
        choices=["dense", "gguf"],
        help="the draft models' (model and hybrid drafters), as --weights is the target's",
    )
    p.add_argument("--split", default="eval", choices=["train", "eval", "all"])
    p.add_argument(
        "--prompt-ids", default=None, help="comma list of prompt ids (overrides the three above)"
    )
    p.add_argument("--no-adaptive", action="store_true", help="skip the adaptive-γ runs")
    p.add_argument("--no-hf", action="store_true", help="skip HF generate()")
    p.add_argument("--fp32-check", type=int, default=2, help="prompts to re-check in fp32")
    p.add_argument("--fp32-max-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--repeats", type=int, default=1, help="runs per prompt and method; fastest kept"
    )
    p.add_argument("--calibration-repeats", type=int, default=7)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--tag", default=None, help="suffix for the output file names")
    return p


if __name__ == "__main__":
    main()
