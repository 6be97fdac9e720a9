"""Model-core benchmark: our decoder against HF transformers on one checkpoint.

Measures, interleaved in one run so machine noise hits both alike:
decode ms/token, verify cost(k)/cost(1) for k in 1..32, prefill ms for 128
tokens, and the bandwidth floor (weight bytes read per decode step divided by
measured memcpy bandwidth). Writes JSON and a Markdown table.

    python -m specray.bench.model_bench --model qwen2.5-coder-0.5b-instruct --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from specray.actors.model.decoder import DecoderModel
from specray.actors.model.loader import load_model, parse_dtype
from specray.actors.store.resolve import resolve_model
from specray.bench.common import write_report
from specray.bench.model_timing import (
    CachedFeeds,
    best_of_rounds,
    median_seconds,
    versus_transformers,
)

VERIFY_KS = (1, 2, 4, 8, 16, 32)
CONTEXT = 128


def memcpy_bandwidth(num_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second copied by one large tensor copy (best of ``repeats``)."""
    src = torch.ones(num_bytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return num_bytes / best


def weight_bytes_per_step(model: DecoderModel) -> int:
    """Bytes one decode step must read: every weight except the embedding
    table, of which a step reads only its tokens' rows (unless it is tied to
    the LM head, which reads all of it)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if not model.config.tie_word_embeddings:
        total -= sum(p.numel() * p.element_size() for p in model.embed_tokens.parameters())
    return total


class Reference:
    def __init__(self, model_dir: Path, dtype: torch.dtype) -> None:
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        self.prompt = torch.arange(100, 100 + CONTEXT).unsqueeze(0)
        self.cache: DynamicCache | None = None

    @torch.inference_mode()
    def prefill(self) -> None:
        self.cache = DynamicCache(config=self.model.config)
        self.model(self.prompt, cache=self.cache, use_cache=True)

    def feed(self, k: int) -> Callable[[], None]:
        @torch.inference_mode()
        def run() -> None:
            assert self.cache is not None
            extra = self.cache.get_seq_length() - CONTEXT
            if extra > 0:
                self.cache.crop(-extra)  # transformers 5 crops by a negative count
            ids = torch.full((1, k), 7)
            self.model(ids, cache=self.cache, use_cache=True)

        return run


def measure(impl: CachedFeeds | Reference, repeats: int) -> dict[str, Any]:
    prefill_s = median_seconds(impl.prefill, repeats)
    impl.prefill()
    verify = {k: median_seconds(impl.feed(k), repeats) for k in VERIFY_KS}
    return {
        "prefill_128_ms": prefill_s * 1e3,
        "decode_ms_per_token": verify[1] * 1e3,
        "verify_cost_ratio": {str(k): verify[k] / verify[1] for k in VERIFY_KS},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved ours/HF rounds")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = parse_dtype(args.dtype)
    model_dir = resolve_model(args.model)
    ours = CachedFeeds(load_model(model_dir, dtype), range(100, 100 + CONTEXT), max(VERIFY_KS))
    ref = Reference(model_dir, dtype)
    bandwidth = memcpy_bandwidth()
    step_bytes = weight_bytes_per_step(ours.model)

    runs: dict[str, list[dict[str, Any]]] = {"specray": [], "transformers": []}
    for _ in range(args.rounds):  # interleaved
        runs["specray"].append(measure(ours, args.repeats))
        runs["transformers"].append(measure(ref, args.repeats))
    result: dict[str, Any] = {
        "model": args.model,
        "dtype": args.dtype,
        "threads": args.threads,
        "torch": torch.__version__,
        "memcpy_GBps": bandwidth / 1e9,
        "weight_bytes_per_step": step_bytes,
        "bandwidth_floor_ms": step_bytes / bandwidth * 1e3,
    }
    result |= best_of_rounds(runs, "prefill_128_ms")
    result["decode_vs_floor"] = (
        result["specray"]["decode_ms_per_token"] / result["bandwidth_floor_ms"]
    )
    write_report(args.out, f"model_{args.model}_{args.dtype}", result, markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    ours, ref = result["specray"], result["transformers"]
    rows = [
        (label, f"{ours[key]:.1f}", f"{ref[key]:.1f}")
        for label, key in (("decode ms/token", "decode_ms_per_token"),
                           ("prefill 128 tokens, ms", "prefill_128_ms"))
    ]  # fmt: skip
    lines = [
        f"### {result['model']} ({result['dtype']}, {result['threads']} threads)",
        "",
        *versus_transformers(ours, ref, rows),
    ]
    lines += [
        "",
        f"Bandwidth floor: {result['weight_bytes_per_step'] / 1e6:.0f} MB per step / "
        f"{result['memcpy_GBps']:.1f} GB/s memcpy = {result['bandwidth_floor_ms']:.1f} ms; "
        f"decode is {result['decode_vs_floor']:.2f}x the floor and "
        f"{result['decode_vs_transformers']:.2f}x transformers' time.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
