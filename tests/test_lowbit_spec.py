"""Lossless speculative decoding on a quantized target: greedy output equals
the same quantized target decoding alone, token for token, on the block
kernel and on either of torch's int8 kernels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from tiny_gguf import VOCAB, write_tiny_qwen2
from tiny_models import repeating_prompts

from specray.actors.drafting.base import Drafter
from specray.actors.drafting.build import build_drafter, resolve_drafter
from specray.actors.drafting.draft_model import DraftModelDrafter
from specray.actors.drafting.ngram import NgramDrafter
from specray.actors.drafting.spec import DrafterSpec
from specray.actors.engine.engine import EngineConfig, SpecEngine
from specray.actors.engine.request import GenerationRequest
from specray.actors.engine.target import AcceptedPath, LocalTarget, VerifyInput
from specray.actors.model.decoder import DecoderModel
from specray.actors.model.loader import load_model
from specray.actors.parallel.block_kernel import SWITCH, block_kernel_reason
from specray.actors.parallel.int8_kernels import use_int8_kernel
from specray.actors.parallel.linear_weights import INT8_KERNELS, Int4Weights, Int8Weights
from specray.actors.parallel.weight_format import LinearWeights
from specray.actors.sampling.params import SamplingParams, StoppingCriteria
from specray.actors.store.gguf_file import fetch_gguf
from specray.actors.workers.draft_worker import DraftWorkerSpec
from specray.bench.spec_bench import load_all
from specray.deploy.config import DrafterConfig

MAX_TOKENS = 20
BLOCKS = "blocks"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_qwen2(tmp_path_factory.mktemp("spec"))


def _prompts() -> list[list[int]]:
    return repeating_prompts(0, (4, 9, 14), VOCAB)


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


@pytest.mark.parametrize("kernel", [BLOCKS, *INT8_KERNELS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("drafter_name", ["ngram", "draft=copy"])
def test_greedy_on_a_quantized_target_equals_target_only(
    model_dir: Path,
    dtype: torch.dtype,
    drafter_name: str,
    kernel: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if kernel == BLOCKS:
        if block_kernel_reason() is not None:
            pytest.skip(f"block kernel: {block_kernel_reason()}")
        int8_kernel = "weight_only"  # unused: every block of this file is on the kernel
        on_blocks = load_model(model_dir, dtype, weights="gguf").modules()
        assert not any(isinstance(m, (Int8Weights, Int4Weights)) for m in on_blocks)
    else:
        monkeypatch.setenv(SWITCH, "off")
        int8_kernel = kernel
    drafter: Drafter = (
        NgramDrafter(max_ngram=3)
        if drafter_name == "ngram"
        else DraftModelDrafter(_quantized(model_dir, dtype, int8_kernel), 4, 96)
    )
    alone = _generate(model_dir, dtype, None, 1, int8_kernel)
    assert all(len(tokens) == MAX_TOKENS for tokens in alone)
    assert _generate(model_dir, dtype, drafter, 5, int8_kernel) == alone


@pytest.fixture(scope="module")
def real_gguf_model() -> DecoderModel:
    """Qwen2.5-Coder-0.5B's shipped GGUF, every matmul on the block kernel."""
    if block_kernel_reason() is not None:
        pytest.skip(f"block kernel: {block_kernel_reason()}")
    path = fetch_gguf("qwen2.5-coder-0.5b-instruct", progress=False)
    return load_model(path.parent, torch.bfloat16, weights="gguf")


@pytest.mark.real_model
@pytest.mark.slow
def test_real_file_verify_rows_equal_decodes_bit_for_bit(real_gguf_model: DecoderModel) -> None:
    """A 9-token verify's logits equal nine one-token decodes of the same
    tokens exactly, deep into a context, in bf16: what makes greedy
    speculation token-identical on this target, near-ties included."""
    target = LocalTarget(real_gguf_model, num_slots=2, max_len=400)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, 20000, (300,), generator=gen).tolist()
    tokens = torch.randint(100, 20000, (9,), generator=gen).tolist()
    target.verify([VerifyInput("verify", 0, prompt, 1)])
    verified = target.verify([VerifyInput("verify", len(prompt), tokens, len(tokens))])[0]
    target.verify([VerifyInput("decode", 0, prompt, 1)])
    decoded = [
        target.verify([VerifyInput("decode", len(prompt) + i, [token], 1)])[0]
        for i, token in enumerate(tokens)
    ]
    assert verified.logits is not None
    for i, one in enumerate(decoded):
        assert one.logits is not None
        assert torch.equal(verified.logits[i], one.logits[0]), f"row {i}"


