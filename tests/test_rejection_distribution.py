"""Rejection sampler: the emitted tokens follow the target's distribution,
whatever the drafts (statistical tests on a toy Markov-chain model)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from sampling_helpers import chi_square_p_value, sample_rows, total_variation

from specray.actors.sampling.logits import SamplingTensors, compute_probs, make_generator
from specray.actors.sampling.params import SamplingParams
from specray.actors.sampling.rejection import (
    DraftBatch,
    rejection_sample,
    verify_with_uniforms,
)

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
