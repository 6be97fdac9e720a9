"""Lossless speculative decoding on a quantized target: greedy output equals
the same quantized target decoding alone, token for token, on either int8
kernel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_gguf import VOCAB, write_tiny_qwen2

from specray.actors.drafting.base import Drafter
from specray.actors.drafting.draft_model import DraftModelDrafter
from specray.actors.drafting.ngram import NgramDrafter
from specray.actors.engine.engine import EngineConfig, SpecEngine
from specray.actors.engine.request import GenerationRequest
from specray.actors.engine.target import LocalTarget
from specray.actors.model.decoder import DecoderModel
from specray.actors.model.loader import load_model
from specray.actors.parallel.int8_kernels import use_int8_kernel
from specray.actors.parallel.linear_weights import INT8_KERNELS
from specray.actors.sampling.params import SamplingParams, StoppingCriteria

MAX_TOKENS = 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_qwen2(tmp_path_factory.mktemp("spec"))


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    prompts = []
    for length in (4, 9, 14):
        body = torch.randint(3, VOCAB, (length,), generator=gen).tolist()
        prompts.append(body + body[:4])  # a repeat, so n-gram lookup finds drafts
    return prompts


def _quantized(model_dir: Path, dtype: torch.dtype, int8_kernel: str) -> DecoderModel:
    model = load_model(model_dir, dtype, weights="gguf")
    use_int8_kernel(model, int8_kernel)
    return model


def _generate(
    model_dir: Path, dtype: torch.dtype, drafter: Drafter | None, k: int, int8_kernel: str
) -> list[list[int]]:
    target = LocalTarget(_quantized(model_dir, dtype, int8_kernel), num_slots=4, max_len=96)
    engine = SpecEngine(
        target,
        drafter,
        tokenizer=None,
        eos_token_ids=(),
        config=EngineConfig(max_batch=4, num_speculative_tokens=k),
    )
    stop = StoppingCriteria(max_tokens=MAX_TOKENS, ignore_eos=True)
    requests = [
        GenerationRequest(f"r{i}", p, SamplingParams(), stop) for i, p in enumerate(_prompts())
    ]
    outputs: dict[str, list[int]] = {r.request_id: [] for r in requests}
    for chunk in engine.generate(requests):
        outputs[chunk.request_id] += chunk.token_ids
    return [outputs[r.request_id] for r in requests]


@pytest.mark.parametrize("int8_kernel", INT8_KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("drafter_name", ["ngram", "draft=copy"])
def test_greedy_on_a_quantized_target_equals_target_only(
    model_dir: Path, dtype: torch.dtype, drafter_name: str, int8_kernel: str
) -> None:
    drafter: Drafter = (
        NgramDrafter(max_ngram=3)
        if drafter_name == "ngram"
        else DraftModelDrafter(_quantized(model_dir, dtype, int8_kernel), 4, 96)
    )
    alone = _generate(model_dir, dtype, None, 1, int8_kernel)
    assert all(len(tokens) == MAX_TOKENS for tokens in alone)
    assert _generate(model_dir, dtype, drafter, 5, int8_kernel) == alone
