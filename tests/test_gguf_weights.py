"""GGUF blocks read without going through a dense copy: decoded values equal
``gguf``'s own dequantizer, slices read only their blocks, and a model loaded
from the blocks computes what its dequantized weights compute."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from tiny_gguf import MIXED_TYPES, random_blocks, write_tiny_qwen2

from specray.actors.engine.target import LocalTarget, VerifyInput
from specray.actors.model.config import ModelConfig
from specray.actors.model.decoder import DecoderModel
from specray.actors.model.gguf_index import GGUFIndex
from specray.actors.model.gguf_source import GGUFWeightSource, int4_share
from specray.actors.model.loader import load_model
from specray.actors.parallel.block_kernel import SWITCH, block_kernel_reason
from specray.actors.parallel.block_weights import BlockWeights
from specray.actors.parallel.embedding_rows import GroupRows
from specray.actors.parallel.gguf_blocks import DECODERS, decode_blocks
from specray.actors.parallel.linear_weights import (
    ConcatWeights,
    DenseWeights,
    Int4Weights,
    Int8Weights,
    LinearWeights,
)
from specray.actors.parallel.quantized import GroupAffine
from specray.actors.parallel.span import Span
from specray.actors.store.gguf_file import fetch_gguf

PROMPT = [5, 17, 42, 8, 99, 3, 150, 61]
ALL_4BIT = {role: Q.Q4_0 for role in MIXED_TYPES} | {
    "attn_output": Q.Q4_K,
    "ffn_down": Q.Q4_K,
    "ffn_up": Q.Q4_1,
}


@pytest.mark.parametrize("qtype", sorted(DECODERS, key=lambda q: q.name))
def test_decoded_blocks_equal_gguf_dequantizer(qtype: Q) -> None:
    rng = np.random.default_rng(int(qtype))
    raw = random_blocks(qtype, 6, 512, rng, magnitude=2.0)
    want = gguf.quants.dequantize(raw, qtype)
    got = decode_blocks(torch.from_numpy(raw), qtype)
    assert got.shape == (6, 512)
    assert torch.equal(got.dequantize(), torch.from_numpy(want))


def test_index_finds_every_tensor_where_gguf_reader_does(tmp_path: Path) -> None:
    path = tmp_path / "meta.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_token_list(["a", "ü", "<|x|>"] * 50)  # string arrays to skip
    writer.add_token_scores([0.5] * 150)
    writer.add_bool("test.flag", True)
    writer.add_float64("test.f64", 1.5)
    writer.add_array("test.ints", [1, 2, 3])
    writer.add_custom_alignment(64)
    rng = np.random.default_rng(0)
    writer.add_tensor("a.weight", rng.standard_normal((3, 5)).astype(np.float32))
    writer.add_tensor("b.weight", rng.standard_normal((7,)).astype(np.float16))
    writer.add_tensor("c.weight", random_blocks(Q.Q8_0, 4, 64, rng), raw_dtype=Q.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    index = GGUFIndex(path)
    assert index.architecture == "llama"
    reader = gguf.GGUFReader(path)
    assert set(index.tensors) == {tensor.name for tensor in reader.tensors}
    for tensor in reader.tensors:
        ours = index.data(index.tensors[tensor.name])
        assert ours.dtype == tensor.data.dtype and np.array_equal(ours, tensor.data)


class DenseGGUF(GGUFWeightSource):
    """The same file read dense (float32, as ``gguf`` dequantizes it): the
    reference a quantized load is compared against."""

    def read_quantized(self, name: str, span: Span | None = None) -> GroupAffine | None:
        return None


def _source(model_dir: Path, cls: type[GGUFWeightSource] = GGUFWeightSource) -> GGUFWeightSource:
    return cls(model_dir / "model.gguf", ModelConfig.from_pretrained(model_dir))


@pytest.fixture
def torch_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """GGUF blocks on torch's kernels (per-channel int8, int4), not the block
    kernel, which rounds activations (tests/test_block_weights.py)."""
    monkeypatch.setenv(SWITCH, "off")


needs_block_kernel = pytest.mark.skipif(
    block_kernel_reason() is not None, reason=f"block kernel: {block_kernel_reason()}"
)


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_qwen2(tmp_path_factory.mktemp("mixed"))


@pytest.fixture(scope="module")
def four_bit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_qwen2(tmp_path_factory.mktemp("four_bit"), ALL_4BIT, seed=1)


def test_slices_decode_only_their_blocks(mixed_dir: Path) -> None:
    source = _source(mixed_dir)
    full = source.read("model.layers.0.mlp.down_proj.weight")  # Q4_K, 256-wide blocks
    # Half a super-block: its shared fp16 scales are read, half its groups kept.
    right = source.read_quantized("model.layers.0.mlp.down_proj.weight", Span(1, 384, 512))
    assert right is not None and right.kind == "Q4_K" and right.shape == (256, 128)
    assert torch.equal(right.dequantize(), full[:, 384:512])
    rows = source.read_quantized("model.layers.0.mlp.up_proj.weight", Span(0, 100, 164))  # Q5_K
    assert rows is not None
    assert torch.equal(rows.dequantize(), source.read("model.layers.0.mlp.up_proj.weight")[100:164])
    with pytest.raises(ValueError, match="whole groups"):
        source.read_quantized("model.layers.0.mlp.down_proj.weight", Span(1, 0, 100))
    assert source.read_quantized("model.norm.weight") is None
    assert "lm_head.weight" in source and "model.layers.5.mlp.up_proj.weight" not in source


def _formats(model: DecoderModel) -> dict[str, str]:
    layer = model.blocks[0]
    return {
        "qkv": layer.self_attn.qkv_proj.weights.format_name,
        "o": layer.self_attn.o_proj.weights.format_name,
        "gate_up": layer.mlp.gate_up_proj.weights.format_name,
        "down": layer.mlp.down_proj.weights.format_name,
        "embed": model.embed_tokens.weights.format_name,
        "head": model.lm_head.weights.format_name,
    }


@needs_block_kernel
def test_symmetric_blocks_run_as_stored(mixed_dir: Path) -> None:
    model = load_model(mixed_dir, torch.float32, weights="gguf")
    assert _formats(model) == {
        "qkv": "q5/g32+q8/g32+q4+offset/g32",  # Q5_0, Q8_0, then Q4_1 rows
        "o": "q4+offset/g32",  # Q4_K
        "gate_up": "q4/g32+q5+offset/g32",  # Q4_0 rows, then Q5_K rows
        "down": "q4+offset/g32",
        "embed": "rows/Q5_0",
        "head": "q6/g16",  # Q6_K
    }
    # The model computes what its weights compute on activations rounded per
    # block of 32 before every block matmul.
    reference = _rounded_activations_copy(
        _dequantized_copy(load_model(mixed_dir, torch.float32, weights="gguf"), keep_blocks=True)
    )
    assert _close(_logits(model), _logits(reference), 1e-5)
    assert _greedy(model) == _greedy(reference)


def test_layers_keep_the_formats_the_file_holds(mixed_dir: Path, torch_kernels: None) -> None:
    model = load_model(mixed_dir, torch.float32, weights="gguf")
    assert _formats(model) == {
        "qkv": "int8+int4/g32",  # Q5_0 and Q8_0 rows, then Q4_1 rows
        "o": "int4/g32",
        "gate_up": "int4/g32+int8",  # Q4_0 rows, then Q5_K rows
        "down": "int4/g32",
        "embed": "rows/Q5_0",
        "head": "int8",
    }
    assert isinstance(model.embed_tokens.weights, GroupRows)
    assert isinstance(model.lm_head.weights, Int8Weights)
    qkv = model.blocks[0].self_attn.qkv_proj.weights
    assert isinstance(qkv, ConcatWeights)
    # The embedding rows are the file's values exactly.
    rows = model.embed_tokens(torch.tensor([0, 7, 159]))
    want = _source(mixed_dir, DenseGGUF).read("model.embed_tokens.weight")[[0, 7, 159]]
    assert torch.equal(rows, want)


def _dequantized_copy(model: DecoderModel, keep_blocks: bool = False) -> DecoderModel:
    """``model`` with every low-bit matmul replaced by a dense float32 one of
    the weights it dequantizes to (block matmuls too, unless ``keep_blocks``)."""
    for module in list(model.modules()):
        weights = getattr(module, "weights", None)
        if isinstance(weights, LinearWeights) and not isinstance(weights, DenseWeights):
            if keep_blocks and _has_blocks(weights):
                continue
            module.weights = DenseWeights(weights.dequantize())
    return model


def _has_blocks(weights: LinearWeights) -> bool:
    parts = weights.formats if isinstance(weights, ConcatWeights) else [weights]
    return any(isinstance(part, BlockWeights) for part in parts)


class _RoundedDense(DenseWeights):
    """A dense float32 matmul of activations rounded as the block kernel
    rounds them: int8 per block of 32, max |x| -> 127, half to even."""

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        blocks = x.float().reshape(*x.shape[:-1], -1, 32)
        scales = blocks.abs().amax(dim=-1, keepdim=True) / 127
        codes = torch.round(blocks / torch.where(scales > 0, scales, torch.ones_like(scales)))
        return super().forward((codes * scales).reshape(x.shape), bias)


def _rounded_activations_copy(model: DecoderModel) -> DecoderModel:
    """Every remaining block matmul of ``model`` (a ConcatWeights keeps its
    parts) replaced by :class:`_RoundedDense` of its weights."""
    for module in list(model.modules()):
        weights = getattr(module, "weights", None)
        if isinstance(weights, BlockWeights):
            module.weights = _RoundedDense(weights.dequantize())
        elif isinstance(weights, ConcatWeights):
            parts = [
                _RoundedDense(part.dequantize())
                if isinstance(part, BlockWeights)
                else DenseWeights(part.dequantize())
                for part in weights.formats
            ]
            module.weights = ConcatWeights(parts)
    return model


def _logits(model: DecoderModel) -> torch.Tensor:
    target = LocalTarget(model, num_slots=1, max_len=64)
    (out,) = target.verify([VerifyInput("a", 0, PROMPT, len(PROMPT))])
    assert out.logits is not None
    return out.logits


def _greedy(model: DecoderModel, steps: int = 12) -> list[int]:
    target = LocalTarget(model, num_slots=1, max_len=64)
    tokens: list[int] = []
    start, new = 0, list(PROMPT)
    for _ in range(steps):
        (out,) = target.verify([VerifyInput("g", start, new, 1)])
        tokens.append(int(out.greedy_ids()[-1]))
        start, new = start + len(new), tokens[-1:]
    return tokens


def _close(got: torch.Tensor, want: torch.Tensor, relative: float) -> bool:
    return bool((got - want).abs().max() <= relative * want.abs().max())


def test_quantized_model_equals_its_dequantized_weights(
    mixed_dir: Path, torch_kernels: None
) -> None:
    quantized = load_model(mixed_dir, torch.float32, weights="gguf")
    dense = _dequantized_copy(load_model(mixed_dir, torch.float32, weights="gguf"))
    assert _close(_logits(quantized), _logits(dense), 1e-5)
    assert _greedy(quantized) == _greedy(dense)


def test_tied_head_multiplies_by_the_embeddings_codes(tmp_path: Path, torch_kernels: None) -> None:
    model_dir = write_tiny_qwen2(tmp_path, ALL_4BIT | {"token_embd": Q.Q8_0}, tied=True)
    quantized = load_model(model_dir, torch.float32, weights="gguf")
    assert _formats(quantized)["embed"] == "rows/Q8_0"
    assert _formats(quantized)["head"] == "int8"  # Q8_0's 32-wide scales, one per row now
    reference = DecoderModel(ModelConfig.from_pretrained(model_dir), torch.float32)
    with _source(model_dir, DenseGGUF) as source:
        reference.load(source)
    # Rows looked up exactly; the head re-quantized per row.
    assert torch.equal(
        quantized.embed_tokens(torch.arange(160)), reference.embed_tokens(torch.arange(160))
    )
    head = quantized.lm_head.weights.dequantize()
    table = reference.embed_tokens.weights.dequantize()
    step = table.abs().amax(dim=1, keepdim=True) / 127
    assert ((head - table).abs() <= step * (0.5 + 1e-5)).all()
    assert _close(_logits(quantized), _logits(_dequantized_copy(quantized)), 1e-5)


def test_four_bit_file_loads_exactly_in_float32(four_bit_dir: Path, torch_kernels: None) -> None:
    """4-bit blocks keep their codes: in float32 the model computes with the
    file's values (up to one rounding of each group's zero point)."""
    quantized = load_model(four_bit_dir, torch.float32, weights="gguf")
    reference = DecoderModel(ModelConfig.from_pretrained(four_bit_dir), torch.float32)
    with _source(four_bit_dir, DenseGGUF) as source:
        reference.load(source)
    assert all(name.startswith("int4") or "rows" in name for name in _formats(quantized).values())
    assert _close(_logits(quantized), _logits(reference), 1e-5)
    assert _greedy(quantized) == _greedy(reference)


def test_bfloat16_load_stays_close_to_the_file(mixed_dir: Path) -> None:
    quantized = load_model(mixed_dir, torch.bfloat16, weights="gguf")
    reference = DecoderModel(ModelConfig.from_pretrained(mixed_dir), torch.float32)
    with _source(mixed_dir, DenseGGUF) as source:
        reference.load(source)
    got, want = _logits(quantized), _logits(reference)
    assert got.dtype == torch.float32
    # bf16 activations and scales, and int8 rows re-quantized per channel.
    assert _close(got, want, 0.05)


def test_load_model_needs_the_gguf_file(tmp_path: Path, mixed_dir: Path) -> None:
    (tmp_path / "config.json").write_bytes((mixed_dir / "config.json").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"no \.gguf"):
        load_model(tmp_path, weights="gguf")
    with pytest.raises(ValueError, match="weights must be one of"):
        load_model(mixed_dir, weights="int3")


def test_int4_share_counts_matmul_parameters_in_4bit_blocks(
    mixed_dir: Path, four_bit_dir: Path
) -> None:
    # Mixed file, per layer: o (256x256), gate (512x256), down (256x512) and
    # v (128x256) are 4-bit, of q, k, v, o, gate, up, down; plus the head.
    per_layer = 256 * 256 + 512 * 256 + 256 * 512 + 128 * 256
    total = 2 * (256 * 256 * 2 + 128 * 256 * 2 + 512 * 256 * 3) + 160 * 256
    assert int4_share(mixed_dir / "model.gguf") == 2 * per_layer / total
    assert int4_share(four_bit_dir / "model.gguf") == 1.0


def test_int4_weights_are_packed_per_rank(mixed_dir: Path, torch_kernels: None) -> None:
    model = load_model(mixed_dir, torch.float32, weights="gguf")
    down = model.blocks[1].mlp.down_proj.weights
    assert isinstance(down, Int4Weights)
    assert down.packed.dtype == torch.uint8 and down.packed.numel() == 256 * 512 // 2


@pytest.mark.real_model
def test_real_file_blocks_equal_gguf_dequantizer() -> None:
    """A few rows of one tensor of every type in the shipped 0.5B file (Q5_0,
    Q8_0, Q4_K, Q6_K), and a TP=2 column half of a K-quant tensor."""
    path = fetch_gguf("qwen2.5-coder-0.5b-instruct", progress=False)
    source = GGUFWeightSource(path, ModelConfig.from_pretrained(path.parent))
    index = GGUFIndex(path)
    names = {
        Q.Q5_0: "model.layers.0.mlp.up_proj.weight",
        Q.Q8_0: "lm_head.weight",
        Q.Q6_K: "model.layers.0.mlp.down_proj.weight",
        Q.Q4_K: "model.layers.11.mlp.down_proj.weight",
    }
    for qtype, name in names.items():
        assert source.quant_type(name) == qtype
        info = index.tensors[source.gguf_name(name) or ""]
        raw = np.array(index.data(info)[:64])
        want = torch.from_numpy(gguf.quants.dequantize(raw, qtype))
        got = source.read_quantized(name, Span(0, 0, 64))
        assert got is not None and torch.equal(got.dequantize(), want), qtype.name
    half = source.read_quantized("model.layers.11.mlp.down_proj.weight", Span(1, 2432, 4864))
    assert half is not None and half.shape == (896, 2432)
    rows = np.array(index.data(index.tensors["blk.11.ffn_down.weight"])[:16])
    want = torch.from_numpy(gguf.quants.dequantize(rows, Q.Q4_K))[:, 2432:]
    assert torch.equal(half.narrow(0, 0, 16).dequantize(), want)
