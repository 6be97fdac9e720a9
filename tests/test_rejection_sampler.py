"""Rejection sampler: greedy tables, seeding, and losslessness in distribution."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import torch

from specray.actors.sampling.logits import SamplingTensors, compute_probs, make_generator
from specray.actors.sampling.params import SamplingParams
from specray.actors.sampling.rejection import (
    DraftBatch,
    RejectionResult,
    rejection_sample,
    sample_with_uniforms,
    verify_with_uniforms,
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


# --------------------------------------------------------------------------
# Losslessness in distribution.
#
# A toy language model: the next-token logits depend only on the previous
# token (a Markov chain), for the target and, differently, for the draft.
# Draft tokens are sampled from the processed draft chain, target probs at
# each verify position are the processed target chain at the drafted prefix,
# exactly what the engine would compute. The emitted tokens must then follow
# the processed target chain: token 1 ~ target[start], token 2 ~ target[token 1].
# --------------------------------------------------------------------------

SMALL_VOCAB = 12
START = 0
MAX_DRAFTS = 3


@dataclass(frozen=True)
class ToyModels:
    target: torch.Tensor  # [vocab, vocab] float32: row = previous token
    draft: torch.Tensor  # [vocab, vocab] float32
    guess: torch.Tensor  # [vocab] int64: a deterministic (n-gram-like) drafter


def toy_models(params: SamplingParams, seed: int = 0) -> ToyModels:
    gen = make_generator(seed)
    target_logits = torch.randn(SMALL_VOCAB, SMALL_VOCAB, generator=gen) * 2.0
    draft_logits = target_logits + torch.randn(SMALL_VOCAB, SMALL_VOCAB, generator=gen) * 1.5
    sampling = SamplingTensors.from_params([params] * SMALL_VOCAB)
    draft = compute_probs(draft_logits, sampling)
    # The deterministic drafter guesses the draft's argmax, except after a few
    # tokens where it guesses blindly (possibly a token the target filtered out).
    guess = draft.argmax(dim=-1)
    blind = torch.randperm(SMALL_VOCAB - 1, generator=gen)[:4] + 1  # never after START
    guess[blind] = torch.randint(SMALL_VOCAB, (4,), generator=gen)
    return ToyModels(
        target=compute_probs(target_logits, sampling),
        draft=draft,
        guess=guess,
    )


def sample_rows(
    probs: torch.Tensor,  # [n, vocab] float32
    gen: torch.Generator,
) -> torch.Tensor:  # [n] int64
    """Exponential race: argmax(probs / E) with E ~ Exp(1) samples from each row."""
    race = torch.empty(probs.shape, dtype=torch.float64).exponential_(generator=gen)
    return (probs.double() / race).argmax(dim=-1)


def draw_chain(
    models: ToyModels,
    previous: torch.Tensor,  # [n] int64
    point_mass: torch.Tensor,  # [n] bool
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:  # [n, MAX_DRAFTS] int64, [n, MAX_DRAFTS, vocab]
    """MAX_DRAFTS draft tokens per request and the distributions they came from."""
    context = previous
    tokens, probs = [], []
    for _ in range(MAX_DRAFTS):
        draft_probs = models.draft[context]
        token = torch.where(point_mass, models.guess[context], sample_rows(draft_probs, gen))
        tokens.append(token)
        probs.append(draft_probs)
        context = token
    return torch.stack(tokens, dim=1), torch.stack(probs, dim=1)


def verify_round(
    models: ToyModels,
    previous: torch.Tensor,  # [n] int64
    point_mass: torch.Tensor,  # [n] bool
    gen: torch.Generator,
) -> tuple[list[torch.Tensor], torch.Tensor]:  # emitted columns, each [n] (-1 = none)
    """One draft + verify round for ``n`` independent requests."""
    n = previous.shape[0]
    num_drafts = torch.randint(MAX_DRAFTS + 1, (n,), generator=gen)
    token_ids, draft_probs = draw_chain(models, previous, point_mass, gen)
    contexts = torch.cat([previous.unsqueeze(1), token_ids], dim=1)  # [n, MAX_DRAFTS + 1]
    draft = DraftBatch(
        token_ids=token_ids, num_tokens=num_drafts, probs=draft_probs, point_mass=point_mass
    )
    outcome = verify_with_uniforms(
        draft,
        models.target[contexts],
        torch.rand(n, MAX_DRAFTS, generator=gen, dtype=torch.float64),
        torch.rand(n, generator=gen, dtype=torch.float64),
    )
    emitted = []
    for position in range(MAX_DRAFTS + 1):
        column = token_ids[:, position] if position < MAX_DRAFTS else outcome.final_token_ids
        column = torch.where(position < outcome.num_accepted, column, -1)
        column = torch.where(position == outcome.num_accepted, outcome.final_token_ids, column)
        emitted.append(column)
    return emitted, outcome.num_accepted


def sample_two_tokens(
    models: ToyModels, n: int, drafter: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # first [n], second [n], accepted [n]
    gen = make_generator(seed)
    if drafter == "mixed":
        point_mass = torch.rand(n, generator=gen) < 0.5
    else:
        point_mass = torch.full((n,), drafter == "point_mass")
    emitted, num_accepted = verify_round(models, torch.full((n,), START), point_mass, gen)
    first, second = emitted[0], emitted[1].clone()
    # Requests that emitted one token continue with a fresh round from it.
    again = second < 0
    more, _ = verify_round(models, first[again], point_mass[again], gen)
    second[again] = more[0]
    return first, second, num_accepted


def total_variation(counts: torch.Tensor, expected: torch.Tensor) -> float:
    return 0.5 * float((counts.double() / counts.sum() - expected.double()).abs().sum())


def chi_square_p_value(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; cells expecting < 5 are pooled."""
    counts, expected = counts.double().flatten(), expected.double().flatten() * counts.sum()
    big = expected >= 5.0
    observed = torch.cat([counts[big], counts[~big].sum().reshape(1)])
    wanted = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    if wanted[-1] < 5.0:  # pool too small to be its own cell: fold into the smallest
        observed, wanted = observed[:-1], wanted[:-1]
        observed[wanted.argmin()] += counts[~big].sum()
        wanted[wanted.argmin()] += expected[~big].sum()
    statistic = ((observed - wanted) ** 2 / wanted).sum()
    dof = observed.numel() - 1
    # Survival function of chi2(dof) = regularised upper incomplete gamma.
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0).double(), statistic / 2.0))


