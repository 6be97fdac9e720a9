"""``specray generate``: in-process generation through the speculative engine.

``--draft none`` decodes target-only through the same code path, so the
two are directly comparable.
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import torch

from specray.actors.drafting.spec import DrafterSpec
from specray.actors.engine.factory import EngineSpec, LoadedEngine, build_engine
from specray.actors.engine.feeds import DEFAULT_MAX_BATCHED_TOKENS
from specray.actors.engine.request import GenerationRequest, RequestOutput
from specray.actors.engine.tokenizer import chat_ids
from specray.actors.model.weight_plan import WEIGHT_FORMATS
from specray.actors.sampling.params import SamplingParams, StoppingCriteria
from specray.actors.store.weights_dir import weights_dir
from specray.deploy.generation_output import print_result
from specray.deploy.sampling_flags import add_sampling_flags
from specray.deploy.weights_choice import choose_plan
from specray.deploy.weights_config import WEIGHTS_HELP, weights_for_dtype


def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="generate text in-process with speculative decoding")
    p.add_argument("--target", required=True, help="registered model name or local path")
    p.add_argument(
        "--draft",
        default="ngram",
        help=(
            "none | ngram | suffix | a model (name or path) | ngram+MODEL | suffix+MODEL "
            "(hybrids) | head:DIR | dspark:DIR | mtp"
        ),
    )
    p.add_argument(
        "--k",
        type=int,
        default=4,
        help="the most tokens verified per round beside the committed one (a token tree's "
        "nodes count); lookup drafters (ngram, suffix) do well with 16 or more",
    )
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=DEFAULT_MAX_BATCHED_TOKENS,
        help="tokens the target feeds per round; longer prompts prefill in chunks",
    )
    p.add_argument(
        "--prefix-cache-tokens",
        type=int,
        default=None,
        help="positions the prefix cache keeps (default: a quarter of the KV cache; 0: off)",
    )
    p.add_argument("--fixed-k", action="store_true", help="always draft k tokens (no adaptive γ)")
    p.add_argument("--weights", choices=WEIGHT_FORMATS, default="auto", help=WEIGHTS_HELP)
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default=None, help="dense in this dtype"
    )
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--home", type=Path, default=None, help="model store (default $SPECRAY_HOME)")
    p.add_argument(
        "--tp",
        type=int,
        default=None,
        help="run the target as shards in Ray actors, N tensor-parallel ranks per row: "
        "attention heads, the vocabulary and each expert's columns split N ways "
        "(default: measured at start)",
    )
    p.add_argument(
        "--ep",
        type=int,
        default=1,
        help="M expert-parallel rows of --tp ranks (M·N shards; MoE targets only): "
        "row e holds the e-th M-th of the routed experts, attention is repeated per row",
    )
    p.add_argument(
        "--address", default=None, help="Ray cluster to join (default: embedded Ray on loopback)"
    )
    add_sampling_flags(p, leave_unset=False)
    return p


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    try:
        _validate(args)
        drafter = DrafterSpec.parse(args.draft)
        weights = weights_for_dtype(args.weights, args.dtype)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    verify_rows = args.k + 1 if drafter is not None and args.k > 0 else None
    plan = choose_plan(args.target, weights, args.tp, verify_rows, args.home, args.dtype)
    print(f"[{plan.log_line()}]", file=sys.stderr)
    spec = EngineSpec(
        target=args.target,
        draft=drafter,
        dtype=plan.dtype,
        weights=plan.weights,
        num_speculative_tokens=args.k,
        adaptive=not args.fixed_k,
        max_batch=1,
        max_batched_tokens=args.max_num_batched_tokens,
        prefix_cache_tokens=args.prefix_cache_tokens,
        home=args.home,
    )
    shards = plan.tp * args.ep
    sharded = _sharded_target(args, spec, plan.tp) if shards > 1 or args.address else None
    try:
        return _generate(args, build_engine(spec, target=sharded))
    finally:
        if sharded is not None:
            sharded.shutdown()


def _sharded_target(args: argparse.Namespace, spec: EngineSpec, tp: int) -> Any:
    """The target as ``tp × --ep`` shards in Ray actors (embedded loopback
    Ray, or the cluster at ``--address``)."""
    from specray.cluster.local_ray import start_ray
    from specray.cluster.target_group import ShardedTarget

    shards = tp * args.ep
    # Ray's logical CPUs place the shards; their threads are set apart.
    start_ray(args.address, num_cpus=None if args.address else max(os.cpu_count() or 1, shards))
    target_dir = weights_dir(spec.target, spec.weights, spec.dtype, spec.home)
    return ShardedTarget.create(
        target_dir,
        tp=tp,
        ep=args.ep,
        dtype=spec.dtype,
        weights=spec.weights,
        num_slots=spec.max_batch,
        max_len=spec.max_len,
        prefix_tokens=spec.prefix_tokens,
    )


def _generate(args: argparse.Namespace, loaded: LoadedEngine) -> int:
    prompt = args.prompt if args.prompt is not None else args.prompt_file.read_text()
    tokenizer = loaded.tokenizer
    prompt_ids = chat_ids(tokenizer, prompt) if args.chat else tokenizer(prompt)["input_ids"]
    request = GenerationRequest(
        request_id=uuid.uuid4().hex,
        prompt_ids=prompt_ids,
        sampling=SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p, args.seed),
        stopping=StoppingCriteria(
            max_tokens=args.max_tokens, stop=tuple(args.stop), ignore_eos=args.ignore_eos
        ),
    )
    token_ids: list[int] = []
    pieces: list[str] = []
    last: RequestOutput | None = None
    for chunk in loaded.engine.generate([request]):
        token_ids += chunk.token_ids
        pieces.append(chunk.text)
        last = chunk
        if not args.json:
            print(chunk.text, end="", flush=True)
    assert last is not None and last.finished
    stats = last.stats.as_dict()
    print_result(
        token_ids,
        "".join(pieces),
        last.finish_reason,
        last.seed,
        len(prompt_ids),
        stats,
        args.json,
    )
    return 0


# The least value of each numeric flag; None (--tp, --prefix-cache-tokens unset) passes.
_LEAST = (
    ("k", 0),
    ("max_tokens", 1),
    ("temperature", 0),
    ("tp", 1),
    ("ep", 1),
    ("max_num_batched_tokens", 1),
    ("prefix_cache_tokens", 0),
    ("top_k", 0),
)


def _validate(args: argparse.Namespace) -> None:
    for name, least in _LEAST:
        value = getattr(args, name)
        if value is not None and value < least:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