@pytest.mark.real_model
@pytest.mark.slow
def test_real_file_trees_and_prefills_with_drafts_equal_decodes(
    real_gguf_model: DecoderModel,
) -> None:
    """The verify shapes a suffix drafter's rounds make, against one-token
    decodes of the same tokens, bit for bit: a prompt's prefill that carries
    a draft tree (first round), the accepted path a non-first branch, its
    cache entries moved into place before the next verify, which feeds two
    committed tokens."""
    target = LocalTarget(real_gguf_model, num_slots=2, max_len=600)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(100, 20000, (490,), generator=gen).tolist()
    seq = torch.randint(100, 20000, (5,), generator=gen).tolist()
    target.verify([VerifyInput("decode", 0, prompt, 1)])
    decoded = [
        target.verify([VerifyInput("decode", len(prompt) + i, [token], 1)])[0].logits
        for i, token in enumerate(seq)
    ]
    # Nodes: 0 a wrong first child, 1-2-4 the path seq[0:3], 3 a wrong sibling.
    drafts, parents = [5555, seq[0], seq[1], 7777, seq[2]], (-1, -1, 1, 1, 2)
    tree = VerifyInput("tree", 0, prompt + drafts, len(drafts) + 1, parents=parents)
    rows = target.verify([tree])[0].logits
    accepted = AcceptedPath(len(prompt), (1, 2, 4))
    after = VerifyInput("tree", len(prompt) + 3, seq[3:5], 2, accepted=accepted)
    next_rows = target.verify([after])[0].logits
    assert rows is not None and next_rows is not None
    path_rows = [rows[2], rows[3], rows[5], next_rows[0], next_rows[1]]
    for i, (row, one) in enumerate(zip(path_rows, decoded, strict=True)):
        assert one is not None
        assert torch.equal(row, one[0]), f"token {i}"


@pytest.mark.real_model
@pytest.mark.slow
def test_real_file_on_the_block_kernel_speculates_losslessly(
    real_gguf_model: DecoderModel,
) -> None:
    """Qwen2.5-Coder-0.5B's shipped GGUF, every matmul on the block kernel:
    n-gram speculation (k = 8) reproduces the target decoding alone."""
    model = real_gguf_model
    kinds = {type(m).__name__ for m in model.modules() if isinstance(m, LinearWeights)}
    assert "BlockWeights" in kinds and not kinds & {"Int8Weights", "Int4Weights"}
    # A prompt that repeats itself, so that n-gram lookup drafts.
    body = [16, 750, 2025, 220, 16, 1128, 220, 17, 701, 341, 262, 470, 264, 488, 293, 26]
    prompt = body * 3
    outputs = []
    for drafter, k in ((None, 1), (NgramDrafter(max_ngram=3), 8)):
        engine = SpecEngine(
            LocalTarget(model, num_slots=1, max_len=160),
            drafter,
            tokenizer=None,
            eos_token_ids=(),
            config=EngineConfig(max_batch=1, num_speculative_tokens=k),
        )
        stop = StoppingCriteria(max_tokens=40, ignore_eos=True)
        request = GenerationRequest("r", prompt, SamplingParams(), stop)
        outputs.append([t for chunk in engine.generate([request]) for t in chunk.token_ids])
    assert len(outputs[0]) == 40 and outputs[1] == outputs[0]


def test_a_draft_replica_runs_its_model_on_gguf_blocks(model_dir: Path) -> None:
    """``weights: gguf`` on a draft entry: the replica's draft model loads its
    GGUF blocks (on the block kernel where it runs), and drafting with it is
    still lossless."""
    spec = DraftWorkerSpec(
        drafter=resolve_drafter(DrafterSpec("model", str(model_dir)), weights="gguf"),
        num_slots=4,
        max_len=96,
        weights="gguf",
    )
    drafter = spec.build()
    assert isinstance(drafter, DraftModelDrafter)
    formats = {type(m).__name__ for m in drafter.model.modules()}
    want = "BlockWeights" if block_kernel_reason() is None else "Int4Weights"
    assert want in formats and "DenseWeights" not in formats
    alone = _generate(model_dir, torch.float32, None, 1, "weight_only")
    assert _generate(model_dir, torch.float32, drafter, 5, "weight_only") == alone


def test_the_spec_bench_loads_draft_models_on_their_gguf_blocks_when_asked(
    model_dir: Path,
    tiny_dir_factory,  # type: ignore[no-untyped-def]
) -> None:
    """``spec_bench --draft-weights gguf``: the in-process bench's draft
    models run their GGUF blocks, as a served draft entry's do, while the
    target keeps its own format; the default stays dense."""
    target_dir = tiny_dir_factory("qwen2")
    blocks = "BlockWeights" if block_kernel_reason() is None else "Int4Weights"

    def formats(model: torch.nn.Module) -> set[str]:
        return {type(m).__name__ for m in model.modules() if isinstance(m, LinearWeights)}

    loaded = load_all(target_dir, {"draft": model_dir}, "float32", False, draft_weights="gguf")
    assert blocks in formats(loaded.drafts["draft"])
    assert "DenseWeights" not in formats(loaded.drafts["draft"])
    assert formats(loaded.target) == {"DenseWeights"}
    dense = load_all(target_dir, {"draft": target_dir}, "float32", False)
    assert formats(dense.drafts["draft"]) == {"DenseWeights"}


def test_weights_are_refused_for_drafters_without_a_model() -> None:
    with pytest.raises(ValueError, match="weights='gguf' is for a draft model"):
        build_drafter(DrafterSpec("ngram"), "float32", 1, 64, weights="gguf")
    with pytest.raises(ValidationError, match="weights: 'gguf' is for a draft model"):
        DrafterConfig.model_validate({"kind": "suffix", "weights": "gguf"})
    assert DrafterConfig.model_validate({"kind": "hybrid", "model": "x", "weights": "gguf"})
