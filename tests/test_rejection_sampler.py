"""Rejection sampler: greedy tables, seeding, and its building blocks (the
statistical tests are in test_rejection_distribution.py)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from sampling_helpers import sample_rows

from specray.actors.sampling.logits import make_generator
from specray.actors.sampling.rejection import (
    DraftBatch,
    RejectionResult,
    rejection_sample,
    sample_with_uniforms,
)

VOCAB = 10


def one_hot_targets(argmax_rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """[batch, max_k + 1, VOCAB] one-hot target probs; short rows are padded with token 0."""
    width = max(len(r) for r in argmax_rows)
    padded = torch.tensor([list(r) + [0] * (width - len(r)) for r in argmax_rows])
    return torch.nn.functional.one_hot(padded, VOCAB).float()


def run_greedy(drafts: list[list[int]], argmax_rows: list[list[int]]) -> RejectionResult:
    draft = DraftBatch.from_proposals(drafts, [None] * len(drafts))
    return rejection_sample(
        draft, one_hot_targets(argmax_rows), [True] * len(drafts), [None] * len(drafts)
    )


# (drafts, target argmax per position, expected output) — one request each.
GREEDY_CASES = [
    pytest.param([1, 2, 3], [1, 2, 3, 4], [1, 2, 3, 4], id="all-accepted-plus-bonus"),
    pytest.param([1, 2, 3], [5, 2, 3, 4], [5], id="reject-at-0"),
    pytest.param([1, 2, 3], [1, 5, 3, 4], [1, 5], id="mismatch-in-middle"),
    pytest.param([1, 2, 3], [1, 2, 5, 4], [1, 2, 5], id="mismatch-at-last"),
    pytest.param([], [7], [7], id="no-drafts"),
    pytest.param([4], [4, 9], [4, 9], id="single-draft-accepted"),
]


@pytest.mark.parametrize(("drafts", "argmax", "expected"), GREEDY_CASES)
def test_greedy_single_request(drafts: list[int], argmax: list[int], expected: list[int]) -> None:
    result = run_greedy([drafts], [argmax])
    assert result.output_token_ids == [expected]
    assert result.num_accepted == [len(expected) - 1]


def test_greedy_mixed_lengths_in_one_batch() -> None:
    drafts = [[1, 2, 3], [], [6, 6], [1, 2, 3, 4, 5], [8]]
    argmax = [[1, 2, 3, 4], [7], [6, 1, 0], [1, 2, 9, 9, 9, 9], [3, 4]]
    result = run_greedy(drafts, argmax)
    assert result.output_token_ids == [[1, 2, 3, 4], [7], [6, 1], [1, 2, 9], [3]]
    assert result.num_accepted == [3, 0, 1, 2, 0]
    assert result.num_draft_tokens == [3, 0, 2, 5, 1]
    assert result.is_bonus == [True, True, False, False, False]
    stats = result.acceptance_by_position()
    assert stats.drafted == [4, 3, 2, 1, 1]
    assert stats.accepted == [3, 2, 1, 0, 0]


def test_greedy_with_argmax_only_matches_probs() -> None:
    drafts = [[1, 2, 3], [], [6, 6]]
    argmax_rows = [[1, 2, 5, 4], [7, 0, 0, 0], [6, 6, 2, 0]]
    draft = DraftBatch.from_proposals(drafts, [None] * 3)
    from_argmax = rejection_sample(
        draft, None, [True] * 3, [None] * 3, target_argmax=torch.tensor(argmax_rows)
    )
    from_probs = rejection_sample(draft, one_hot_targets(argmax_rows), [True] * 3, [None] * 3)
    assert from_argmax == from_probs
    assert from_argmax.output_token_ids == [[1, 2, 5], [7], [6, 6, 2]]


def test_random_path_agrees_with_greedy_on_one_hot_targets() -> None:
    # Greedy is the general rule applied to one-hot distributions, whatever the draws.
    drafts = [[1, 2, 3], [], [6, 6], [1, 2, 3, 4, 5], [8]]
    argmax = [[1, 2, 3, 4], [7], [6, 1, 0], [1, 2, 9, 9, 9, 9], [3, 4]]
    target_probs = one_hot_targets(argmax)
    draft_probs = [torch.nn.functional.one_hot(torch.tensor(d, dtype=torch.int64), VOCAB).float()
                   for d in drafts]  # fmt: skip
    greedy = run_greedy(drafts, argmax)
    for seed in range(5):
        generators = [make_generator(seed * 10 + i) for i in range(len(drafts))]
        for probs in ([None] * len(drafts), draft_probs):
            draft = DraftBatch.from_proposals(drafts, probs)
            random = rejection_sample(draft, target_probs, [False] * len(drafts), generators)
            assert random.output_token_ids == greedy.output_token_ids


def random_batch(
    seed: int, num_drafts: Sequence[int], point_mass: Sequence[bool]
) -> tuple[DraftBatch, torch.Tensor]:
    """Drafts sampled from random draft distributions, with random target probs."""
    gen = make_generator(seed)
    max_k = max(num_drafts)
    token_ids: list[list[int]] = []
    probs: list[torch.Tensor | None] = []
    for k, mass in zip(num_drafts, point_mass, strict=True):
        draft_probs = torch.softmax(torch.randn(k, VOCAB, generator=gen), -1)
        token_ids.append(sample_rows(draft_probs, gen).tolist())
        probs.append(None if mass else draft_probs)
    target = torch.softmax(torch.randn(len(num_drafts), max_k + 1, VOCAB, generator=gen), -1)
    return DraftBatch.from_proposals(token_ids, probs), target


def test_seeded_runs_are_reproducible_and_seed_dependent() -> None:
    num_drafts = [3, 0, 2, 4] * 8
    draft, target = random_batch(0, num_drafts, [i % 3 == 0 for i in range(32)])
    greedy = [False] * 32

    def run(seeds: Sequence[int]) -> RejectionResult:
        return rejection_sample(draft, target, greedy, [make_generator(s) for s in seeds])

    first = run(range(32))
    assert run(range(32)) == first
    assert run(range(100, 132)) != first


def test_request_output_does_not_depend_on_batch_companions() -> None:
    num_drafts = [3, 0, 2, 4, 1, 3]
    point_mass = [False, False, True, False, True, False]
    draft, target = random_batch(1, num_drafts, point_mass)
    greedy = [False, False, False, True, False, False]
    seeds = [11, 12, 13, 14, 15, 16]

    def generators() -> list[torch.Generator | None]:
        return [make_generator(s) for s in seeds]

    full = rejection_sample(draft, target, greedy, generators())
    assert draft.probs is not None
    order = torch.tensor([5, 3, 0, 2, 4, 1])
    shuffled = rejection_sample(
        draft.select(order),
        target.index_select(0, order),
        [greedy[i] for i in order],
        [generators()[i] for i in order],
    )
    for position, row in enumerate(order.tolist()):
        assert shuffled.output_token_ids[position] == full.output_token_ids[row]
        alone = rejection_sample(
            draft.select(torch.tensor([row])),
            target[row : row + 1],
            [greedy[row]],
            [generators()[row]],
        )
        assert alone.output_token_ids[0] == full.output_token_ids[row]
        # Padding to a longer batch must not matter either: trim to the row's own length.
        k = num_drafts[row]
        trimmed = DraftBatch.from_proposals(
            [draft.token_ids[row, :k].tolist()],
            [None if point_mass[row] else draft.probs[row, :k]],
        )
        alone_trimmed = rejection_sample(
            trimmed, target[row : row + 1, : k + 1], [greedy[row]], [generators()[row]]
        )
        assert alone_trimmed.output_token_ids[0] == full.output_token_ids[row]


def test_each_request_draws_k_plus_one_uniforms_from_its_generator() -> None:
    draft, target = random_batch(2, [3, 0, 2], [False, True, False])
    generators = [make_generator(s) for s in (1, 2, 3)]
    rejection_sample(draft, target, [False, False, False], generators)
    for generator, seed, k in zip(generators, (1, 2, 3), (3, 0, 2), strict=True):
        reference = make_generator(seed)
        torch.rand(k + 1, generator=reference, dtype=torch.float64)
        assert torch.equal(generator.get_state(), reference.get_state())


def test_identical_draft_and_target_accept_everything() -> None:
    draft, _ = random_batch(3, [4, 2, 3], [False, False, False])
    assert draft.probs is not None
    target = torch.cat([draft.probs, torch.full((3, 1, VOCAB), 1.0 / VOCAB)], dim=1)
    for seed in range(20):
        generators = [make_generator(seed * 3 + i) for i in range(3)]
        result = rejection_sample(draft, target, [False] * 3, generators)
        assert result.num_accepted == [4, 2, 3]


def test_draft_token_impossible_for_target_is_always_rejected() -> None:
    # The target puts no mass on token 0, which every draft proposes; the
    # recovered token must come from the residual (tokens 1 and 2 only).
    target = torch.zeros(1, 3, VOCAB)
    target[..., 1] = 0.5
    target[..., 2] = 0.5
    draft_probs = torch.zeros(2, VOCAB)
    draft_probs[:, 0] = 0.6
    draft_probs[:, 1] = 0.4
    for probs in (None, draft_probs):
        draft = DraftBatch.from_proposals([[0, 0]], [probs])
        seen = set()
        for seed in range(40):
            result = rejection_sample(draft, target, [False], [make_generator(seed)])
            assert result.num_accepted == [0]
            seen.add(result.output_token_ids[0][0])
        # Point mass: the residual is the target itself (1 and 2 evenly). With
        # draft probs it is max(target - draft, 0): 0.1 on token 1, 0.5 on token 2.
        assert seen <= {1, 2}
        assert 2 in seen
        if probs is None:
            assert seen == {1, 2}


def test_from_proposals_pads_and_validates() -> None:
    probs = torch.softmax(torch.randn(2, VOCAB), -1)
    draft = DraftBatch.from_proposals([[3, 4], [], [5]], [probs, None, None])
    assert draft.token_ids.tolist() == [[3, 4], [0, 0], [5, 0]]
    assert draft.num_tokens.tolist() == [2, 0, 1]
    assert draft.point_mass.tolist() == [False, True, True]
    assert draft.probs is not None and draft.probs.shape == (3, 2, VOCAB)
    assert torch.equal(draft.probs[0], probs)
    assert DraftBatch.from_proposals([[1], [2]], [None, None]).probs is None
    with pytest.raises(ValueError):
        DraftBatch.from_proposals([[1, 2]], [torch.rand(1, VOCAB)])


def test_random_rows_need_generators() -> None:
    draft, target = random_batch(4, [2], [False])
    with pytest.raises(ValueError):
        rejection_sample(draft, target, [False], [None])


def test_sample_with_uniforms_follows_the_cdf_and_skips_zero_mass() -> None:
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0]])  # unnormalised rows are fine too
    edges = torch.tensor([0.0, 0.2499, 0.25, 0.9999999999, 1.0 - 2.0**-53], dtype=torch.float64)
    tokens = sample_with_uniforms(probs.expand(5, -1) * 3.0, edges)
    assert tokens.tolist() == [1, 1, 3, 3, 3]
    grid = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000
    counts = torch.bincount(sample_with_uniforms(probs.expand(1000, -1), grid), minlength=5)
    assert counts.tolist() == [0, 250, 0, 750, 0]
