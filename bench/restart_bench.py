"""How long the router takes to replace a killed replica.

Starts a router on an embedded loopback Ray, then, one at a time, SIGKILLs a
target shard (the whole TP group is restarted: gang restart) and a draft
replica, each ``--kills`` times, with the router idle (so the watch, not a
failing call, notices the death). Per kill it reports:

- ``restart_s``: starting the replacement (``RouterState.recovery``): a
  fresh TP group, placement group to loaded weights; or a draft actor;
- ``kill_to_up_s``: from the kill until the pool is back to size, i.e.
  detection + teardown + restart, the outage a client would wait through.

    python -m specray.bench.restart_bench --tiny --tp 2
    python -m specray.bench.restart_bench --target qwen2.5-coder-0.5b-instruct --tp 2

Reports only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ray

from specray.actors.store.resolve import resolve_model
from specray.bench.common import machine_info
from specray.cluster.local_ray import start_ray
from specray.cluster.router import launch_router
from specray.cluster.router_state import RouterState
from specray.deploy.config import RouterSettings
from specray.deploy.router_backend import router_config


def tiny_model(directory: Path) -> Path:
    """A random-weight Qwen2 small enough that a restart is all process start-up."""
    from specray.actors.store.random_qwen2 import write_random_qwen2

    return write_random_qwen2(directory, max_position_embeddings=1024)


def _state(router: Any) -> RouterState:
    state: RouterState = ray.get(router.state.remote())
    return state


def _kill_and_time(router: Any, kill: Callable[[RouterState], int], restarts: str) -> float:
    """SIGKILL the pid ``kill`` picks; seconds until ``recovery.<restarts>`` grows."""
    before = getattr(_state(router).recovery, restarts)
    os.kill(kill(_state(router)), signal.SIGKILL)
    began = time.perf_counter()
    while getattr(_state(router).recovery, restarts) == before:
        time.sleep(0.02)
    return time.perf_counter() - began


def measure(router: Any, kills: int) -> dict[str, Any]:
    target_up = [
        _kill_and_time(router, lambda s: s.targets[0].shard_pids[-1], "target_restarts")
        for _ in range(kills)
    ]
    draft_up = [
        _kill_and_time(router, lambda s: s.drafts[0].pid, "draft_restarts") for _ in range(kills)
    ]
    recovery = _state(router).recovery
    return {
        "target": {"restart_s": list(recovery.target_restart_s), "kill_to_up_s": target_up},
        "draft": {"restart_s": list(recovery.draft_restart_s), "kill_to_up_s": draft_up},
    }


def _line(kind: str, result: dict[str, list[float]]) -> str:
    parts = [f"{kind:6}"]
    for key, values in result.items():
        parts.append(
            f"{key} median {statistics.median(values):.2f} s "
            f"(min {min(values):.2f}, max {max(values):.2f})"
        )
    return "  ".join(parts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--tiny", action="store_true", help="a random-weight tiny Qwen2")
    source.add_argument("--target", help="a registered name or a local path")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--kills", type=int, default=3, help="kills of each kind")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    info = start_ray(num_cpus=max(os.cpu_count() or 1, 2 * args.tp + 4))
    with tempfile.TemporaryDirectory() as scratch:
        if args.tiny:
            model_dir = tiny_model(Path(scratch))
        else:
            model_dir = resolve_model(args.target, dtype=args.dtype)
        settings = RouterSettings.model_validate(
            {
                "target": str(model_dir),
                "tp": args.tp,
                "dtype": args.dtype,
                "threads_per_shard": 1,
                "max_len": 512,
                "drafts": [{"kind": "ngram", "placement": "actor"}],  # killed by pid
                "num_drafts": 2,
                "profile": False,
            }
        )
        config = router_config(settings)
        began = time.perf_counter()
        router = launch_router(config)
        result: dict[str, Any] = {"tp": args.tp, "cold_start_s": time.perf_counter() - began}
        try:
            result |= measure(router, args.kills)
        finally:
            ray.get(router.shutdown.remote())
            if info.started_here:
                ray.shutdown()
    print(f"cold start (router, {args.tp} shards, 2 drafts): {result['cold_start_s']:.2f} s")
    print(_line("target", result["target"]))
    print(_line("draft", result["draft"]))
    if args.out is not None:
        args.out.write_text(json.dumps({"machine": machine_info()} | result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
