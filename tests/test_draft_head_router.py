"""A draft head in the router's draft actors: real Ray on loopback, a tiny
fp32 target, an (untrained) head reading the hidden states that target rank 0
ships in bf16. Greedy output must equal target-only decoding."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from router_helpers import router_config, stream_all, target_only
from tiny_models import VOCAB

from specray.actors.drafting.head.checkpoint import init_from_target, load_frozen, save_head
from specray.actors.drafting.head.config import HeadConfig
from specray.actors.drafting.head.model import DraftHead
from specray.actors.drafting.spec import DrafterSpec
from specray.actors.engine.request import GenerationRequest
from specray.actors.model.config import ModelConfig
from specray.actors.sampling.params import StoppingCriteria
from specray.cluster.router import launch_router

RAY_CPUS = 4


def _save_head(model_dir: Path, directory: Path) -> Path:
    config = ModelConfig.from_pretrained(model_dir)
    vocab = torch.arange(20, VOCAB)
    torch.manual_seed(0)
    head = DraftHead(
        HeadConfig.for_target(str(model_dir), config, len(vocab), (0, 1, 2)),
        vocab,
        load_frozen(model_dir, vocab),
    )
    init_from_target(head, model_dir, config)
    return save_head(head, directory)


def _requests() -> list[GenerationRequest]:
    gen = torch.Generator().manual_seed(5)
    return [
        GenerationRequest(
            f"h{i}",
            torch.randint(3, VOCAB, (4 + 3 * i,), generator=gen).tolist(),
            stopping=StoppingCriteria(max_tokens=12 + 5 * i, ignore_eos=True),
        )
        for i in range(4)
    ]


async def _run_all(router: Any, requests: list[GenerationRequest]) -> list[Any]:
    return list(await asyncio.gather(*(stream_all(router, r) for r in requests)))


@pytest.mark.slow
def test_router_with_a_head_drafter_equals_target_only(
    local_ray: None,
    tiny_dir_factory,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    model_dir = tiny_dir_factory("qwen2")
    head_dir = _save_head(model_dir, tmp_path / "head")
    config = router_config(model_dir, DrafterSpec("head", str(head_dir)), adaptive=False, k=3)
    router = launch_router(config)
    try:
        requests = _requests()
        results = asyncio.run(_run_all(router, requests))
        got = {r.request_id: tokens for r, (tokens, _) in zip(requests, results, strict=True)}
        assert got == target_only(model_dir, requests)
        # The head only drafts once hidden states reach it, so drafts prove they did.
        assert sum(last.stats.draft_tokens for _, last in results) > 0
    finally:
        ray.get(router.shutdown.remote())
