"""Logits processing: temperature, top-k, top-p, min-p, greedy, generators."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specray.actors.sampling.logits import (
    SamplingTensors,
    compute_probs,
    make_generator,
    resolve_seed,
)
from specray.actors.sampling.params import SamplingParams

# Probabilities 0.5, 0.3, 0.15, 0.05 at temperature 1, in a shuffled order so
# that the support checks do not pass by accident of position.
PROBS = torch.tensor([0.15, 0.5, 0.05, 0.3])
LOGITS = PROBS.log().unsqueeze(0)  # [1, 4]


def probs_for(params: SamplingParams, logits: torch.Tensor = LOGITS) -> torch.Tensor:
    sampling = SamplingTensors.from_params([params] * logits.shape[0])
    return compute_probs(logits, sampling)


def support(probs: torch.Tensor) -> set[int]:
    return set(torch.nonzero(probs > 0).flatten().tolist())


def test_temperature_scales_logits() -> None:
    logits = torch.randn(3, 50, generator=make_generator(0))
    for temperature in (0.3, 1.0, 2.5):
        probs = probs_for(SamplingParams(temperature=temperature), logits)
        expected = torch.softmax(logits / temperature, dim=-1)
        torch.testing.assert_close(probs, expected)
        assert probs.dtype == torch.float32


def test_greedy_is_one_hot_argmax() -> None:
    logits = torch.randn(4, 33, generator=make_generator(1))
    probs = probs_for(SamplingParams(temperature=0.0, top_k=3, top_p=0.5), logits)
    expected = torch.nn.functional.one_hot(logits.argmax(-1), 33).float()
    assert torch.equal(probs, expected)


def test_greedy_and_random_rows_in_one_batch() -> None:
    logits = torch.randn(2, 20, generator=make_generator(2))
    sampling = SamplingTensors.from_params(
        [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)]
    )
    probs = compute_probs(logits, sampling)
    assert torch.equal(probs[0], torch.nn.functional.one_hot(logits[0].argmax(), 20).float())
    torch.testing.assert_close(probs[1], torch.softmax(logits[1], -1))


def test_top_k_keeps_the_k_largest() -> None:
    assert support(probs_for(SamplingParams(temperature=1.0, top_k=2))[0]) == {1, 3}
    probs = probs_for(SamplingParams(temperature=1.0, top_k=3))[0]
    assert support(probs) == {0, 1, 3}
    torch.testing.assert_close(probs[[1, 3, 0]], torch.tensor([0.5, 0.3, 0.15]) / 0.95)


def test_top_k_one_is_argmax_and_large_k_is_off() -> None:
    assert support(probs_for(SamplingParams(temperature=1.0, top_k=1))[0]) == {1}
    probs = probs_for(SamplingParams(temperature=1.0, top_k=1000))[0]
    torch.testing.assert_close(probs, PROBS)


def test_top_k_keeps_ties_with_the_kth() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]])
    probs = probs_for(SamplingParams(temperature=1.0, top_k=2), logits)[0]
    assert support(probs) == {0, 2, 3}


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [(0.4, {1}), (0.7, {1, 3}), (0.9, {0, 1, 3}), (0.99, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})],
)
def test_top_p_keeps_smallest_nucleus(top_p: float, expected: set[int]) -> None:
    probs = probs_for(SamplingParams(temperature=1.0, top_p=top_p))[0]
    assert support(probs) == expected
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0))
    kept = sorted(expected)
    torch.testing.assert_close(probs[kept], PROBS[kept] / PROBS[kept].sum())


def test_tiny_top_p_keeps_the_argmax() -> None:
    logits = torch.randn(5, 100, generator=make_generator(3))
    probs = probs_for(SamplingParams(temperature=1.0, top_p=1e-9), logits)
    expected = torch.nn.functional.one_hot(logits.argmax(-1), 100).float()
    assert torch.equal(probs, expected)


def test_top_k_is_applied_before_top_p() -> None:
    # top-k=2 leaves {0.5, 0.3} -> {0.625, 0.375}; top-p=0.6 then keeps only
    # the argmax. The other order would keep both tokens.
    probs = probs_for(SamplingParams(temperature=1.0, top_k=2, top_p=0.6))[0]
    assert support(probs) == {1}


def test_min_p_drops_relative_to_max() -> None:
    # Threshold 0.25 * 0.5 = 0.125 drops only 0.05.
    probs = probs_for(SamplingParams(temperature=1.0, min_p=0.25))[0]
    assert support(probs) == {0, 1, 3}
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0))
    assert support(probs_for(SamplingParams(temperature=1.0, min_p=1.0))[0]) == {1}


def test_min_p_applies_after_temperature() -> None:
    # At temperature 2 the probabilities flatten: sqrt(p) normalised; the
    # ratio 0.05 / 0.5 becomes sqrt(0.1) ~ 0.32, above a min_p of 0.25.
    probs = probs_for(SamplingParams(temperature=2.0, min_p=0.25))[0]
    assert support(probs) == {0, 1, 2, 3}


def test_fast_path_matches_sorted_path() -> None:
    # Alone, a top-k row takes the topk fast path; next to a top-p row the
    # whole batch is sorted. Both must give the same distribution.
    logits = torch.randn(2, 64, generator=make_generator(4))
    row_params = SamplingParams(temperature=0.7, top_k=10)
    alone = compute_probs(logits[:1], SamplingTensors.from_params([row_params]))
    mixed = compute_probs(
        logits,
        SamplingTensors.from_params([row_params, SamplingParams(temperature=1.0, top_p=0.8)]),
    )
    torch.testing.assert_close(alone[0], mixed[0])
    assert len(support(alone[0])) == 10


def test_rows_with_different_filters() -> None:
    logits = LOGITS.repeat(4, 1)
    sampling = SamplingTensors.from_params(
        [
            SamplingParams(temperature=1.0, top_k=1),
            SamplingParams(temperature=1.0),
            SamplingParams(temperature=1.0, top_p=0.7),
            SamplingParams(temperature=1.0, min_p=0.5),
        ]
    )
    probs = compute_probs(logits, sampling)
    assert [support(row) for row in probs] == [{1}, {0, 1, 2, 3}, {1, 3}, {1, 3}]


@pytest.mark.parametrize(
    "bad_row",
    [
        [-math.inf] * 6,
        [math.nan] * 6,
        [0.0, math.inf, 1.0, 0.0, 0.0, 0.0],
        [0.0, math.nan, 2.0, 0.0, 0.0, 0.0],
        [1e30, -1e30, 0.0, 0.0, 0.0, 0.0],
    ],
)
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=1e-4, top_k=2),
        SamplingParams(temperature=1.0, top_p=0.5, min_p=0.1),
    ],
)
def test_rows_are_never_empty_or_non_finite(bad_row: list[float], params: SamplingParams) -> None:
    probs = probs_for(params, torch.tensor([bad_row]))
    assert torch.isfinite(probs).all()
    assert (probs >= 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.tensor([1.0]))


def test_half_precision_logits_give_float32() -> None:
    logits = torch.randn(3, 40, generator=make_generator(5)).to(torch.bfloat16)
    probs = probs_for(SamplingParams(temperature=0.9, top_p=0.9), logits)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))


def test_repeat_interleave_expands_rows() -> None:
    sampling = SamplingTensors.from_params(
        [SamplingParams(temperature=0.5, top_k=3), SamplingParams(temperature=0.0)]
    )
    repeated = sampling.repeat_interleave([3, 2])
    assert len(repeated) == 5
    assert repeated.top_k.tolist() == [3, 3, 3, 0, 0]
    assert repeated.greedy.tolist() == [False, False, False, True, True]
    logits = torch.randn(5, 16, generator=make_generator(6))
    probs = compute_probs(logits, repeated)
    row_alone = compute_probs(
        logits[:1], SamplingTensors.from_params([SamplingParams(temperature=0.5, top_k=3)])
    )
    torch.testing.assert_close(probs[0], row_alone[0])
    assert (probs[3:].amax(-1) == 1.0).all()


def test_negative_temperature_is_rejected() -> None:
    with pytest.raises(ValueError):
        SamplingTensors.from_params([SamplingParams(temperature=-1.0)])


def test_shape_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError):
        compute_probs(torch.zeros(3, 5), SamplingTensors.from_params([SamplingParams()]))


def test_generators_are_reproducible() -> None:
    first = torch.rand(8, generator=make_generator(1234))
    second = torch.rand(8, generator=make_generator(1234))
    other = torch.rand(8, generator=make_generator(1235))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    assert resolve_seed(77) == 77
    fresh = {resolve_seed(None) for _ in range(4)}
    assert len(fresh) == 4
    for seed in fresh:
        make_generator(seed)  # any picked seed is a valid generator seed


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    vocab=st.integers(1, 40),
    temperature=st.floats(0.05, 5.0),
    top_k=st.integers(0, 50),
    top_p=st.floats(0.0, 1.0),
    min_p=st.floats(0.0, 1.0),
)
def test_processing_invariants(
    seed: int, vocab: int, temperature: float, top_k: int, top_p: float, min_p: float
) -> None:
    logits = torch.randn(2, vocab, generator=make_generator(seed)) * 4
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    probs = probs_for(params, logits)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    assert (probs >= 0).all()
    # The argmax survives every filter, and nothing outside the top-k does.
    argmax = logits.argmax(-1)
    assert (probs.gather(1, argmax.unsqueeze(1)) > 0).all()
    if 0 < top_k < vocab:
        assert ((probs > 0).sum(-1) <= top_k).all()
    # Kept tokens keep their relative likelihoods (denormal probabilities lose precision).
    for row in range(2):
        kept = probs[row] > 1e-30
        if kept.sum() > 1:
            ratios = probs[row][kept].log() - logits[row][kept] / temperature
            torch.testing.assert_close(ratios, ratios[:1].expand_as(ratios), atol=1e-4, rtol=0)
