"""A served target replica's decode step against the same model's in this
process, timed alternately in one run.

A served round waits on its target shard, a Ray actor with its own threads
beside the router. Whether that shard's forward costs what the model costs
in-process (``bench/decode_profile.py``, the kernel tables) is what this
answers: the replica the ``specray serve`` config describes (its drafters
left out) and the same weights loaded here with the shard's thread count,
each decoding ``--steps`` tokens after each of ``--contexts`` prompt
lengths, one after the other, ``--repeats`` times. A shard slower than
in-process in the same run is cost the serving path adds; both slower than
a table of another hour is that hour's machine.

    python -m specray.bench.shard_decode --config SERVE.yaml --contexts 64,600

Writes ``shard_decode_<config><tag>.{json,md}`` under ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import ray
import torch

from specray.actors.engine.target import LocalTarget, Target, VerifyInput
from specray.actors.model.loader import load_model
from specray.bench.common import config_stem, int_list, report_head, run_record, table, write_report
from specray.cluster.target_group import ShardedTarget
from specray.deploy.config import load_config
from specray.deploy.router_backend import router_config, start_ray_for

ARMS = ("shard", "local")


@dataclass(frozen=True)
class Decode:
    ms_per_step: float
    token_ids: list[int]  # what greedy decoding produced, step by step


def decode(target: Target, request_id: str, context: int, steps: int) -> Decode:
    """Greedy one-token decode steps after a prompt of ``context`` tokens
    (prefilled first, not timed), each fed the last step's argmax as a
    served round feeds its committed token."""
    prompt = [11 + (i * 7) % 97 for i in range(context)]
    first = target.verify([VerifyInput(request_id, 0, prompt, 1, argmax_only=True)])
    token_ids = [int(first[0].greedy_ids()[-1])]
    began = time.perf_counter()
    for step in range(steps):
        fed = VerifyInput(request_id, context + step, [token_ids[-1]], 1, argmax_only=True)
        token_ids.append(int(target.verify([fed])[0].greedy_ids()[-1]))
    seconds = time.perf_counter() - began
    target.release(request_id)
    return Decode(seconds / steps * 1e3, token_ids)


def measure(
    targets: dict[str, Target], contexts: Sequence[int], steps: int, repeats: int
) -> list[dict[str, Any]]:
    """Per context, each arm's ms per step in every repeat, the arms taking
    turns so that a slow minute of the machine hits both, and whether every
    run decoded the same tokens (the arms run one model)."""
    rows = []
    for context in contexts:
        for arm, target in targets.items():
            decode(target, f"warm-{arm}", context, 2)
        times: dict[str, list[float]] = {arm: [] for arm in targets}
        outputs = set()
        for repeat in range(repeats):
            for arm, target in targets.items():
                run = decode(target, f"{arm}-{repeat}", context, steps)
                times[arm].append(run.ms_per_step)
                outputs.add(tuple(run.token_ids))
        rows.append({"context": context, "ms": times, "same_tokens": len(outputs) == 1})
    return rows


def markdown(result: dict[str, Any]) -> str:
    lines = report_head(
        f"Decode through a target shard and in-process: {result['config']}", result["machine"]
    )
    lines += [
        f"`{result['command']}`",
        "",
        f"Model {result['model']['model_dir']} ({result['model']['weights']} weights, "
        f"{result['model']['dtype']}), {result['threads']} threads in each arm. ms per "
        f"one-token decode over {result['steps']} steps after a prompt of the given length; "
        "the arms took turns, each repeat one run of each. shard ÷ local: the medians' "
        "ratio (above 1: the served shard is slower). Same tokens: every run of both arms "
        "decoded the same greedy tokens.",
        "",
    ]
    rows = []
    for row in result["rows"]:
        shard, local = (row["ms"][arm] for arm in ARMS)
        ratio = statistics.median(shard) / statistics.median(local)
        cells = [" / ".join(f"{ms:.1f}" for ms in row["ms"][arm]) for arm in ARMS]
        same = "yes" if row["same_tokens"] else "no"
        rows.append([row["context"], *cells, f"{ratio:.2f}", same])
    headers = ["context", "shard ms per step", "in-process ms per step", "shard ÷ local"]
    lines += table([*headers, "same tokens"], rows)
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m specray.bench.shard_decode",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, required=True, help="a specray serve YAML (router)")
    p.add_argument("--contexts", type=int_list, default=[64, 600], help="prompt lengths")
    p.add_argument("--steps", type=int, default=20, help="decode steps per run")
    p.add_argument("--repeats", type=int, default=3, help="runs of each arm per context")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--tag", default="")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    config = load_config(args.config)
    settings = config.router.model_copy(update={"drafts": []})
    target_config = router_config(settings, config.home).target
    longest = max(args.contexts) + args.steps + 1
    model = replace(target_config.model, max_len=max(target_config.model.max_len, longest))
    target_config = replace(target_config, model=model)
    started_ray = start_ray_for(config.model_copy(update={"router": settings}))
    shard = ShardedTarget(target_config)
    try:
        torch.set_num_threads(target_config.threads)
        weights = load_model(Path(model.model_dir), model.dtype, weights=model.weights)
        local = LocalTarget(weights, model.num_slots, model.max_len, model.prefix_tokens)
        rows = measure({"shard": shard, "local": local}, args.contexts, args.steps, args.repeats)
    finally:
        shard.shutdown()
        if started_ray:
            ray.shutdown()
    result = run_record(
        "specray.bench.shard_decode",
        argv,
        args,
        ["contexts", "steps", "repeats"],
        config=str(args.config),
        model=asdict(model),
        threads=target_config.threads,
        rows=rows,
    )
    write_report(
        args.out, f"shard_decode_{config_stem(args.config)}{args.tag}", result, markdown(result)
    )
    return result


if __name__ == "__main__":
    main()
