"""Weight formats on this machine: per-layer kernels, the whole model, and
llama.cpp on the same GGUF file.

For each format (fp32 / bf16 dense, int8 per channel, int4 per group of 32,
Q5_0-like blocks on the block kernel, and ``gguf``: the shipped file's
blocks as the model loads them, symmetric ones on the block kernel where it
runs, else 4-bit ones on int4 and the rest on int8; ``gguf torch`` the same
file with the block kernel turned off; ``gguf avx2`` on the kernel's AVX2
build; ``gguf fp32`` with float32 activations) it measures, in one run:

- per layer of the model's shapes (`layer_kernels.py`): ms for k = 1, 2, 4, 9, 17 rows;
- whole model (fp32, bf16, gguf): decode ms/token and verify cost(k)/cost(1)
  for k = 1..17 at a fixed context, and prefill of 512 tokens;
- greedy agreement: the first format's greedy continuations of held-out
  prompts, scored teacher-forced by every format; each pair of formats is
  compared position by position (fraction of positions whose argmax agrees,
  and the first disagreement);
- llama.cpp's ``llama-bench`` on the same GGUF, when its path is given
  (``--llama-bench``); it is optional and nothing else depends on it;
- with llama-bench: decode of each GGUF format alternated with one
  llama-bench decode run, round by round (``--paired-rounds``), so the
  decode goal is read from ratios measured side by side.

All models are loaded at once and timed call by call in turn, so the noise
of a shared machine hits every format alike; timings are medians. The header
records the CPU flags and the load average.

    python -m specray.bench.kernel_bench --threads 2 --llama-bench /path/to/llama-bench
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from specray.actors.model.batch import ForwardBatch, SequenceInput
from specray.actors.model.config import ModelConfig
from specray.actors.model.decoder import DecoderModel
from specray.actors.model.gguf_source import int4_share
from specray.actors.model.hardware import read_cpu_features
from specray.actors.model.loader import load_model
from specray.actors.parallel.block_kernel import SWITCH
from specray.actors.parallel.block_weights import BlockWeights
from specray.actors.parallel.int8_kernels import use_int8_kernel
from specray.actors.parallel.linear_weights import DenseWeights, Int4Weights, Int8Weights
from specray.actors.store.gguf_file import fetch_gguf
from specray.bench.kernel_report import markdown
from specray.bench.layer_kernels import probe_line, time_layers
from specray.bench.llama_cpp import llama_decode_ms, run_llama_bench
from specray.bench.prompts import load_prompts

VERIFY_KS = tuple(range(1, 18))
CONTEXT = 64
MODELS = {"fp32": ("float32", "dense"), "bf16": ("bfloat16", "dense"), "gguf": ("bfloat16", "gguf")}
# ``gguf`` with every int8 weight held on the weight-only kernel, whatever
# the load-time choice: what the per-token kernel changes, in one run.
WEIGHT_ONLY_GGUF = "gguf weight-only"
MODELS[WEIGHT_ONLY_GGUF] = ("bfloat16", "gguf")
# ``gguf`` with the block kernel turned off: every block on torch's kernels
# (per-channel int8 with its load-time choice, int4), as before the kernel.
TORCH_GGUF = "gguf torch"
MODELS[TORCH_GGUF] = ("bfloat16", "gguf")
# ``gguf`` on the block kernel's AVX2 build, on a CPU that also has VNNI: what
# an AVX2-only machine's inner loop costs on this one's memory and cores.
AVX2_GGUF = "gguf avx2"
MODELS[AVX2_GGUF] = ("bfloat16", "gguf")
# ``gguf`` with float32 activations: the block kernel rounds activations to
# int8 either way, so this prices the bf16 casts around it.
FP32_GGUF = "gguf fp32"
MODELS[FP32_GGUF] = ("float32", "gguf")
KERNEL_SETTING = {TORCH_GGUF: "off", AVX2_GGUF: "avx2"}
PAIRED_CALLS = 32  # decode steps per side of one paired round


def _once_ms(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1e3


def kernel_counts(model: torch.nn.Module) -> dict[str, int]:
    """How many weights run on each kernel, e.g. ``{"int8 per_token": 168}``."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, Int8Weights):
            name = f"int8 {module.kernel}"
        elif isinstance(module, DenseWeights):
            name = f"{module.format_name} {'packed' if module.packed is not None else 'plain'}"
        elif isinstance(module, Int4Weights):
            name = "int4"
        elif isinstance(module, BlockWeights):
            build = "vnni" if module.kernel.vnni else "avx2"
            name = f"blocks {module.format_name} {build}"
        else:
            continue
        counts[name] = counts.get(name, 0) + 1
    return counts


