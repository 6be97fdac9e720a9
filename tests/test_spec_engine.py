"""Lossless speculative decoding end to end in one process (fp32).

Greedy output must be token-identical to target-only decoding for every
drafter, γ, batch size and draft model; sampled output must be reproducible
from its seed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import pytest
from references import greedy_reference
from tiny_models import VOCAB, repeating_prompts

from specray.actors.drafting.base import Drafter, DraftProposal
from specray.actors.drafting.draft_model import DraftModelDrafter
from specray.actors.drafting.hybrid import HybridDrafter
from specray.actors.drafting.ngram import NgramDrafter
from specray.actors.engine.costs import RoundCostModel
from specray.actors.engine.engine import EngineConfig, SpecEngine
from specray.actors.engine.request import GenerationRequest, RequestOutput
from specray.actors.engine.target import LocalTarget
from specray.actors.model.loader import load_model
from specray.actors.sampling.params import SamplingParams, StoppingCriteria

MAX_TOKENS = 24


def _prompts(count: int, seed: int = 0) -> list[list[int]]:
    return repeating_prompts(seed, [3 + 5 * i for i in range(count)], VOCAB)


def _run(
    target_dir: Path,
    drafter: Drafter | None,
    prompts: list[list[int]],
    k: int,
    sampling: SamplingParams | None = None,
    adaptive: bool = False,
    max_tokens: int = MAX_TOKENS,
) -> dict[str, list[int]]:
    target = LocalTarget(load_model(target_dir), num_slots=8, max_len=128)
    engine = SpecEngine(
        target,
        drafter,
        tokenizer=None,
        eos_token_ids=(),
        config=EngineConfig(max_batch=8, num_speculative_tokens=k, adaptive=adaptive),
    )
    requests = [
        GenerationRequest(
            f"r{i}",
            p,
            sampling or SamplingParams(),
            StoppingCriteria(max_tokens=max_tokens, ignore_eos=True),
        )
        for i, p in enumerate(prompts)
    ]
    outputs: dict[str, list[int]] = {r.request_id: [] for r in requests}
    finished: list[RequestOutput] = []
    for chunk in engine.generate(requests):
        outputs[chunk.request_id] += chunk.token_ids
        if chunk.finished:
            finished.append(chunk)
    assert len(finished) == len(requests)
    assert not engine.running and target.num_active == 0
    return outputs


def _reference(target_dir: Path, prompts: list[list[int]]) -> dict[str, list[int]]:
    return dict(_cached_reference(target_dir, tuple(map(tuple, prompts))))


@functools.cache
def _cached_reference(
    target_dir: Path, prompts: tuple[tuple[int, ...], ...]
) -> tuple[tuple[str, list[int]], ...]:
    named = {f"r{i}": list(p) for i, p in enumerate(prompts)}
    return tuple(greedy_reference(target_dir, named, MAX_TOKENS).items())


DrafterFactory = Callable[[Callable[..., Path]], Drafter]
DRAFTERS: dict[str, DrafterFactory] = {
    "ngram": lambda make: NgramDrafter(max_ngram=3),
    "draft=copy": lambda make: DraftModelDrafter(load_model(make("qwen2")), 8, 128),
    "draft=unrelated": lambda make: DraftModelDrafter(load_model(make("qwen2", 7)), 8, 128),
    "hybrid": lambda make: HybridDrafter(
        NgramDrafter(max_ngram=3), DraftModelDrafter(load_model(make("qwen2", 7)), 8, 128), 2
    ),
}


@pytest.mark.parametrize("drafter_name", sorted(DRAFTERS))
@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_equals_target_only(tiny_dir_factory, drafter_name: str, k: int, batch: int) -> None:  # type: ignore[no-untyped-def]
    target_dir = tiny_dir_factory("qwen2")
    prompts = _prompts(batch)
    reference = _reference(target_dir, prompts)
    spec = _run(target_dir, DRAFTERS[drafter_name](tiny_dir_factory), prompts, k=k)
    assert spec == reference
    assert all(len(v) == MAX_TOKENS for v in spec.values())


def test_greedy_equals_target_only_gemma_sliding_window(tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    """Rollbacks across Gemma 3's sliding window keep the output exact."""
    target_dir = tiny_dir_factory("gemma3")
    prompts = _prompts(3, seed=5)
    reference = _reference(target_dir, prompts)
    assert _run(target_dir, None, prompts, k=0) == reference
    drafter = DraftModelDrafter(load_model(tiny_dir_factory("gemma3", 3)), 8, 128)
    assert _run(target_dir, drafter, prompts, k=4) == reference


