"""Expert-parallel benchmark: a small random DeepSeek-V4 at EP=1 against
EP=2 (and any ``tp × ep`` layouts given), target shards in Ray actors.

Per layout, one decode token per step: the caller's ms/token (one
``verify`` through Ray), the step inside the shards, split into the MoE
combine's all-reduces (routed + shared expert output, one per layer, over
the whole group), the TP all-reduces/gathers (attention, head) and compute
(the rest); Ray is the caller's time less the slowest shard's step. Bytes
moved per token are what a ring all-reduce sends per rank,
``2(n−1)/n × hidden × bytes`` per call. Also per-shard resident parameters.
Then what the measured shape predicts for V4-Flash on H200 nodes: the
planner's step time for EP8 and TP8 (``cluster/planning``). Writes JSON and
Markdown under ``bench/results`` with the CPU flags in the header.

    python -m specray.bench.ep_bench --layouts 1x1 1x2 --threads 1
    python -m specray.bench.ep_bench --device cuda --layouts 1x1 1x2 2x1   # NCCL
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from specray.actors.engine.target import VerifyInput
from specray.actors.store.tiny_v4 import write_tiny_v4
from specray.cluster.local_ray import start_ray
from specray.cluster.planning.hardware import GPUS
from specray.cluster.planning.layouts import ClusterShape, Layout, Precision
from specray.cluster.planning.model_specs import preset
from specray.cluster.planning.step_time import step_time
from specray.cluster.target_group import ShardedTarget

MB = 1e6


def cpu_flags() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = sorted(set(re.findall(r"\b(avx512_bf16|amx_bf16|avx512f|avx2)\b", text)))
    return " ".join(flags) or "none of avx2/avx512"


class Run:
    """One layout, loaded once and measured in rounds interleaved with the
    other layouts', so background load on a shared machine hits all alike."""

    def __init__(self, model_dir: Path, tp: int, ep: int, args: argparse.Namespace) -> None:
        self.tp, self.ep, self.args = tp, ep, args
        prompt = [(7 + 31 * i) % 400 for i in range(args.prompt_len)]
        self.target = ShardedTarget.create(
            model_dir,
            tp=tp,
            ep=ep,
            dtype=args.dtype,
            num_slots=1,
            max_len=args.prompt_len + args.warmup + args.rounds * args.steps + 8,
            threads_per_shard=args.threads,
            gpus_per_shard=1.0 if args.device == "cuda" else 0.0,
            time_collectives=True,
        )
        self.hidden = json.loads((model_dir / "config.json").read_text())["hidden_size"]
        (out,) = self.target.verify([VerifyInput("bench", 0, prompt, 1)])
        self.token, self.start = int(out.greedy_ids()[-1]), len(prompt)
        self.tokens: list[int] = []
        self.caller_ms: list[float] = []
        self.decode(args.warmup, record=False)
        self.target.stats(reset=True)

    def decode(self, steps: int, record: bool = True) -> None:
        for _ in range(steps):
            began = time.perf_counter()
            (out,) = self.target.verify([VerifyInput("bench", self.start, [self.token], 1)])
            if record:
                self.caller_ms.append((time.perf_counter() - began) * 1e3)
            self.tokens.append(self.token)
            self.token, self.start = int(out.greedy_ids()[-1]), self.start + 1

    def report(self) -> dict[str, Any]:
        stats, memory = self.target.stats(), self.target.memory()
        elem = torch.finfo(getattr(torch, self.args.dtype)).bits // 8
        group = self.tp * self.ep
        ring = 2 * (group - 1) / group  # bytes a rank sends per all-reduced byte
        tp_ring = 2 * (self.tp - 1) / self.tp
        shards = []
        for rank, (shard, mem) in enumerate(zip(stats, memory, strict=True)):
            steps = max(shard.verify_calls, 1)
            tp_coll, moe_coll = shard.collectives, shard.expert_collectives
            assert tp_coll is not None and moe_coll is not None
            step = shard.verify_s / steps * 1e3
            combine = moe_coll.all_reduce_s / steps * 1e3 if group > 1 else 0.0
            tp_comm = (tp_coll.all_reduce_s + tp_coll.all_gather_s) / steps * 1e3
            tp_comm = tp_comm if self.tp > 1 else 0.0
            combine_calls = moe_coll.all_reduce_calls / steps
            tp_calls = tp_coll.all_reduce_calls / steps
            sent = (ring * combine_calls + tp_ring * tp_calls) * self.hidden * elem
            shards.append(
                {
                    "rank": rank,
                    "step_ms": step,
                    "compute_ms": step - combine - tp_comm,
                    "combine_ms": combine,
                    "combine_calls": combine_calls,
                    "tp_comm_ms": tp_comm,
                    "tp_all_reduce_calls": tp_calls,
                    "bytes_sent_per_token": sent,
                    "param_MB": mem.param_bytes / MB,
                    "rss_MB": mem.rss_bytes / MB,
                }
            )
        caller = statistics.fmean(self.caller_ms)
        return {
            "tp": self.tp,
            "ep": self.ep,
            "caller_ms_per_token": caller,
            "caller_ms_median": statistics.median(self.caller_ms),
            "ray_ms": caller - max(s["step_ms"] for s in shards),
            "shards": shards,
            "tokens": self.tokens,
        }