class Runner:
    """One model at a fixed context, for timing and teacher-forced scoring."""

    def __init__(self, model: DecoderModel) -> None:
        self.model = model
        self.cache = model.new_cache(1, 1024)
        self.slot = self.cache.allocate()

    def forward(self, token_ids: Sequence[int], start: int, logits: int) -> torch.Tensor:
        self.cache.truncate(self.slot, start)
        batch = ForwardBatch.build([SequenceInput(self.slot, list(token_ids), start, logits)])
        return self.model(batch, self.cache).logits

    def verify_call(self, k: int) -> Callable[[], object]:
        """A k-row verify at the fixed context (the cache holds ``CONTEXT`` tokens)."""
        return lambda: self.forward([7] * k, CONTEXT, k)

    def greedy(self, prompt: Sequence[int], steps: int) -> list[int]:
        tokens = [int(self.forward(prompt, 0, 1)[-1].argmax())]
        while len(tokens) < steps:
            tokens.append(
                int(self.forward(tokens[-1:], len(prompt) + len(tokens) - 1, 1)[-1].argmax())
            )
        return tokens

    def argmax_along(self, prompt: Sequence[int], continuation: Sequence[int]) -> list[int]:
        """This model's argmax at every position of ``continuation``, fed the
        reference's own tokens (teacher forcing)."""
        sequence = [*prompt, *continuation[:-1]]
        logits = self.forward(sequence, 0, len(continuation))
        return [int(t) for t in logits.argmax(-1)]


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict[str, Any]:
    """Fraction of positions whose argmax agrees, and each prompt's first
    position that does not."""
    pairs = [list(zip(a, b, strict=True)) for a, b in zip(ours, theirs, strict=True)]
    positions = sum(len(p) for p in pairs)
    same = sum(x == y for p in pairs for x, y in p)
    first = [next((i for i, (x, y) in enumerate(p) if x != y), len(p)) for p in pairs]
    return {"rate": same / positions, "positions": positions, "first_disagreement": first}


