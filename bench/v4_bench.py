"""DeepSeek-V4 model-core benchmark: our decoder against transformers'
``DeepseekV4ForCausalLM`` on the same random weights.

A tiny-but-not-trivial V4 (a few hundred MB in bf16: every attention and MLP
type, 4 residual streams) is saved with transformers and loaded by both.
Measured interleaved in one run, so machine noise hits both alike: decode
ms/token at a 256-token context, prefill of 256 tokens, and verify
cost(k)/cost(1) for k = 1..16 (a k-token forward after the same context;
transformers' V4 cache cannot be cropped, so each of its runs starts from a
copy of the prefilled cache, made outside the timing). Writes JSON and a
Markdown table with the machine's CPU flags in the header.

Random weights make acceptance rates meaningless; the verify cost ratios
are what speculation's payoff depends on. The model also carries a random
MTP block, and :mod:`specray.bench.v4_spec` runs n-gram and MTP at
γ = 1..4 through the engine on the shipped prompts, reporting τ, the
speedup and what a round costs in target-only steps.

    python -m specray.bench.v4_bench --threads 2
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM, DynamicCache

from specray.actors.model.loader import load_model
from specray.actors.store.tiny_v4 import mtp_tensors
from specray.bench import v4_spec
from specray.bench.common import cpu_flags, write_report
from specray.bench.model_timing import (
    CachedFeeds,
    best_of_rounds,
    median_seconds,
    versus_transformers,
)

VERIFY_KS = (1, 2, 3, 4, 6, 8, 12, 16)
CONTEXT = 256
PROMPT = [100 + (i * 37) % 3000 for i in range(CONTEXT)]

CONFIG: dict[str, Any] = dict(
    vocab_size=32000,
    hidden_size=1024,
    moe_intermediate_size=512,
    num_hidden_layers=6,
    num_attention_heads=16,
    head_dim=128,
    q_lora_rank=384,
    partial_rotary_factor=0.5,
    num_experts_per_tok=2,
    n_routed_experts=16,
    layer_types=[
        "sliding_attention",
        "compressed_sparse_attention",
        "heavily_compressed_attention",
        "compressed_sparse_attention",
        "heavily_compressed_attention",
        "compressed_sparse_attention",
    ],
    mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe", "moe", "moe"],
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 32},
    hc_mult=4,
    sliding_window=64,
    o_groups=4,
    o_lora_rank=256,
    index_n_heads=8,
    index_head_dim=64,
    index_topk=32,
    max_position_embeddings=4096,
)


class Reference:
    def __init__(self, model_dir: Path, dtype: torch.dtype) -> None:
        self.model = DeepseekV4ForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        self.prompt = torch.tensor([PROMPT])
        self.prefilled: DynamicCache | None = None

    @torch.inference_mode()
    def prefill(self) -> None:
        self.prefilled = DynamicCache(config=self.model.config)
        self.model(self.prompt, cache=self.prefilled, use_cache=True)

    def feed(self, k: int, repeats: int) -> float:
        assert self.prefilled is not None
        times = []
        for _ in range(repeats):
            cache = copy.deepcopy(self.prefilled)
            start = time.perf_counter()
            with torch.inference_mode():
                self.model(torch.full((1, k), 7), cache=cache, use_cache=True)
            times.append(time.perf_counter() - start)
        return statistics.median(times)


def measure_ours(impl: CachedFeeds, repeats: int) -> dict[str, Any]:
    prefill_s = median_seconds(impl.prefill, max(2, repeats // 3))
    impl.prefill()
    verify = {k: median_seconds(impl.feed(k), repeats) for k in VERIFY_KS}
    return _summary(prefill_s, verify)


def measure_reference(impl: Reference, repeats: int) -> dict[str, Any]:
    prefill_s = median_seconds(impl.prefill, max(2, repeats // 3))
    impl.prefill()
    verify = {k: impl.feed(k, repeats) for k in VERIFY_KS}
    return _summary(prefill_s, verify)


def _summary(prefill_s: float, verify: dict[int, float]) -> dict[str, Any]:
    return {
        f"prefill_{CONTEXT}_ms": prefill_s * 1e3,
        "decode_ms_per_token": verify[1] * 1e3,
        "verify_ms": {str(k): v * 1e3 for k, v in verify.items()},
        "verify_cost_ratio": {str(k): verify[k] / verify[1] for k in VERIFY_KS},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=4, help="interleaved ours/HF rounds")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        torch.manual_seed(0)
        hf_config = DeepseekV4Config(**CONFIG)
        hf_model: Any = DeepseekV4ForCausalLM(hf_config)
        hf_model.to(dtype).save_pretrained(model_dir)
        mtp = {name: t.to(dtype) for name, t in mtp_tensors(hf_config, seed=1).items()}
        save_file(mtp, str(model_dir / "mtp.safetensors"))
        ours = CachedFeeds(load_model(model_dir, dtype), PROMPT, max(VERIFY_KS))
        ref = Reference(model_dir, dtype)
        params = sum(p.numel() for p in ref.model.parameters())
        runs: dict[str, list[dict[str, Any]]] = {"specray": [], "transformers": []}
        for _ in range(args.rounds):
            runs["specray"].append(measure_ours(ours, args.repeats))
            runs["transformers"].append(measure_reference(ref, args.repeats))
        del ref
        speculative = v4_spec.measure(model_dir, ours.model, dtype)
    result: dict[str, Any] = {
        "model": "tiny-v4 (random weights)",
        "config": CONFIG,
        "parameters": params,
        "dtype": args.dtype,
        "threads": args.threads,
        "cpu_flags": cpu_flags(),
        "torch": torch.__version__,
        "context": CONTEXT,
        # Other work on the machine: timings from a loaded machine are noisy.
        "load_average_1min": os.getloadavg()[0],
    }
    result |= best_of_rounds(runs, f"prefill_{CONTEXT}_ms")
    result["speculative"] = speculative
    write_report(args.out, f"v4_tiny_{args.dtype}", result, markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    ours, ref = result["specray"], result["transformers"]
    prefill = f"prefill_{result['context']}_ms"
    context = result["context"]
    rows = [
        (f"decode ms/token (context {context})", f"{ours['decode_ms_per_token']:.1f}",
         f"{ref['decode_ms_per_token']:.1f}"),
        (f"prefill {context} tokens, ms", f"{ours[prefill]:.0f}", f"{ref[prefill]:.0f}"),
    ]  # fmt: skip
    lines = [
        f"### {result['model']}, {result['parameters'] / 1e6:.0f}M parameters "
        f"({result['dtype']}, {result['threads']} threads, CPU flags: "
        f"{' '.join(result['cpu_flags']) or 'none found'})",
        "",
        *versus_transformers(ours, ref, rows),
    ]
    lines += [
        "",
        f"Machine load average {result['load_average_1min']:.1f} at the end of the run "
        f"({os.cpu_count()} cores). "
        f"Decode is {result['decode_vs_transformers']:.2f}x transformers' time. "
        "Verify cost(k)/cost(1) is what a trained drafter's acceptance would be "
        "weighed against.",
        "",
    ]
    if "speculative" in result:
        lines += [*v4_spec.markdown(result["speculative"]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
