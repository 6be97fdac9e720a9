"""The hyper-connections' Sinkhorn-Knopp step: numpy and torch executors
agree bit for bit (so a verify equals decode steps whichever runs), and the
result is the reference's doubly stochastic matrix."""

from __future__ import annotations

import pytest
import torch

from specray.actors.model.v4 import sinkhorn
from specray.actors.model.v4.sinkhorn import sinkhorn_

EPS = 1e-6


def reference(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """transformers' DeepseekV4HyperConnection loop, out of place."""
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


def _positive(tokens: int, n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(tokens, n, n, generator=generator)
    return torch.softmax(logits, dim=-1) + EPS


@pytest.mark.parametrize("tokens", [1, 2, 7, 32, 33, 300])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_both_executors_equal_the_reference_bit_for_bit(
    tokens: int, n: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    comb = _positive(tokens, n, seed=tokens * 10 + n)
    expected = reference(comb, 20, EPS)
    for limit in (0, 1 << 20):  # torch everywhere, numpy everywhere
        monkeypatch.setattr(sinkhorn, "NUMPY_MAX_MATRICES", limit)
        got = sinkhorn_(comb.clone(), 20, EPS)
        assert torch.equal(got, expected), f"limit {limit}"


def test_rows_are_independent_of_the_batch() -> None:
    comb = _positive(40, 4, seed=3)  # above the numpy limit: torch
    together = sinkhorn_(comb.clone(), 20, EPS)
    alone = torch.cat([sinkhorn_(row.clone(), 20, EPS) for row in comb.split(1)])  # numpy
    assert torch.equal(together, alone)


def test_the_result_is_doubly_stochastic_and_in_place() -> None:
    comb = _positive(5, 4, seed=1)
    out = sinkhorn_(comb, 20, EPS)
    assert out.data_ptr() == comb.data_ptr()
    # Columns are normalised last; twenty iterations bring rows close.
    torch.testing.assert_close(out.sum(-2), torch.ones(5, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.sum(-1), torch.ones(5, 4), atol=0.05, rtol=0)
    assert (_positive(5, 4, seed=1).sum(-2) - 1).abs().max() > 0.1  # it was not already


def test_inference_mode_tensors_take_the_numpy_path() -> None:
    with torch.inference_mode():
        comb = _positive(1, 4, seed=2)
        torch.testing.assert_close(sinkhorn_(comb.clone(), 20, EPS), reference(comb, 20, EPS))
