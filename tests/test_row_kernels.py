"""The few-row matmul choice: every form gives the same product, and the
choice is measured per weight shape when a model loads."""

from __future__ import annotations

import pytest
import torch

from specray.actors.model.batch import ForwardBatch, SequenceInput
from specray.actors.model.decoder import DecoderModel
from specray.actors.model.loader import load_model
from specray.actors.parallel.linear_weights import DenseWeights
from specray.actors.parallel.packed_kernel import pack_dense
from specray.actors.parallel.row_kernels import ROW_COUNTS, choose_row_kernels, measure


def _packed_or_skip(weight: torch.Tensor) -> torch.Tensor:
    packed = pack_dense(weight)
    if packed is None:
        pytest.skip("oneDNN's packed matmul is not available for this CPU / dtype")
    return packed


def test_the_transposed_form_is_the_same_product() -> None:
    gen = torch.Generator().manual_seed(0)
    dense = DenseWeights(torch.randn(48, 32, generator=gen))
    bias = torch.randn(48, generator=gen)
    for shape in [(1, 32), (3, 32), (2, 5, 32)]:
        x = torch.randn(*shape, generator=gen)
        expected = torch.nn.functional.linear(x, dense.weight, bias)
        for rows in (0, 16):
            dense.transposed_rows = rows
            out = dense(x, bias)
            assert out.shape == expected.shape and out.is_contiguous()
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("keep_plain", [False, True])
def test_the_packed_form_is_the_same_weight(keep_plain: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(48, 32, generator=gen)
    bias = torch.randn(48, generator=gen)
    dense = DenseWeights(weight.clone())
    dense.use_packed(_packed_or_skip(dense.weight), keep_plain)
    assert dense.weight.numel() == (weight.numel() if keep_plain else 0)
    for shape in [(1, 32), (9, 32), (2, 5, 32), (300, 32)]:
        x = torch.randn(*shape, generator=gen)
        expected = torch.nn.functional.linear(x, weight, bias)
        torch.testing.assert_close(dense(x, bias), expected, rtol=1e-5, atol=1e-5)
        tail = dense.rows_from(x, 40, bias[40:])
        torch.testing.assert_close(tail, expected[..., 40:], rtol=1e-5, atol=1e-5)
    # The plain weight is still there to read, exactly, whether kept or unpacked.
    assert torch.equal(dense.dequantize(), weight)
    ids = torch.tensor([[3, 0, 47]])
    assert torch.equal(dense.rows(ids), weight[ids])
    assert torch.equal(dense.matrix(torch.float32), weight)  # from now on kept plain
    assert dense.weight.numel() == weight.numel()
    torch.testing.assert_close(dense(x, bias), expected, rtol=1e-5, atol=1e-5)
    dense.use_plain()
    assert dense.packed is None and torch.equal(dense.weight, weight)


def test_measure_times_every_form_at_every_row_count() -> None:
    dense = DenseWeights(torch.randn(256, 128))
    choice = measure(dense, repeats=1)
    assert set(choice.ms["linear"]) == {1, *ROW_COUNTS}
    assert set(choice.ms["transposed"]) == set(ROW_COUNTS)
    assert all(ms > 0 for form in choice.ms.values() for ms in form.values())
    assert choice.transposed_rows in (0, *ROW_COUNTS)
    if choice.packed:  # only ever chosen where it was timed at every count
        assert set(choice.ms["packed"]) == {1, *ROW_COUNTS}
    assert dense.packed is None and dense.transposed_rows == 0  # measuring changes nothing


def _logits(model: DecoderModel) -> torch.Tensor:
    batch = ForwardBatch.build([SequenceInput(0, [5, 9, 14, 2, 7], 0)])
    return model(batch, model.new_cache(1, 32)).logits


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_a_model_measures_each_weight_shape_once(tiny_dir_factory, family: str) -> None:  # type: ignore[no-untyped-def]
    model = load_model(tiny_dir_factory(family))
    dense = [m for m in model.modules() if isinstance(m, DenseWeights)]
    assert dense and all(m.transposed_rows == 0 and m.packed is None for m in dense)  # tiny
    before = _logits(model)
    choices = choose_row_kernels(model, min_elements=0)
    table = model.embed_tokens.weights
    tied = model.lm_head.weights is table
    measured = {
        (m.out_features, m.in_features, m.format_name) for m in dense if m is not table or tied
    }
    assert set(choices) == measured
    for m in dense:
        if m is table and not tied:
            assert m.packed is None  # an untied table only looks rows up
            continue
        choice = choices[(m.out_features, m.in_features, m.format_name)]
        assert m.transposed_rows == choice.transposed_rows
        assert (m.packed is not None) == choice.packed
        assert m.weight.numel() > 0 or m is not table  # a table keeps its rows
    torch.testing.assert_close(_logits(model), before, rtol=1e-4, atol=1e-4)
    for module in dense:  # whatever was measured, every form gives the same logits
        module.use_plain()
        module.transposed_rows = 8
    torch.testing.assert_close(_logits(model), before, rtol=1e-4, atol=1e-4)
    for module in dense:
        module.use_packed(_packed_or_skip(module.weight), keep_plain=module is table)
    torch.testing.assert_close(_logits(model), before, rtol=1e-4, atol=1e-4)
