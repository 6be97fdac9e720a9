"""The CPU grouped-query attention path against torch's fused kernel, and
the packed / padded layouts of a forward batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from specray.actors.model import attend as attend_module
from specray.actors.model.attend import attend
from specray.actors.model.batch import ForwardBatch, SequenceInput


def _case(
    dtype: torch.dtype, window: int | None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A mixed batch (a prefill, a decode, a verify of 4) over a cache with
    garbage past each sequence's length."""
    gen = torch.Generator().manual_seed(seed)
    seqs = [SequenceInput(0, [1] * 9, 0, 1), SequenceInput(1, [2], 20, 1)]
    seqs.append(SequenceInput(2, [3, 4, 5, 6], 12, 4))
    batch = ForwardBatch.build(seqs)
    heads, kv_heads, head_dim = 6, 2, 16
    query = torch.randn(3, heads, batch.token_ids.shape[1], head_dim, generator=gen)
    keys = torch.randn(3, kv_heads, batch.context_len, head_dim, generator=gen)
    values = torch.randn(3, kv_heads, batch.context_len, head_dim, generator=gen)
    cast = [t.to(dtype) for t in (query, keys, values)]
    return cast[0], cast[1], cast[2], batch.attention_mask(window)


@pytest.mark.parametrize("window", [None, 5])
def test_grouped_path_equals_the_fused_kernel_in_float32(window: int | None) -> None:
    query, keys, values, mask = _case(torch.float32, window)
    want = F.scaled_dot_product_attention(
        query, keys, values, attn_mask=mask, scale=0.25, enable_gqa=True
    )
    got = attend(query, keys, values, mask, 0.25)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_grouped_path_in_bfloat16_is_as_close_to_float32_as_the_fused_kernel() -> None:
    query, keys, values, mask = _case(torch.bfloat16, None, seed=1)
    exact = F.scaled_dot_product_attention(
        query.float(), keys.float(), values.float(), attn_mask=mask, enable_gqa=True
    )
    fused = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, enable_gqa=True)
    got = attend(query, keys, values, mask, query.shape[-1] ** -0.5)
    assert got.dtype == torch.bfloat16
    fused_error = (fused.float() - exact).abs().max().item()
    assert (got.float() - exact).abs().max().item() <= fused_error * 1.01 + 1e-3


def test_over_the_score_budget_the_fused_kernel_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    query, keys, values, mask = _case(torch.float32, None)
    calls = []
    fused = F.scaled_dot_product_attention

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return fused(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(attend_module.F, "scaled_dot_product_attention", spy)
    small = attend(query, keys, values, mask, 0.25)
    assert calls == []
    monkeypatch.setattr(attend_module, "GROUPED_SCORE_BUDGET", 0)
    big = attend(query, keys, values, mask, 0.25)
    assert calls == [1]
    torch.testing.assert_close(small, big, atol=1e-6, rtol=1e-5)


def test_pad_and_unpad_round_trip_the_real_tokens() -> None:
    seqs = [SequenceInput(4, [7, 8, 9], 0, 1), SequenceInput(1, [5], 3, 1)]
    batch = ForwardBatch.build(seqs)
    assert batch.packed_token_ids.tolist() == [7, 8, 9, 5]
    assert batch.packed_logit_index.tolist() == [2, 3]
    packed = torch.arange(4 * 2, dtype=torch.float32).view(4, 2)
    padded = batch.pad(packed)
    assert padded.shape == (2, 3, 2)
    assert padded[1, 1:].abs().sum() == 0  # padding rows are zeros
    assert torch.equal(batch.unpad(padded), packed)
    dense = ForwardBatch.build([SequenceInput(0, [1, 2], 0, 2), SequenceInput(1, [3, 4], 0, 1)])
    assert dense.is_dense and not batch.is_dense
    assert dense.packed_logit_index.tolist() == [0, 1, 3]
