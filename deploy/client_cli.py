"""``specray client generate --server HOST:PORT ...``: generate through a
running ``specray serve``, with ``specray generate``'s flags and ``--json``
shape (the server owns the model, so model and engine flags are absent)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from specray.deploy.client import GenerationResult, SpecrayClient, SpecrayError
from specray.deploy.client_args import add_connection_args, connection_options, report_refusal
from specray.deploy.generation_output import print_result
from specray.deploy.sampling_flags import add_sampling_flags


def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("client", help="talk to a running `specray serve`")
    commands = p.add_subparsers(dest="client_command", required=True)
    g = commands.add_parser("generate", help="generate through the gRPC endpoint")
    g.add_argument("--k", type=int, default=None, help="draft tokens per round (ceiling)")
    g.add_argument(
        "--no-speculative", action="store_true", help="target-only decoding (A/B, debugging)"
    )
    g.add_argument("--request-id", default="")
    source = add_sampling_flags(g, leave_unset=True)
    source.add_argument("--token-ids", help="comma-separated prompt token ids")
    add_connection_args(g)
    return p


def run(args: argparse.Namespace) -> int:
    if args.token_ids is not None:
        try:
            prompt: str | list[int] = [int(t) for t in args.token_ids.split(",") if t.strip()]
        except ValueError:
            print(f"error: --token-ids must be integers, got {args.token_ids!r}", file=sys.stderr)
            return 2
    else:
        prompt = args.prompt if args.prompt is not None else args.prompt_file.read_text()
    options = {
        "request_id": args.request_id,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "min_p": args.min_p,
        "stop": args.stop,
        "ignore_eos": args.ignore_eos,
        "seed": args.seed,
        "speculative": False if args.no_speculative else None,
        "num_speculative_tokens": args.k,
    }
    token_ids: list[int] = []
    text: list[str] = []
    last: GenerationResult | None = None
    start = time.perf_counter()
    try:
        with SpecrayClient(args.server, args.timeout, **connection_options(args)) as client:
            for last in client.generate_stream(prompt, **options):
                token_ids += last.token_ids
                text.append(last.text)
                if not args.json:
                    print(last.text, end="", flush=True)
    except SpecrayError as error:
        return report_refusal(error)
    except OSError as error:  # an unreadable --tls-ca
        print(f"error: {error}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    assert last is not None and last.finish_reason is not None
    stats = {
        "draft_tokens": last.draft_tokens,
        "accepted_tokens": last.accepted_tokens,
        "rounds": last.rounds,
        "mean_acceptance_length": round(
            (last.accepted_tokens + last.rounds) / last.rounds if last.rounds else 0.0, 4
        ),
        # Measured here, so they include the network and the server's queue.
        "tokens_per_s": round(len(token_ids) / elapsed if elapsed > 0 else 0.0, 3),
        "elapsed_s": round(elapsed, 4),
        "fallback": last.fallback,
        "cached_tokens": last.cached_tokens,
    }
    print_result(
        token_ids,
        "".join(text),
        last.finish_reason,
        last.seed,
        last.prompt_tokens,
        stats,
        args.json,
    )
    return 0
