"""Low-bit weight formats: each kernel against the dense float32 matmul of
the weights it dequantizes to, and the mapping from stored codes to them."""

from __future__ import annotations

import pytest
import torch

from specray.actors.parallel.block_kernel import SWITCH, block_kernel_reason
from specray.actors.parallel.block_weights import BlockWeights
from specray.actors.parallel.linear_weights import (
    ConcatWeights,
    DenseWeights,
    Int4Weights,
    Int8Weights,
    linear_weights_from,
)
from specray.actors.parallel.quantized import (
    GroupAffine,
    quantize_int4_grouped,
    quantize_int8_per_channel,
    requantize_int8_per_channel,
)

CPU = torch.device("cpu")


def _signed_4bit(rows: int, cols: int, group: int, seed: int) -> GroupAffine:
    """Q4_0-like: codes -8..7, one fp16-valued scale per group, no offset."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-8, 8, (rows, cols), generator=gen, dtype=torch.int8)
    scales = (torch.rand(rows, cols // group, generator=gen) * 0.01).half().float()
    return GroupAffine(codes, scales, None, group, -8, 7, "Q4_0")


def _activations(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(7)).to(dtype)


def _reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.double() @ weight.double().t()


@pytest.mark.parametrize("rows", [1, 9, 17])
def test_int4_float32_matches_its_dequantized_matmul(rows: int) -> None:
    matrix = quantize_int4_grouped(torch.randn(48, 256), 32)  # 48: padded to 64 rows inside
    weights = Int4Weights(matrix, torch.float32, CPU)
    x = _activations(rows, 256, torch.float32)
    want = _reference(x, matrix.dequantize())
    got = weights(x)
    assert got.shape == (rows, 48)
    # Exact products, float32 sums of 256 terms.
    assert (got.double() - want).abs().max() <= 2e-6 * want.abs().max()
    assert torch.allclose(weights.dequantize(), matrix.dequantize(), rtol=0, atol=1e-6)


def test_int4_keeps_signed_codes_without_offset_exactly() -> None:
    matrix = _signed_4bit(32, 128, 64, seed=1)
    weights = Int4Weights(matrix, torch.float32, CPU)
    # zero = offset + 8 * scale - 8 * scale = 0 exactly: bit-identical weights.
    assert torch.equal(weights.dequantize(), matrix.dequantize())
    assert torch.equal(weights.scales_and_zeros[..., 1], torch.zeros(2, 32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_matches_its_dequantized_matmul(dtype: torch.dtype) -> None:
    matrix = quantize_int8_per_channel(torch.randn(40, 96))
    weights = Int8Weights(matrix, dtype, CPU)
    x = _activations(9, 96, dtype)
    want = _reference(x, weights.dequantize())
    got = weights(x, bias=torch.ones(40, dtype=dtype))
    tolerance = (2**-7 if dtype == torch.bfloat16 else 1e-6) * want.abs().max()
    assert (got.double() - 1 - want).abs().max() <= tolerance


def test_int4_bfloat16_rounds_scales_to_bfloat16() -> None:
    matrix = quantize_int4_grouped(torch.randn(32, 128), 32)
    weights = Int4Weights(matrix, torch.bfloat16, CPU)
    x = _activations(5, 128, torch.bfloat16)
    # The kernel's weights are the bf16-stored scale and zero applied to the codes.
    want = _reference(x, weights.dequantize())
    got = weights(x).double()
    assert (got - want).abs().max() <= 2**-7 * want.abs().max()
    scale_error = (weights.dequantize() - matrix.dequantize()).abs().max()
    assert 0 < scale_error <= 2**-8 * matrix.dequantize().abs().max() * 4


def test_int8_requantization_is_exact_for_one_scale_per_row() -> None:
    matrix = quantize_int8_per_channel(torch.randn(16, 64))
    again = requantize_int8_per_channel(matrix)
    assert torch.equal(again.codes, matrix.codes) and torch.equal(again.scales, matrix.scales)


def test_int8_requantization_of_grouped_codes_moves_values_at_most_half_a_step() -> None:
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(-16, 16, (24, 128), generator=gen, dtype=torch.int8)
    scales = torch.rand(24, 4, generator=gen) + 0.1
    matrix = GroupAffine(codes, scales, None, 32, -16, 15, "Q5_0")
    requantized = requantize_int8_per_channel(matrix)
    step = matrix.dequantize().abs().amax(dim=1, keepdim=True) / 127
    error = (requantized.dequantize() - matrix.dequantize()).abs()
    assert (error <= step * (0.5 + 1e-5)).all()  # ties land on half a step (float32 products)
    assert error.max() > 0  # grouped scales do not fit one scale per row


def test_formats_follow_the_stored_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    four = quantize_int4_grouped(torch.randn(16, 64), 32)  # with offsets: the int4 kernel
    symmetric = _signed_4bit(16, 64, 32, seed=4)  # Q4_0: the block kernel, where it runs
    eight = quantize_int8_per_channel(torch.randn(16, 64))
    dense = torch.randn(8, 64)
    blocks_here = block_kernel_reason() is None
    with monkeypatch.context() as patch:
        patch.setenv(SWITCH, "off")
        assert isinstance(linear_weights_from([four, four], torch.float32, CPU), Int4Weights)
    assert isinstance(
        linear_weights_from([symmetric], torch.float32, CPU),
        BlockWeights if blocks_here else Int4Weights,
    )
    assert isinstance(linear_weights_from([eight], torch.float32, CPU), Int8Weights)
    assert isinstance(linear_weights_from([dense], torch.float32, CPU), DenseWeights)
    mixed = linear_weights_from([symmetric, eight, dense], torch.float32, CPU)
    assert isinstance(mixed, ConcatWeights)
    names = [part.format_name for part in mixed.formats]
    assert names == ["q4/g32" if blocks_here else "int4/g32", "int8", "float32"]
    weight = torch.cat([symmetric.dequantize(), eight.dequantize(), dense])
    assert torch.equal(mixed.dequantize(), weight)
    if not blocks_here:  # the block kernel rounds activations: tests/test_block_weights.py
        x = _activations(3, 64, torch.float32)
        want = _reference(x, weight)
        assert (mixed(x).double() - want).abs().max() <= 2e-6 * want.abs().max()
