"""The router on a real checkpoint (Qwen2.5-Coder-0.5B, fp32): greedy output
through Ray actors equals target-only decoding in one process, and the text
streams."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from transformers import AutoTokenizer

from specray.actors.engine.engine import EngineConfig, SpecEngine
from specray.actors.engine.request import GenerationRequest, RequestOutput
from specray.actors.engine.target import LocalTarget
from specray.actors.model.loader import load_model
from specray.actors.sampling.params import StoppingCriteria
from specray.actors.store.resolve import resolve_model
from specray.actors.workers.draft_worker import DraftWorkerSpec
from specray.cluster.draft_pool import DraftPoolConfig
from specray.cluster.local_ray import start_ray
from specray.cluster.router import RouterConfig, launch_router, open_stream
from specray.cluster.target_group import ShardedTargetConfig

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


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    info = start_ray(num_cpus=8)
    yield
    if info.started_here:
        ray.shutdown()


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
    target = LocalTarget(load_model(qwen_dir, "float32"), num_slots=4, max_len=256)
    engine = SpecEngine(target, None, tokenizer, (), EngineConfig(4, 0, adaptive=False))
    expected: dict[str, list[int]] = {r.request_id: [] for r in requests}
    texts: dict[str, str] = {r.request_id: "" for r in requests}
    for chunk in engine.generate(requests):
        expected[chunk.request_id] += chunk.token_ids
        texts[chunk.request_id] += chunk.text
    del engine, target

    config = RouterConfig(
        target=ShardedTargetConfig(
            str(qwen_dir), dtype="float32", num_slots=4, max_len=256, threads_per_shard=1
        ),
        draft=DraftPoolConfig(DraftWorkerSpec("ngram"), num_cpus=1),
        tokenizer_dir=str(qwen_dir),
    )
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