def time_models(
    runners: dict[str, Runner], prompt: Sequence[int], repeats: int
) -> dict[str, dict[str, Any]]:
    """Decode, verify(k) and prefill timings, the formats interleaved call by
    call so that machine noise hits them alike."""
    for runner in runners.values():
        runner.forward(prompt[:CONTEXT], 0, 1)
        for k in VERIFY_KS:  # warm-up: first-call allocations
            runner.verify_call(k)()
    samples: dict[str, dict[int, list[float]]] = {f: {k: [] for k in VERIFY_KS} for f in runners}
    for _ in range(repeats):
        for k in VERIFY_KS:
            for fmt, runner in runners.items():
                samples[fmt][k].append(_once_ms(runner.verify_call(k)))
    prefill: dict[str, list[float]] = {fmt: [] for fmt in runners}
    for _ in range(max(1, repeats // 3)):
        for fmt, runner in runners.items():
            prefill[fmt].append(_once_ms(functools.partial(runner.forward, range(100, 612), 0, 1)))
    out: dict[str, dict[str, Any]] = {}
    for fmt in runners:
        verify = {k: statistics.median(samples[fmt][k]) for k in VERIFY_KS}
        out[fmt] = {
            "decode_ms_per_token": verify[1],
            "verify_ms": verify,
            "verify_cost_ratio": {k: verify[k] / verify[1] for k in VERIFY_KS},
            "prefill_512_tokens_per_s": 512 / statistics.median(prefill[fmt]) * 1e3,
        }
    return out


def paired_decode(
    runners: dict[str, Runner], binary: Path, gguf: Path, threads: int, rounds: int
) -> dict[str, Any]:
    """Decode ms per token of each GGUF format and of ``llama-bench`` on the
    same file, alternated round by round: a shared machine's drift over the
    minutes a whole run takes moves both sides of each round's ratio alike."""
    formats = [fmt for fmt in runners if fmt.startswith("gguf")]
    ours: dict[str, list[float]] = {fmt: [] for fmt in formats}
    theirs: list[float] = []
    for _ in range(rounds):
        for fmt in formats:
            call = runners[fmt].verify_call(1)
            ours[fmt].append(statistics.median(_once_ms(call) for _ in range(PAIRED_CALLS)))
        theirs.append(llama_decode_ms(binary, gguf, threads, CONTEXT, PAIRED_CALLS))
    return {
        "rounds": rounds,
        "llama_cpp_ms": theirs,
        "ours_ms": ours,
        "ratios": {fmt: [a / b for a, b in zip(ours[fmt], theirs, strict=True)] for fmt in formats},
    }


@contextlib.contextmanager
def _block_kernel(setting: str | None) -> Iterator[None]:
    """Load under ``SPECRAY_BLOCK_KERNEL=setting`` (None: as set)."""
    if setting is None:
        yield
        return
    before = os.environ.get(SWITCH)
    os.environ[SWITCH] = setting
    try:
        yield
    finally:
        if before is None:
            del os.environ[SWITCH]
        else:
            os.environ[SWITCH] = before


def _load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=4, help="held-out prompts for agreement")
    parser.add_argument("--tokens", type=int, default=48, help="greedy tokens per prompt")
    parser.add_argument("--formats", default=f"fp32,bf16,gguf,{TORCH_GGUF}")
    parser.add_argument(
        "--llama-bench", type=Path, default=None, help="llama.cpp's llama-bench binary (optional)"
    )
    parser.add_argument(
        "--paired-rounds",
        type=int,
        default=5,
        help="rounds of decode alternated with llama-bench (with --llama-bench; 0: none)",
    )
    parser.add_argument("--skip-layers", action="store_true")
    parser.add_argument("--tag", default="", help="appended to the result files' names")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    gguf_path = fetch_gguf(args.model)
    model_dir = gguf_path.parent
    config = ModelConfig.from_pretrained(model_dir)
    cpu = read_cpu_features()
    result: dict[str, Any] = {
        "model": args.model,
        "gguf": gguf_path.name,
        "cpu": cpu.summary(),
        "threads": args.threads,
        "torch": torch.__version__,
        "load_average_start": _load_average(),
        "gguf_int4_share": int4_share(gguf_path),
    }
    if not args.skip_layers:
        result["layers_ms"] = time_layers(config, args.repeats)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p.prompt}], add_generation_prompt=True, tokenize=False
        )
        for p in load_prompts(["code_edit", "chat"], split="eval")[: args.prompts]
    ]
    prompts: list[list[int]] = [tokenizer(text)["input_ids"] for text in texts]
    formats = args.formats.split(",")
    runners: dict[str, Runner] = {}
    result["models"] = {}
    for fmt in formats:
        dtype, weights = MODELS[fmt]
        began = time.perf_counter()
        with _block_kernel(KERNEL_SETTING.get(fmt)):
            model = load_model(model_dir, dtype, weights=weights)
        if fmt == WEIGHT_ONLY_GGUF:
            use_int8_kernel(model, "weight_only")
        runners[fmt] = Runner(model)
        result["models"][fmt] = {
            "load_s": time.perf_counter() - began,
            "param_bytes": sum(
                p.numel() * p.element_size() for p in runners[fmt].model.parameters()
            ),
            "kernels": kernel_counts(model),
        }
    timings = time_models(runners, [t for p in prompts for t in p], args.repeats)
    # Teacher-forced along the first format's greedy continuations.
    references = [runners[formats[0]].greedy(p, args.tokens) for p in prompts]
    argmax = {
        fmt: [runner.argmax_along(p, ref) for p, ref in zip(prompts, references, strict=True)]
        for fmt, runner in runners.items()
    }
    for fmt in formats:
        entry = result["models"][fmt] | timings[fmt]
        entry["agreement"] = {
            other: agreement(argmax[fmt], argmax[other]) for other in formats if other != fmt
        }
        result["models"][fmt] = entry
        summary = {k: v for k, v in entry.items() if k not in ("verify_ms", "verify_cost_ratio")}
        print(f"{fmt}: {json.dumps(summary, default=str)}", flush=True)
    result["agreement_reference"] = formats[0]
    if args.llama_bench is not None and args.llama_bench.exists() and args.paired_rounds:
        result["paired_decode"] = paired_decode(
            runners, args.llama_bench, gguf_path, args.threads, args.paired_rounds
        )
    del runners
    if "layers_ms" in result:
        result["probe_recommendation"] = probe_line(result["layers_ms"], cpu, result)
    if args.llama_bench is None:
        result["llama_cpp"] = "not run: pass --llama-bench PATH to a llama-bench binary"
    elif not args.llama_bench.exists():
        result["llama_cpp"] = f"not run: {args.llama_bench} does not exist"
    else:
        result["llama_cpp"] = run_llama_bench(
            args.llama_bench, gguf_path, args.threads, CONTEXT, (1, 2, 5, 9, 17), args.repeats
        ).to_json()
    result["load_average_end"] = _load_average()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"kernels_{args.model}_{args.threads}t{args.tag}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str))
    (args.out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
