"""A DeepSeek-V4 target served like any other: `specray generate` with the
checkpoint's MTP block as the drafter, and the router (Ray actors on
loopback) with n-gram, MTP, hybrid and DSpark draft replicas. Greedy output equals a
no-cache loop over the model; nothing in the router knows it is V4."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch
from references import greedy_reference
from router_helpers import MAX_LEN, router_config, run_all, wait_idle
from serving_helpers import MODEL_VOCAB, save_tokenizer
from tiny_v4 import save_tiny_v4, save_v4_dspark

from specray.actors.drafting.spec import DrafterSpec
from specray.actors.engine.request import GenerationRequest
from specray.actors.sampling.params import StoppingCriteria
from specray.cluster.router import launch_router

MAX_TOKENS = 16


@pytest.fixture(scope="module")
def v4_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny V4 with an MTP block and a tokenizer, as a user would serve it."""
    directory = save_tiny_v4(
        tmp_path_factory.mktemp("v4served"), seed=3, mtp=True, vocab_size=MODEL_VOCAB
    )
    save_tokenizer(directory)
    return directory


def _requests() -> list[GenerationRequest]:
    gen = torch.Generator().manual_seed(11)
    requests = []
    for i in range(3):
        body = torch.randint(3, MODEL_VOCAB, (5 + 9 * i,), generator=gen).tolist()
        requests.append(
            GenerationRequest(
                f"v{i}",
                body + body[:6],  # a repeat for the lookups
                stopping=StoppingCriteria(max_tokens=MAX_TOKENS, ignore_eos=True),
            )
        )
    return requests


@pytest.mark.slow
def test_generate_drafts_with_the_checkpoints_mtp_block(v4_dir: Path) -> None:
    prompt = "def add(a, b):\n    return a + b\n"
    outputs = {}
    for draft in ("none", "mtp"):
        flags = ["--target", str(v4_dir), "--draft", draft, "--dtype", "float32"]
        flags += ["--max-tokens", str(MAX_TOKENS), "--ignore-eos", "--json", "--fixed-k"]
        proc = subprocess.run(
            [sys.executable, "-m", "specray.deploy.cli", "generate", *flags, "--prompt", prompt],
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )
        outputs[draft] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outputs["mtp"]["token_ids"] == outputs["none"]["token_ids"]
    assert len(outputs["mtp"]["token_ids"]) == MAX_TOKENS
    assert outputs["mtp"]["stats"]["draft_tokens"] > 0  # the MTP block did draft


@pytest.mark.slow
@pytest.mark.parametrize("draft", ["ngram", "mtp", "hybrid", "dspark"])
def test_router_serves_a_v4_target_losslessly(
    local_ray: None, v4_dir: Path, tmp_path_factory: pytest.TempPathFactory, draft: str
) -> None:
    if draft == "dspark":  # its drafter takes the mtp.* names the MTP block has in v4_dir
        v4_dir = save_v4_dspark(tmp_path_factory.mktemp("v4dspark"), seed=3, vocab_size=MODEL_VOCAB)
    spec = {
        "ngram": DrafterSpec("ngram", max_ngram=3),
        "mtp": DrafterSpec("mtp"),
        # The draft model: another random V4 with the same vocabulary.
        "hybrid": DrafterSpec(
            "hybrid",
            str(save_tiny_v4(tmp_path_factory.mktemp("v4draft"), seed=9, vocab_size=MODEL_VOCAB)),
            max_ngram=3,
        ),
        "dspark": DrafterSpec("dspark", str(v4_dir)),
    }[draft]
    requests = _requests()
    router = launch_router(router_config(v4_dir, spec, adaptive=False, k=3, max_len=MAX_LEN))
    try:
        got = asyncio.run(run_all(router, requests))
        state = wait_idle(router)
    finally:
        ray.get(router.shutdown.remote())
    prompts = {r.request_id: r.prompt_ids for r in requests}
    assert got == greedy_reference(v4_dir, prompts, MAX_TOKENS)
    assert all(d.tracked == 0 for d in state.drafts)
