"""int8 weights' two CPU kernels: the per-token one against its definition
(activations rounded per row, exact integer product), its row independence
(a verify equals the decodes it replaces bit for bit), and the load-time
choice between it and the weight-only kernel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_gguf import write_tiny_qwen2

from specray.actors.model.loader import load_model
from specray.actors.parallel.block_kernel import SWITCH
from specray.actors.parallel.int8_kernels import choose_int8_kernels, measure_int8
from specray.actors.parallel.linear_weights import Int8Weights
from specray.actors.parallel.quantized import quantize_int8_per_channel
from specray.actors.parallel.row_kernels import ROW_COUNTS

CPU = torch.device("cpu")


def _weights(dtype: torch.dtype, kernel: str, rows: int = 40, cols: int = 96) -> Int8Weights:
    gen = torch.Generator().manual_seed(3)
    weights = Int8Weights(
        quantize_int8_per_channel(torch.randn(rows, cols, generator=gen)), dtype, CPU
    )
    weights.use_kernel(kernel)
    return weights


def _activations(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(rows, cols, generator=gen)
    x[:, 5] *= 40  # an outlier channel, as real activations have
    return x.to(dtype)


def test_per_token_rounds_each_row_then_multiplies_exactly() -> None:
    weights = _weights(torch.float32, "per_token")
    x = _activations(9, 96, torch.float32)
    row_scales = x.double().abs().amax(1, keepdim=True) / 127
    rounded = torch.round(x.double() / row_scales) * row_scales
    want = rounded @ weights.dequantize().double().t()
    got = weights(x)
    assert (got.double() - want).abs().max() <= 1e-6 * want.abs().max()
    # The rounding moves each activation at most half a step of its row.
    unrounded = x.double() @ weights.dequantize().double().t()
    bound = 0.5 * row_scales * weights.dequantize().double().abs().sum(1)
    assert ((got.double() - unrounded).abs() <= bound + 1e-6 * unrounded.abs().max()).all()
    assert (got.double() - unrounded).abs().max() > 0  # it does round


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_verify_equals_the_decodes_it_replaces_bit_for_bit(dtype: torch.dtype) -> None:
    weights = _weights(dtype, "per_token")
    x = _activations(17, 96, dtype)
    bias = torch.full((40,), 0.5, dtype=dtype)
    together = weights(x, bias=bias)
    for count in (1, 2, 9):
        assert torch.equal(weights(x[:count], bias=bias), together[:count])
    one_by_one = torch.cat([weights(row[None], bias=bias) for row in x])
    assert torch.equal(together, one_by_one)


def test_an_all_zero_row_gives_zeros_not_nans() -> None:
    weights = _weights(torch.float32, "per_token")
    x = _activations(3, 96, torch.float32)
    x[1] = 0
    out = weights(x)
    assert torch.equal(out[1], torch.zeros(40)) and out.isfinite().all()


def test_kernels_are_validated_and_switchable() -> None:
    weights = _weights(torch.float32, "weight_only")
    x = _activations(4, 96, torch.float32)
    exact = weights(x)
    weights.use_kernel("per_token")
    assert not torch.equal(weights(x), exact)
    weights.use_kernel("weight_only")
    assert torch.equal(weights(x), exact)
    with pytest.raises(ValueError, match=r"kernel must be one of .*'int4'"):
        weights.use_kernel("int4")


def test_measure_times_both_kernels_and_leaves_the_weight_alone() -> None:
    weights = _weights(torch.bfloat16, "weight_only", rows=256, cols=128)
    choice = measure_int8(weights, repeats=1)
    assert set(choice.ms) == {"weight_only", "per_token"}
    assert all(set(ms) == {1, *ROW_COUNTS} and min(ms.values()) > 0 for ms in choice.ms.values())
    faster_in_sum = sum(choice.ms["per_token"].values()) < sum(choice.ms["weight_only"].values())
    assert choice.kernel == "weight_only" or faster_in_sum
    assert weights.kernel == "weight_only"


def test_a_model_sets_every_int8_weight_of_a_shape_to_its_choice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SWITCH, "off")  # every wide block on int8, none on the block kernel
    model = load_model(write_tiny_qwen2(tmp_path), torch.bfloat16, weights="gguf")
    int8 = [m for m in model.modules() if isinstance(m, Int8Weights)]
    assert int8 and all(m.kernel == "weight_only" for m in int8)  # tiny: left alone at load
    choices = choose_int8_kernels(model, min_elements=0)
    assert set(choices) == {(m.out_features, m.in_features) for m in int8}
    assert all(m.kernel == choices[m.out_features, m.in_features].kernel for m in int8)