def test_chi_square_helper_matches_known_critical_values() -> None:
    # chi2(10) has 5% upper critical value 18.307; chi2(1) has 3.841.
    assert float(torch.special.gammaincc(torch.tensor(5.0), torch.tensor(18.307 / 2))) == (
        pytest.approx(0.05, abs=1e-4)
    )
    assert float(torch.special.gammaincc(torch.tensor(0.5), torch.tensor(3.841 / 2))) == (
        pytest.approx(0.05, abs=1e-4)
    )
    expected = torch.tensor([0.5, 0.3, 0.2])
    assert chi_square_p_value(torch.tensor([5000, 3000, 2000]), expected) == pytest.approx(1.0)
    assert chi_square_p_value(torch.tensor([5200, 3000, 1800]), expected) < 1e-6


PARAM_SETS = [
    pytest.param(SamplingParams(temperature=0.8, top_k=7, top_p=0.9), id="temp-topk-topp"),
    pytest.param(SamplingParams(temperature=1.3, top_p=0.95, min_p=0.05), id="temp-topp-minp"),
]


@pytest.mark.parametrize("params", PARAM_SETS)
@pytest.mark.parametrize("drafter", ["probabilistic", "point_mass", "mixed"])
def test_emitted_tokens_follow_the_target(params: SamplingParams, drafter: str) -> None:
    models = toy_models(params)
    n = 100_000
    first, second, num_accepted = sample_two_tokens(models, n, drafter, seed=1)
    first_target = models.target[START]
    joint_target = first_target.unsqueeze(1) * models.target  # P(first=a, second=b)

    # The test is only meaningful if the draft really differs from the target
    # and drafts are sometimes accepted and sometimes not.
    assert 0.5 * float((models.draft[START] - first_target).abs().sum()) > 0.1
    assert 0.05 < float((num_accepted > 0).double().mean()) < 0.95

    first_counts = torch.bincount(first, minlength=SMALL_VOCAB)
    joint_counts = torch.bincount(first * SMALL_VOCAB + second, minlength=SMALL_VOCAB**2)
    # Filtered-out tokens are never emitted.
    assert (first_counts[first_target == 0] == 0).all()
    assert (joint_counts[joint_target.flatten() == 0] == 0).all()

    # Total variation shrinks with the number of samples (like 1/sqrt(n)).
    distances = [
        total_variation(torch.bincount(first[:size], minlength=SMALL_VOCAB), first_target)
        for size in (1_000, 10_000, 100_000)
    ]
    assert distances[0] > distances[1] > distances[2]
    assert distances[2] < 0.01
    assert total_variation(joint_counts, joint_target.flatten()) < 0.02

    assert chi_square_p_value(first_counts, first_target) > 1e-3
    assert chi_square_p_value(
        torch.bincount(second, minlength=SMALL_VOCAB), joint_target.sum(0)
    ) > (1e-3)
    assert chi_square_p_value(joint_counts, joint_target) > 1e-3