def test_adaptive_gamma_keeps_output(tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    target_dir = tiny_dir_factory("qwen2")
    prompts = _prompts(4, seed=9)
    reference = _reference(target_dir, prompts)
    drafter = DraftModelDrafter(load_model(tiny_dir_factory("qwen2", 7)), 8, 128)
    assert _run(target_dir, drafter, prompts, k=6, adaptive=True) == reference


def test_sampling_is_seeded_and_reproducible(tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    target_dir = tiny_dir_factory("qwen2")
    prompts = _prompts(3, seed=2)
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=1234)

    def draft() -> Drafter:
        return DraftModelDrafter(load_model(tiny_dir_factory("qwen2")), 8, 128)

    first = _run(target_dir, draft(), prompts, k=3, sampling=params)
    second = _run(target_dir, draft(), prompts, k=3, sampling=params)
    other_seed = _run(
        target_dir, draft(), prompts, k=3, sampling=SamplingParams(temperature=0.8, seed=99)
    )
    assert first == second
    assert first != other_seed
    # A request's output depends on its seed, not its batch companions.
    alone = _run(target_dir, draft(), prompts[:1], k=3, sampling=params)
    assert alone["r0"] == first["r0"]


class _WrongDrafter(NgramDrafter):
    """Always proposes token 0, which the tiny target never predicts first:
    every round is a rejection at position 0."""

    def propose(self, requests):  # type: ignore[no-untyped-def]
        return [DraftProposal([0] * r.num_tokens) for r in requests]


def _engine(target_dir: Path, drafter: Drafter | None, k: int, eos: tuple[int, ...] = ()):  # type: ignore[no-untyped-def]
    target = LocalTarget(load_model(target_dir), num_slots=4, max_len=128)
    config = EngineConfig(max_batch=4, num_speculative_tokens=k, adaptive=False)
    return SpecEngine(target, drafter, None, eos, config)


def _collect(engine: SpecEngine, request: GenerationRequest) -> tuple[list[int], RequestOutput]:
    tokens: list[int] = []
    last = None
    for chunk in engine.generate([request]):
        tokens += chunk.token_ids
        last = chunk
    assert last is not None and last.finished
    return tokens, last


def _target_alone(target_dir: Path, prompt: list[int], stopping: StoppingCriteria) -> list[int]:
    """The engine's output for one request without a drafter (k = 0)."""
    tokens, _ = _collect(
        _engine(target_dir, None, k=0), GenerationRequest("a", prompt, stopping=stopping)
    )
    return tokens


def test_all_drafts_accepted_with_a_copy_of_the_target(tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    target_dir = tiny_dir_factory("qwen2")
    drafter = DraftModelDrafter(load_model(target_dir), 4, 128)
    request = GenerationRequest("a", _prompts(1)[0], stopping=StoppingCriteria(21, ignore_eos=True))
    tokens, last = _collect(_engine(target_dir, drafter, k=4), request)
    assert len(tokens) == 21
    assert last.stats.accepted_tokens == last.stats.draft_tokens > 0
    assert last.stats.rounds == 5  # 4 rounds of 4 drafts + bonus, then 1 token
    assert last.stats.mean_acceptance_length == pytest.approx(21 / 5)


def test_rejection_at_position_zero_every_round(tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    target_dir = tiny_dir_factory("qwen2")
    prompt = _prompts(1, seed=3)[0]
    stopping = StoppingCriteria(12, ignore_eos=True)
    reference = _target_alone(target_dir, prompt, stopping)
    assert 0 not in reference
    tokens, last = _collect(
        _engine(target_dir, _WrongDrafter(), k=3), GenerationRequest("a", prompt, stopping=stopping)
    )
    assert tokens == reference
    assert last.stats.accepted_tokens == 0 and last.stats.rounds == 12
    assert last.stats.mean_acceptance_length == 1.0


def test_eos_inside_accepted_drafts(tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    target_dir = tiny_dir_factory("qwen2")
    prompt = _prompts(1, seed=4)[0]
    free_run = _target_alone(target_dir, prompt, StoppingCriteria(20, ignore_eos=True))
    eos = free_run[6]
    cut = free_run.index(eos) + 1
    drafter = DraftModelDrafter(load_model(target_dir), 4, 128)  # accepts everything
    tokens, last = _collect(
        _engine(target_dir, drafter, k=8, eos=(eos,)),
        GenerationRequest("a", prompt, stopping=StoppingCriteria(20)),
    )
    assert tokens == free_run[:cut]  # EOS is kept as the last token
    assert last.finish_reason == "stop"


def test_max_tokens_reached_mid_round(tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    target_dir = tiny_dir_factory("qwen2")
    prompt = _prompts(1, seed=6)[0]
    stopping = StoppingCriteria(5, ignore_eos=True)
    reference = _target_alone(target_dir, prompt, stopping)
    drafter = DraftModelDrafter(load_model(target_dir), 4, 128)
    tokens, last = _collect(
        _engine(target_dir, drafter, k=8), GenerationRequest("a", prompt, stopping=stopping)
    )
    assert tokens == reference and len(tokens) == 5
    assert last.finish_reason == "length"
    assert last.stats.draft_tokens <= 4  # γ is capped by the tokens left


def test_fixed_speculation_drafts_its_whole_k_where_the_budget_would_not(tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    """An adaptive engine whose measured verify cost grows with every token
    as fast as a token could earn: the budget drafts little or nothing, while
    a request with fixed speculation drafts all 4 every round (a copy of the
    target, so all are accepted) and still gives target-only's tokens."""
    target_dir = tiny_dir_factory("qwen2")
    prompt = _prompts(1)[0]
    stopping = StoppingCriteria(21, ignore_eos=True)
    reference = _target_alone(target_dir, prompt, stopping)

    def run(fixed: bool) -> tuple[list[int], RequestOutput]:
        costs = RoundCostModel()
        costs.verify.set_profile([(1, 0.1), (2, 0.2), (64, 6.4)])
        costs.draft.set_profile([(1, 0.05), (64, 0.05)])
        target = LocalTarget(load_model(target_dir), num_slots=4, max_len=128)
        drafter = DraftModelDrafter(load_model(target_dir), 4, 128)
        config = EngineConfig(max_batch=4, num_speculative_tokens=4, adaptive=True)
        engine = SpecEngine(target, drafter, None, (), config, costs)
        request = GenerationRequest("a", prompt, stopping=stopping, fixed_speculation=fixed)
        return _collect(engine, request)

    (budgeted, by_budget), (fixed, whole) = run(False), run(True)
    assert budgeted == fixed == reference
    assert whole.stats.rounds == 5 and whole.stats.accepted_tokens == whole.stats.draft_tokens == 16
    assert by_budget.stats.rounds > 5
