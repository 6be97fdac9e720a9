"""The model core and speculative engine on a real checkpoint (Qwen2.5-Coder-0.5B,
fp32), fetched into the offline store on first use."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from decode_helpers import cached_greedy
from references import hf_greedy
from transformers import AutoModelForCausalLM, AutoTokenizer

from specray.actors.drafting.ngram import NgramDrafter
from specray.actors.engine.engine import EngineConfig, SpecEngine
from specray.actors.engine.request import GenerationRequest
from specray.actors.engine.target import LocalTarget
from specray.actors.model.loader import load_model
from specray.actors.sampling.params import StoppingCriteria
from specray.actors.store.resolve import resolve_model

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

PROMPT = (
    "def fibonacci(n):\n"
    '    """Return the n-th Fibonacci number."""\n'
    "    if n < 2:\n"
    "        return n\n"
)


@pytest.fixture(scope="module")
def qwen_dir() -> Path:
    return resolve_model("qwen2.5-coder-0.5b-instruct", progress=False)


def test_logits_and_greedy_match_transformers(qwen_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(qwen_dir)
    ids = tokenizer(PROMPT)["input_ids"]
    hf = AutoModelForCausalLM.from_pretrained(qwen_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref_logits = hf(torch.tensor([ids])).logits[0]
        ref_tokens = hf.generate(
            torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None
        )[0, len(ids) :].tolist()
    del hf

    model = load_model(qwen_dir, torch.float32)
    greedy = cached_greedy(model, ids, 16, max_len=128, prompt_rows=len(ids))
    scale = ref_logits.abs().max().item()
    assert (greedy.prompt_logits - ref_logits).abs().max().item() <= 1e-4 * scale
    assert torch.equal(greedy.prompt_logits.argmax(-1), ref_logits.argmax(-1))
    assert greedy.tokens == ref_tokens


def test_speculative_greedy_equals_target_only(qwen_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(qwen_dir)
    model = load_model(qwen_dir, torch.float32)
    prompts = [
        tokenizer(PROMPT)["input_ids"],
        tokenizer("Rewrite in snake_case: fooBar, bazQux, fooBar, helloWorld")["input_ids"],
    ]

    def run(drafter: NgramDrafter | None, k: int) -> list[list[int]]:
        engine = SpecEngine(
            LocalTarget(model, 2, 256),
            drafter,
            tokenizer,
            eos_token_ids=(),
            config=EngineConfig(max_batch=2, num_speculative_tokens=k, adaptive=False),
        )
        requests = [
            GenerationRequest(f"r{i}", p, stopping=StoppingCriteria(max_tokens=24, ignore_eos=True))
            for i, p in enumerate(prompts)
        ]
        out: dict[str, list[int]] = {r.request_id: [] for r in requests}
        for chunk in engine.generate(requests):
            out[chunk.request_id] += chunk.token_ids
        return [out["r0"], out["r1"]]

    reference = hf_greedy(qwen_dir, prompts, 24)
    assert run(None, 0) == reference
    assert run(NgramDrafter(), 4) == reference