def flash_prediction() -> list[dict[str, Any]]:
    """The planner's decode step for V4-Flash on one 8-GPU H200 node."""
    flash, gpu, shape = preset("v4-flash"), GPUS["h200"], ClusterShape(1, 8)
    precision = Precision("fp8", "bf16")
    rows = []
    for family in ("ep", "tp"):
        for batch in (1, 32):
            step = step_time(Layout(family, 8, 1), flash, gpu, shape, precision, batch, 32768)
            hidden_bytes = flash.hidden_size * precision.activation_bytes
            calls = step.collectives
            rows.append(
                {
                    "layout": f"{family.upper()}8",
                    "batch": batch,
                    "step_ms": step.total_s * 1e3,
                    "hbm_ms": step.hbm_s * 1e3,
                    "comm_ms": step.comm_s * 1e3,
                    "all_reduces": calls,
                    "bytes_per_token_per_rank": calls * hidden_bytes * 2 * 7 / 8,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layouts", nargs="+", default=["1x1", "1x2"], help="TPxEP, e.g. 2x2")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="per shard")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="decode steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    layouts = [tuple(int(x) for x in text.split("x")) for text in args.layouts]
    # Logical CPUs: every layout stays loaded, only one runs at a time.
    start_ray(num_cpus=max(os.cpu_count() or 1, sum(tp * ep for tp, ep in layouts)))
    with tempfile.TemporaryDirectory() as scratch:
        sizes = dict(hidden_size=args.hidden, moe_intermediate_size=args.hidden)
        model_dir = write_tiny_v4(Path(scratch) / "v4", 0, args.experts, **sizes)
        loaded: list[Run] = []
        try:
            for tp, ep in layouts:
                loaded.append(Run(model_dir, tp, ep, args))
            for _ in range(args.rounds):
                for run in loaded:
                    run.decode(args.steps)
            runs = [run.report() for run in loaded]
        finally:
            for run in loaded:
                run.target.shutdown()
    result: dict[str, Any] = {
        "model": f"random V4, hidden {args.hidden}, {args.experts} experts (2 per token), 4 layers",
        "dtype": args.dtype,
        "device": args.device,
        "cores": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "torch": torch.__version__,
        "threads_per_shard": args.threads,
        "steps": args.steps * args.rounds,
        "same_tokens_as_first": [run["tokens"] == runs[0]["tokens"] for run in runs],
        "runs": runs,
        "v4_flash_h200_planner": flash_prediction(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"ep_v4_{args.dtype}_{args.device}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"### Expert parallel: {result['model']} ({result['dtype']}, {result['device']}, "
        f"{result['cores']} cores, CPU flags: {result['cpu_flags']}, "
        f"{result['threads_per_shard']} thread/shard)",
        "",
        "| TP x EP | caller ms/token | Ray ms | rank | step ms | compute ms | combine ms (calls) "
        "| TP comm ms (all-reduces) | bytes sent/token | params MB | RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        for s in run["shards"]:
            lead = (
                f"| {run['tp']} x {run['ep']} | {run['caller_ms_per_token']:.2f} "
                f"| {run['ray_ms']:.2f} "
                if s["rank"] == 0
                else "| | | "
            )
            lines.append(
                lead + f"| {s['rank']} | {s['step_ms']:.2f} | {s['compute_ms']:.2f} "
                f"| {s['combine_ms']:.2f} ({s['combine_calls']:.0f}) | {s['tp_comm_ms']:.2f} "
                f"({s['tp_all_reduce_calls']:.0f}) | {s['bytes_sent_per_token']:.0f} "
                f"| {s['param_MB']:.1f} | {s['rss_MB']:.0f} |"
            )
    lines += [
        "",
        f"Means of {result['steps']} one-token decode steps in interleaved rounds. Ray ms "
        "is the caller's time less the slowest shard's step; combine is the MoE layers' "
        "all-reduces over the group and TP comm the attention/head collectives along a "
        "row, both including waiting for the slower rank; compute is the rest. Bytes sent "
        "per token and rank are a ring all-reduce's 2(n-1)/n of each all-reduced hidden "
        "vector (the head's logit gather left out). Greedy tokens equal the first "
        f"layout's: {result['same_tokens_as_first']}.",
        "",
        "V4-Flash (transformers' default config) on one 8 x H200 node, fp8 weights, "
        "bf16 KV, 32768-token context, the planner's model (`specray plan`):",
        "",
        "| layout | requests | step ms | HBM ms | comm ms | all-reduces | bytes/token/rank |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["v4_flash_h200_planner"]:
        lines.append(
            f"| {row['layout']} | {row['batch']} | {row['step_ms']:.2f} | {row['hbm_ms']:.2f} "
            f"| {row['comm_ms']:.2f} | {row['all_reduces']} "
            f"| {row['bytes_per_token_per_rank'] / 1e3:.0f} KB |"
        )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
