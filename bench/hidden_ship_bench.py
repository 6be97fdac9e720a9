"""What shipping target hidden states to a draft head costs per round, through Ray.

Two hops carry them: target rank 0 returns every verified row's hidden states
(``γ + 1`` per request, bf16, see ``target_shard.ship_hidden``) to the router,
and the router forwards only the accepted rows (``a + 1``) to the draft actor
inside its :class:`DraftUpdate`. For a real target shard actor and a sink actor
standing in for the draft replica, this measures, per round and batch size:
the bytes each hop adds (pickled, as Ray sends them) and the wall time each
hop adds (median of interleaved calls with and without hidden states).

    python -m specray.bench.hidden_ship_bench --target qwen2.5-coder-0.5b-instruct \\
        --layers 2,12,23 --batches 1,8 --gamma 5 --accepted 3
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import time
from typing import Any

import ray
import torch

from specray.actors.engine.round import DraftUpdate
from specray.actors.engine.target import VerifyInput
from specray.actors.workers.shard_model import ShardModel
from specray.actors.workers.target_shard import ShardSpec, TargetShardWorker
from specray.bench.common import (
    bench_parser,
    int_list,
    resolve_preferring,
    write_run_report,
)
from specray.cluster.local_ray import start_ray


class Sink:
    """Stands in for a draft replica: receives a round's updates, nothing more."""

    def take(self, updates: list[DraftUpdate]) -> int:
        return len(updates)


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def measure(
    shard: Any,
    sink: Any,
    batch: int,
    gamma: int,
    accepted: int,
    layers: tuple[int, ...],
    rounds: int,
) -> dict[str, float]:
    ids = [f"b{batch}r{i}" for i in range(batch)]
    context = 64
    ray.get(shard.verify.remote([VerifyInput(r, 0, [1] * context, 1) for r in ids]))
    timings: dict[str, list[float]] = {
        "verify": [],
        "verify_hidden": [],
        "sink": [],
        "sink_hidden": [],
    }
    sizes: dict[str, int] = {}
    for _ in range(rounds):
        inputs = [VerifyInput(r, context, [1] * (gamma + 1), gamma + 1) for r in ids]
        for label, wanted in (("verify", ()), ("verify_hidden", layers)):
            start = time.perf_counter()
            outputs = ray.get(shard.verify.remote(inputs, wanted))
            timings[label].append(time.perf_counter() - start)
        hidden = [out.hidden_states[: accepted + 1].clone() for out in outputs]
        with_hidden = [
            DraftUpdate(r, accepted, [1] * (accepted + 1), h)
            for r, h in zip(ids, hidden, strict=True)
        ]
        without = [DraftUpdate(r, accepted, [1] * (accepted + 1), None) for r in ids]
        for label, updates in (("sink", without), ("sink_hidden", with_hidden)):
            start = time.perf_counter()
            ray.get(sink.take.remote(updates))
            timings[label].append(time.perf_counter() - start)
        sizes = {
            "target_hidden_bytes": sum(len(pickle.dumps(o.hidden_states)) for o in outputs),
            "draft_hidden_bytes": len(pickle.dumps(with_hidden)) - len(pickle.dumps(without)),
            "logits_bytes": sum(len(pickle.dumps(o.logits.clone())) for o in outputs),
        }
    for r in ids:
        ray.get(shard.release.remote(r))
    return {
        "batch": batch,
        **sizes,
        "verify_ms": _median_ms(timings["verify"]),
        "verify_with_hidden_ms": _median_ms(timings["verify_hidden"]),
        "to_draft_ms": _median_ms(timings["sink"]),
        "to_draft_with_hidden_ms": _median_ms(timings["sink_hidden"]),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    layers = tuple(int_list(args.layers))
    target_dir = resolve_preferring(args.target, args.dtype)
    start_ray(num_cpus=4)
    try:
        slots = max(args.batches)
        model = ShardModel(str(target_dir), dtype=args.dtype, num_slots=slots, max_len=256)
        spec = ShardSpec(model, num_threads=args.threads)
        worker: Any = ray.remote(TargetShardWorker)
        shard = worker.options(num_cpus=1).remote(spec)
        sink = ray.remote(Sink).options(num_cpus=0).remote()
        ray.get(shard.ping.remote())
        rows = [
            measure(shard, sink, b, args.gamma, args.accepted, layers, args.rounds)
            for b in args.batches
        ]
    finally:
        ray.shutdown()
    result = {
        "target": args.target,
        "dtype": args.dtype,
        "layers": layers,
        "gamma": args.gamma,
        "accepted": args.accepted,
        "rounds": args.rounds,
        "rows": rows,
    }
    lines = [
        f"### Hidden-state shipping per round: {args.target} ({args.dtype}), layers {layers}, "
        f"γ={args.gamma}, {args.accepted} accepted, median of {args.rounds} rounds",
        "",
        "| batch | target→router hidden bytes | router→draft hidden bytes | logits bytes | "
        "verify ms (without / with) | to draft ms (without / with) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['target_hidden_bytes']} | {r['draft_hidden_bytes']} | "
            f"{r['logits_bytes']} | {r['verify_ms']:.1f} / {r['verify_with_hidden_ms']:.1f} | "
            f"{r['to_draft_ms']:.2f} / {r['to_draft_with_hidden_ms']:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    write_run_report(args.out, "hidden_ship", result, text)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser(__doc__, dtype="bfloat16")
    p.add_argument("--layers", default="2,12,23")
    p.add_argument("--batches", type=int_list, default=[1, 8])
    p.add_argument("--gamma", type=int, default=5)
    p.add_argument("--accepted", type=int, default=3)
    p.add_argument("--rounds", type=int, default=15)
    return p


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
