"""Tensor-parallel benchmark: TP=1 against TP=N shards in Ray actors.

For each TP degree: decode ms/token as the caller sees it (one ``verify``
per token through Ray), the step time inside the shards, all-reduce time per
step (timed inside each shard by a counting wrapper around its TP group, so
it includes waiting for the slower rank) and its share of the step, a bare
all-reduce probe (communication alone), and per-shard memory. Writes JSON and
a Markdown table to ``bench/results``.

    python -m specray.bench.tp_bench --model qwen2.5-coder-1.5b-instruct --dtype bfloat16
    python -m specray.bench.tp_bench --model /path/to/dir --tp 1 2 --threads 2 1
    python -m specray.bench.tp_bench --device cuda --tp 1 2   # NCCL, a GPU per shard
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from specray.actors.engine.target import VerifyInput
from specray.actors.model.config import ModelConfig
from specray.actors.store.errors import StoreError
from specray.actors.store.resolve import resolve_model
from specray.bench.common import table, write_report
from specray.cluster.local_ray import start_ray
from specray.cluster.target_group import ShardedTarget

DEFAULT_MODELS = ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct")
MB = 1e6


def find_model(name: str | None, dtype: str) -> Path:
    """A directory as given, or a cached registered model (``dtype`` copy
    first, then float32, which loads into any dtype). Never downloads."""
    for candidate in [name] if name else list(DEFAULT_MODELS):
        for stored in dict.fromkeys((dtype, "float32")):
            try:
                return resolve_model(candidate, fetch_missing=False, dtype=stored, progress=False)
            except StoreError:
                continue
    raise SystemExit(f"no cached model among {name or DEFAULT_MODELS}; fetch one first")


class Run:
    """One TP configuration: loaded once, then measured in rounds that are
    interleaved with the other configurations', so background load on a
    shared machine hits all of them alike."""

    def __init__(
        self,
        model_dir: Path,
        tp: int,
        threads: int,
        args: argparse.Namespace,
        prompt: list[int],
    ) -> None:
        self.tp, self.threads = tp, threads
        started = time.perf_counter()
        self.target = ShardedTarget.create(
            model_dir,
            tp=tp,
            dtype=args.dtype,
            num_slots=1,
            max_len=len(prompt) + args.warmup + args.rounds * args.steps + 8,
            threads_per_shard=threads,
            gpus_per_shard=1.0 if args.device == "cuda" else 0.0,
            timeout_s=args.timeout,
            time_collectives=True,
        )
        self.load_s = time.perf_counter() - started
        self.hidden = ModelConfig.from_pretrained(model_dir).hidden_size
        self.step_ms: list[float] = []
        self.tokens: list[int] = []
        (out,) = self.target.verify([VerifyInput("bench", 0, prompt, 1)])
        self.next_token, self.start = int(out.greedy_ids()[-1]), len(prompt)
        self.decode(args.warmup, record=False)
        self.target.stats(reset=True)

    def decode(self, steps: int, record: bool = True) -> None:
        for _ in range(steps):
            began = time.perf_counter()
            inputs = [VerifyInput("bench", self.start, [self.next_token], 1)]
            (out,) = self.target.verify(inputs)
            if record:
                self.step_ms.append((time.perf_counter() - began) * 1e3)
            self.tokens.append(self.next_token)
            self.next_token, self.start = int(out.greedy_ids()[-1]), self.start + 1

    def report(self, probe_iters: int) -> dict[str, Any]:
        stats = self.target.stats()
        memory = self.target.memory()
        probe_ms = [s * 1e3 for s in self.target.probe_all_reduce(self.hidden, probe_iters)]
        shards = []
        for rank, (shard, mem) in enumerate(zip(stats, memory, strict=True)):
            coll = shard.collectives
            assert coll is not None
            steps = max(shard.verify_calls, 1)
            step = shard.verify_s / steps * 1e3
            all_reduce = coll.all_reduce_s / steps * 1e3
            all_gather = coll.all_gather_s / steps * 1e3
            shards.append(
                {
                    "rank": rank,
                    "step_ms": step,
                    "all_reduce_ms_per_step": all_reduce,
                    "all_reduce_calls_per_step": coll.all_reduce_calls / steps,
                    "all_gather_ms_per_step": all_gather,
                    "comm_share": (all_reduce + all_gather) / step,
                    "probe_all_reduce_ms": probe_ms[rank],
                    "probe_share": probe_ms[rank] * coll.all_reduce_calls / steps / step,
                    "param_MB": mem.param_bytes / MB,
                    "rss_MB": mem.rss_bytes / MB,
                    "peak_rss_MB": mem.peak_rss_bytes / MB,
                    "device_MB": mem.device_bytes / MB,
                }
            )
        return {
            "tp": self.tp,
            "threads_per_shard": self.threads,
            "load_s": self.load_s,
            "decode_ms_per_token": statistics.median(self.step_ms),
            "decode_ms_mean": statistics.fmean(self.step_ms),
            "shards": shards,
            "tokens": self.tokens,
        }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="registered name or directory")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--threads", type=int, nargs="+", default=None, help="per shard, one per --tp entry"
    )
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--steps", type=int, default=16, help="decode steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--probe-iters", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--address", default=None, help="join this Ray cluster")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    threads = args.threads or [max(1, cores // tp) for tp in args.tp]
    if len(threads) != len(args.tp):
        parser.error("--threads needs one value per --tp value")
    model_dir = find_model(args.model, args.dtype)
    # Logical CPUs: every configuration stays loaded, only one runs at a time.
    bundles = sum(tp * n for tp, n in zip(args.tp, threads, strict=True))
    start_ray(args.address, num_cpus=None if args.address else max(cores, bundles))
    vocab = ModelConfig.from_pretrained(model_dir).vocab_size
    prompt = [(1000 + 7919 * i) % vocab for i in range(args.prompt_len)]
    loaded: list[Run] = []
    try:
        for tp, n in zip(args.tp, threads, strict=True):
            loaded.append(Run(model_dir, tp, n, args, prompt))
        for _ in range(args.rounds):
            for run in loaded:
                run.decode(args.steps)
        runs = [run.report(args.probe_iters) for run in loaded]
    finally:
        for run in loaded:
            run.target.shutdown()
    result: dict[str, Any] = {
        "model": model_dir.name,
        "model_dir": str(model_dir),
        "dtype": args.dtype,
        "device": args.device,
        "cores": cores,
        "torch": torch.__version__,
        "prompt_len": args.prompt_len,
        "steps": args.steps * args.rounds,
        "same_tokens_as_first": [run["tokens"] == runs[0]["tokens"] for run in runs],
        "runs": runs,
    }
    stem = f"tp_{model_dir.name}_{args.dtype}_{args.device}"
    write_report(args.out, stem, result, markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    headers = ["TP", "threads/shard", "decode ms/token", "rank", "in-shard step ms"]
    headers += ["all-reduce ms/step (calls)", "comm share", "bare all-reduce ms (share)"]
    headers += ["params MB", "RSS MB", "peak RSS MB"]
    rows = []
    for run in result["runs"]:
        for shard in run["shards"]:
            lead = [run["tp"], run["threads_per_shard"], f"{run['decode_ms_per_token']:.1f}"]
            rows.append(
                (lead if shard["rank"] == 0 else ["", "", ""])
                + [
                    shard["rank"], f"{shard['step_ms']:.1f}",
                    f"{shard['all_reduce_ms_per_step']:.1f} "
                    f"({shard['all_reduce_calls_per_step']:.0f})",
                    f"{shard['comm_share']:.0%}",
                    f"{shard['probe_all_reduce_ms']:.3f} ({shard['probe_share']:.0%})",
                    f"{shard['param_MB']:.0f}", f"{shard['rss_MB']:.0f}",
                    f"{shard['peak_rss_MB']:.0f}",
                ]
            )  # fmt: skip
    lines = [
        f"### Tensor parallel: {result['model']} ({result['dtype']}, {result['device']}, "
        f"{result['cores']} cores)",
        "",
        *table(headers, rows, left=0),
    ]
    lines += [
        "",
        f"Median of {result['steps']} decode steps (interleaved rounds) after a "
        f"{result['prompt_len']}-token prefill; decode ms/token is the caller's time per "
        "`verify` through Ray. All-reduce time is measured inside each shard and includes "
        "waiting for the slower rank; the bare all-reduce probe is one hidden-sized "
        "all-reduce with no compute around it, and its share is probe x calls / step. "
        "Peak RSS counts the checkpoint pages mapped while loading. Greedy tokens equal "
        "the first configuration's: "
        f"{result['same_tokens_as_first']}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
