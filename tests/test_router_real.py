"""The router on a real checkpoint (Qwen2.5-Coder-0.5B, fp32): greedy output
through Ray actors equals Hugging Face ``generate()``, and the text streams."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import ray
from references import hf_greedy
from router_helpers import router_config
from transformers import AutoTokenizer

from specray.actors.drafting.spec import DrafterSpec
from specray.actors.engine.request import GenerationRequest, RequestOutput
from specray.actors.sampling.params import StoppingCriteria
from specray.actors.store.resolve import resolve_model
from specray.cluster.router import launch_router, open_stream

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

PROMPTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "The three primary colours are",
    "for i in range(10):\n    print(i)\nfor j in range(10):\n",
]
MAX_TOKENS = 20


@pytest.fixture(scope="module")
def qwen_dir() -> Path:
    return resolve_model("qwen2.5-coder-0.5b-instruct", progress=False)


def test_router_greedy_equals_target_only_on_qwen(local_ray: None, qwen_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(qwen_dir)
    requests = [
        GenerationRequest(
            f"q{i}",
            tokenizer(text)["input_ids"],
            stopping=StoppingCriteria(max_tokens=MAX_TOKENS, ignore_eos=True),
        )
        for i, text in enumerate(PROMPTS)
    ]
    reference = hf_greedy(qwen_dir, [r.prompt_ids for r in requests], MAX_TOKENS)
    expected = {r.request_id: ids for r, ids in zip(requests, reference, strict=True)}
    texts = {rid: tokenizer.decode(ids) for rid, ids in expected.items()}
    # Not profiled: timing verifies of up to 128 tokens on a 2-core CI machine
    # takes minutes and is not what this test checks (test_router.py does).
    # Fixed speculation: every round verifies the copies, so the speculative
    # path is what is checked, whatever the budget would choose on this machine.
    config = router_config(
        qwen_dir, DrafterSpec("ngram"), num_slots=4, max_len=256, profile=False, adaptive=False
    )
    assert config.tokenizer_dir is not None  # streams text
    router = launch_router(config)

    async def one(request: GenerationRequest) -> tuple[list[int], str, RequestOutput]:
        tokens, text, last = [], "", None
        async for ref in open_stream(router, request):
            last = await ref
            tokens += last.token_ids
            text += last.text
        assert last is not None
        return tokens, text, last

    async def run_all() -> list[tuple[list[int], str, RequestOutput]]:
        return await asyncio.gather(*(one(r) for r in requests))

    try:
        results = asyncio.run(run_all())
    finally:
        ray.get(router.shutdown.remote())
    assert {r.request_id: t for r, (t, _, _) in zip(requests, results, strict=True)} == expected
    assert {r.request_id: s for r, (_, s, _) in zip(requests, results, strict=True)} == texts
    assert all(last.finish_reason == "length" for _, _, last in results)
    # The repetitive prompt gives n-gram lookup something to find.
    assert sum(last.stats.accepted_tokens for _, _, last in results) > 0
