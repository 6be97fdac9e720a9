"""Loading block-scaled FP8 checkpoints (as DeepSeek ships V3 and V4).

A tiny V4 is quantized here the way DeepSeek's releases are: linear weights
as ``float8_e4m3fn`` with one scale per block, named
``<module>.weight_scale_inv`` (float32, V3 style) or ``<module>.scale``
(``float8_e8m0fnu`` powers of two, V4 style); embeddings, the LM head,
norms, routers, hyper-connection parameters and the compressors' own
projections stay in full precision, as in V4-Flash.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_v4 import VOCAB, save_tiny_v4

from specray.actors.model.batch import ForwardBatch, SequenceInput
from specray.actors.model.decoder import DecoderModel
from specray.actors.model.loader import load_model
from specray.actors.parallel import fp8
from specray.actors.parallel.span import Span
from specray.actors.parallel.weights import WeightSource

KEPT = ("embed", "head.weight", "norm", "gate.weight", "compressor.wkv", "compressor.wgate")
KEPT += ("weights_proj", "wo_a")
STYLES = {
    # name: (block, scale suffix, scale dtype)
    "v3": ((16, 24), "weight_scale_inv", torch.float32),
    "v4": ((128, 128), "scale", torch.float8_e8m0fnu),
}


# Tiny V4 forwards are many small ops: one thread spares OpenMP's spinning.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def full_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every expert active and an indexer that keeps every entry: routing and
    entry selection are discrete choices that FP8 noise on random tiny
    weights would flip (a trained model's margins are far larger). Tied
    embeddings give the random model's greedy choices margins well above
    the FP8 error."""
    return save_tiny_v4(
        tmp_path_factory.mktemp("v4full"),
        seed=0,
        n_routed_experts=4,
        num_experts_per_tok=4,
        index_topk=64,
        tie_word_embeddings=True,
    )


def _quantize(src: Path, dst: Path, style: str) -> list[str]:
    """Write an FP8 copy of ``src`` to ``dst``; the names quantized."""
    block, suffix, scale_dtype = STYLES[style]
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
    }
    (dst / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(src / "model.safetensors"))
    quantized = []
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name.endswith(".weight") and tensor.dim() == 2 and not any(k in name for k in KEPT):
            weight, scale = fp8.quantize(tensor, block, power_of_two=style == "v4")
            out[name] = weight
            out[name.removesuffix("weight") + suffix] = scale.to(scale_dtype)
            quantized.append(name)
        else:
            out[name] = tensor
    save_file(out, str(dst / "model.safetensors"))
    return quantized


@pytest.fixture(scope="module", params=sorted(STYLES))
def fp8_dir(
    request: pytest.FixtureRequest, full_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str, list[str]]:
    dst = tmp_path_factory.mktemp(f"v4fp8{request.param}")
    return dst, request.param, _quantize(full_dir, dst, request.param)


def test_reads_dequantize_each_block(full_dir: Path, fp8_dir: tuple[Path, str, list[str]]) -> None:
    model_dir, style, names = fp8_dir
    block, suffix, _ = STYLES[style]
    assert len(names) > 40
    raw = load_file(str(model_dir / "model.safetensors"))
    original = load_file(str(full_dir / "model.safetensors"))
    with WeightSource(model_dir) as source:
        for name in names:
            weight, scale = raw[name], raw[name.removesuffix("weight") + suffix].float()
            expanded = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
            want = weight.float() * expanded[: weight.shape[0], : weight.shape[1]]
            got = source.read(name)
            assert torch.equal(got, want), name
            # Within e4m3's rounding: half a step of a 3-bit mantissa, or of
            # the subnormal spacing (2^-9 of the block scale) near zero.
            bound = torch.maximum(
                original[name].abs() * 2**-4, expanded[: got.shape[0], : got.shape[1]] * 2**-10
            )
            assert ((got - original[name]).abs() <= bound * 1.001).all(), name
            # Slices that cut through blocks equal slices of the whole.
            rows, cols = weight.shape
            assert torch.equal(source.read(name, Span(0, 5, rows - 3)), want[5 : rows - 3])
            assert torch.equal(source.read(name, Span(1, 7, cols - 1)), want[:, 7 : cols - 1])


def _greedy(model: DecoderModel, prompt: list[int], steps: int) -> tuple[list[int], float]:
    """Greedy continuation and its smallest top-1 / top-2 logit margin."""
    cache = model.new_cache(1, 64)
    slot = cache.allocate()
    tokens, margin, start, feed = [], float("inf"), 0, list(prompt)
    for _ in range(steps):
        logits = model(ForwardBatch.build([SequenceInput(slot, feed, start)]), cache).logits[0]
        top = logits.topk(2).values
        margin = min(margin, float(top[0] - top[1]))
        tokens.append(int(logits.argmax()))
        start += len(feed)
        feed = tokens[-1:]
    return tokens, margin


def test_greedy_equals_full_precision_where_margins_allow(
    full_dir: Path, fp8_dir: tuple[Path, str, list[str]]
) -> None:
    """The FP8 error is measured once, on the logits of a separate
    64-token sequence; prompts whose full-precision greedy continuation
    never has a top-1 / top-2 margin below three times that error are the
    ones FP8 must not change."""
    full, quantized = load_model(full_dir), load_model(fp8_dir[0])
    calibration = torch.randint(3, VOCAB, (64,), generator=torch.Generator().manual_seed(99))

    def logits(model: DecoderModel) -> torch.Tensor:
        cache = model.new_cache(1, 64)
        seq = SequenceInput(cache.allocate(), calibration.tolist(), 0, 64)
        return model(ForwardBatch.build([seq]), cache).logits

    error = (logits(full) - logits(quantized)).abs().max().item()
    assert 0 < error < 0.2 * logits(full).abs().max().item()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (8,), generator=gen).tolist() for _ in range(12)]
    chosen = 0
    for prompt in prompts:
        tokens, margin = _greedy(full, prompt, 6)
        if margin > 3 * error:
            chosen += 1
            assert _greedy(quantized, prompt, 6)[0] == tokens
    assert chosen >= len(prompts) // 2
