"""The few-row matmul choice: both forms give the same product, and the
choice is measured per weight shape when a model loads."""

from __future__ import annotations

import torch

from specray.actors.model.batch import ForwardBatch, SequenceInput
from specray.actors.model.loader import load_model
from specray.actors.parallel.linear_weights import DenseWeights
from specray.actors.parallel.row_kernels import ROW_COUNTS, choose_row_kernels


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


def test_a_model_measures_each_weight_shape_once(tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    model = load_model(tiny_dir_factory("qwen2"))
    dense = [m for m in model.modules() if isinstance(m, DenseWeights)]
    assert dense and all(m.transposed_rows == 0 for m in dense)  # tiny: left alone
    cache = model.new_cache(1, 32)
    batch = ForwardBatch.build([SequenceInput(0, [5, 9, 14, 2, 7], 0)])
    before = model(batch, cache).logits
    choices = choose_row_kernels(model, min_elements=0)
    shapes = {(m.out_features, m.in_features, m.format_name) for m in dense}
    assert set(choices) == shapes
    assert all(rows in (0, *ROW_COUNTS) for rows in choices.values())
    assert all(
        m.transposed_rows == choices[(m.out_features, m.in_features, m.format_name)] for m in dense
    )
    for module in dense:  # whatever was measured, the transposed form gives the same logits
        module.transposed_rows = 8
    after = model(batch, model.new_cache(1, 32)).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