def test_acceptance_rate_at_first_position_matches_theory() -> None:
    # With one draft, P(accept) = sum_x min(target(x), draft(x)) = 1 - TV(target, draft).
    models = toy_models(SamplingParams(temperature=0.8, top_k=7, top_p=0.9))
    n = 100_000
    gen = make_generator(5)
    target, draft_dist = models.target[START], models.draft[START]
    tokens = sample_rows(draft_dist.expand(n, -1), gen).unsqueeze(1)
    draft = DraftBatch(
        token_ids=tokens,
        num_tokens=torch.ones(n, dtype=torch.int64),
        probs=draft_dist.expand(n, 1, -1),
        point_mass=torch.zeros(n, dtype=torch.bool),
    )
    outcome = verify_with_uniforms(
        draft,
        target.expand(n, 2, -1),
        torch.rand(n, 1, generator=gen, dtype=torch.float64),
        torch.rand(n, generator=gen, dtype=torch.float64),
    )
    expected = float(torch.minimum(target, draft_dist).sum())
    assert float(outcome.num_accepted.double().mean()) == pytest.approx(expected, abs=0.01)


def test_engine_entry_point_follows_the_target() -> None:
    # The same check through rejection_sample with one generator per request.
    models = toy_models(SamplingParams(temperature=0.8, top_k=7, top_p=0.9))
    n = 20_000
    gen = make_generator(9)
    # Odd rows draft from the draft model, even rows are point masses (guesses).
    point_mass = torch.arange(n) % 2 == 0
    chains, chain_probs = draw_chain(models, torch.full((n,), START), point_mass, gen)
    token_ids: list[list[int]] = []
    probs: list[torch.Tensor | None] = []
    for row, chain in enumerate(chains.tolist()):
        num_drafts = row % (MAX_DRAFTS + 1)
        token_ids.append(chain[:num_drafts])
        probs.append(None if point_mass[row] else chain_probs[row, :num_drafts])
    draft = DraftBatch.from_proposals(token_ids, probs)
    contexts = torch.cat([torch.full((n, 1), START), draft.token_ids], dim=1)
    result = rejection_sample(
        draft,
        models.target[contexts],
        [False] * n,
        [make_generator(1000 + row) for row in range(n)],
    )
    first = torch.tensor([tokens[0] for tokens in result.output_token_ids])
    counts = torch.bincount(first, minlength=SMALL_VOCAB)
    assert total_variation(counts, models.target[START]) < 0.02
    assert chi_square_p_value(counts, models.target[START]) > 1e-3
