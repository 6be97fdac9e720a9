"""SuffixDrafter: per-request and cross-request suffix drafting behind the Drafter protocol."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from suffix_reference import brute_speculate
from test_spec_engine import _prompts, _run

from specray.actors.drafting.base import Drafter, DraftProposal, DraftRequest, DraftUpdate
from specray.actors.drafting.suffix import SpeculationParams, SuffixConfig, SuffixDrafter
from specray.actors.engine.engine import EngineConfig, SpecEngine
from specray.actors.engine.request import GenerationRequest
from specray.actors.engine.target import LocalTarget
from specray.actors.model.loader import load_model
from specray.actors.sampling.params import SamplingParams, StoppingCriteria

GREEDY = SamplingParams()


def _propose(drafter: SuffixDrafter, request_id: str, num_tokens: int) -> DraftProposal:
    (proposal,) = drafter.propose([DraftRequest(request_id, num_tokens)])
    return proposal


def _serve(drafter: SuffixDrafter, request_id: str, prompt: list[int], output: list[int]) -> None:
    """One whole request: its output committed a few tokens per round."""
    drafter.start(request_id, prompt, GREEDY)
    for i in range(0, len(output), 3):
        drafter.accept(DraftUpdate(request_id, 0, output[i : i + 3]))
    drafter.finish(request_id)


def test_satisfies_drafter_protocol() -> None:
    drafter: Drafter = SuffixDrafter()
    assert drafter.name == "suffix"
    assert drafter.hidden_layers == ()


def test_copies_from_the_prompt_with_point_mass_proposals() -> None:
    drafter = SuffixDrafter(SuffixConfig(cache_tokens=0))
    prompt = [*range(100, 130), 7, *range(100, 110)]  # the text restarts: 10 tokens match
    drafter.start("r", prompt, GREEDY)
    proposal = _propose(drafter, "r", 16)
    assert proposal.token_ids == list(range(110, 120))  # 10 matched tokens allow 10
    assert proposal.draft_probs is None and proposal.from_lookup
    assert proposal.parents is None
    assert proposal.confidence == [1.0] * 10
    assert proposal.evidence == "suffix request match 8+"  # 10 tokens matched
    assert len(_propose(drafter, "r", 4)) == 4
    drafter.accept(DraftUpdate("r", 4, [110, 111, 112, 113, 114]))
    assert _propose(drafter, "r", 16).token_ids == list(range(115, 130))
    assert drafter.context("r") == [*prompt, 110, 111, 112, 113, 114]


def test_no_match_proposes_nothing() -> None:
    drafter = SuffixDrafter()
    drafter.start("r", [1, 2, 3, 4], GREEDY)
    assert _propose(drafter, "r", 8).token_ids == []


def test_finished_outputs_serve_later_requests() -> None:
    drafter = SuffixDrafter()
    answer = list(range(200, 240))
    _serve(drafter, "first", [1, 2, 3], answer)
    assert drafter.cache.num_tokens == len(answer)  # the output, not the prompt
    # A different request starts writing the same answer: the cache drafts it.
    drafter.start("second", [9, 8, 7], GREEDY)
    drafter.accept(DraftUpdate("second", 0, answer[:12]))
    proposal = _propose(drafter, "second", 16)
    assert proposal.token_ids == answer[12:24]
    assert proposal.evidence == "suffix cache match 8+"  # 12 tokens matched
    assert proposal.clipped(3).evidence == proposal.evidence
    assert drafter.global_proposals == 1
    drafter.finish("second")


def test_cached_prompts_are_optional() -> None:
    prompt = list(range(300, 330))
    for cache_prompts, cached in ((False, 2), (True, 32)):
        drafter = SuffixDrafter(SuffixConfig(cache_prompts=cache_prompts))
        _serve(drafter, "a", prompt, [5, 6])
        assert drafter.cache.num_tokens == cached
        drafter.start("b", prompt[:10], GREEDY)
        assert len(_propose(drafter, "b", 8)) == (8 if cache_prompts else 0)


def test_trees_when_configured() -> None:
    speculation = SpeculationParams(max_spec_factor=4.0)
    drafter = SuffixDrafter(SuffixConfig(tree=True, cache_tokens=0, speculation=speculation))
    drafter.start("r", [8, 5, 1, 2, 8, 5, 1, 3, 8, 5, 1], GREEDY)
    proposal = _propose(drafter, "r", 4)
    assert proposal.is_tree
    assert sorted(proposal.token_ids[:2]) == [2, 3]
    assert proposal.parents is not None and proposal.parents[:2] == [-1, -1]
    assert proposal.confidence is not None and proposal.confidence[:2] == [0.5, 0.5]


def _random_workload(seed: int) -> list[tuple[list[int], list[int]]]:
    """Requests over a small vocabulary whose outputs reuse earlier text."""
    rng = random.Random(seed)
    pieces = [[rng.randrange(12) for _ in range(rng.randint(2, 8))] for _ in range(6)]
    return [
        (
            [t for _ in range(rng.randint(1, 3)) for t in rng.choice(pieces)],
            [t for _ in range(rng.randint(1, 4)) for t in rng.choice(pieces)],
        )
        for _ in range(6)
    ]


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 12), st.integers(0, 12), st.booleans())
def test_proposals_equal_brute_force_and_respect_the_ceiling(
    seed: int, num_tokens: int, lookup_tokens: int, as_tree: bool
) -> None:
    config = SuffixConfig(max_depth=8, cache_tokens=40, tree=as_tree)
    drafter = SuffixDrafter(config)
    twin = SuffixDrafter(config)
    for n, (prompt, output) in enumerate(_random_workload(seed)):
        rid = f"r{n}"
        for d in (drafter, twin):
            d.start(rid, prompt, GREEDY)
        committed = list(prompt)
        for i in range(0, len(output), 2):
            ask = DraftRequest(rid, num_tokens, lookup_tokens)
            cached = [drafter.cache.tree.sequence(s) for s in drafter.cache.sequence_ids()]
            (proposal,) = drafter.propose([ask])
            assert twin.propose([ask]) == [proposal]  # deterministic
            assert len(proposal) <= ask.most
            context = committed[-(config.max_depth - 1) :]
            args = (context, ask.most, config.speculation, config.max_depth, as_tree)
            local = brute_speculate([committed], *args)
            found = brute_speculate(cached, *args)
            best = found if found.score > local.score else local
            assert proposal.token_ids == best.token_ids
            assert proposal.confidence == best.conditional_probs()
            assert proposal.parents == (best.parents if as_tree else None)
            for d in (drafter, twin):
                d.accept(DraftUpdate(rid, 0, output[i : i + 2]))
            committed += output[i : i + 2]
        for d in (drafter, twin):
            d.finish(rid)
        assert drafter.cache.num_tokens <= config.cache_tokens


def test_unknown_and_duplicate_requests_are_errors() -> None:
    drafter = SuffixDrafter()
    drafter.start("r", [1], GREEDY)
    with pytest.raises(ValueError):
        drafter.start("r", [1], GREEDY)
    with pytest.raises(KeyError):
        drafter.propose([DraftRequest("x", 4)])
    with pytest.raises(ValueError):
        drafter.accept(DraftUpdate("r", 3, [1]))


@pytest.mark.parametrize(("k", "batch"), [(4, 1), (16, 4)])
def test_greedy_through_the_engine_equals_target_only(tiny_dir_factory, k: int, batch: int) -> None:  # type: ignore[no-untyped-def]
    target_dir = tiny_dir_factory("qwen2")
    prompts = _prompts(batch)
    reference = _run(target_dir, None, prompts, k=0)
    assert _run(target_dir, SuffixDrafter(), prompts, k=k) == reference


def test_a_repeated_request_is_drafted_from_the_cache(tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    """A request whose answer an earlier request already wrote: once its first
    tokens match, the cache drafts the rest and whole rounds are accepted."""
    model = load_model(tiny_dir_factory("qwen2"))
    drafter = SuffixDrafter()
    engine = SpecEngine(
        LocalTarget(model, num_slots=2, max_len=128),
        drafter,
        tokenizer=None,
        eos_token_ids=(),
        config=EngineConfig(max_batch=1, num_speculative_tokens=16, adaptive=False),
    )
    prompt = _prompts(1, seed=3)[0]
    stop = StoppingCriteria(max_tokens=40, ignore_eos=True)
    outputs = {}
    for rid in ("first", "again"):
        chunks = list(engine.generate([GenerationRequest(rid, prompt, GREEDY, stop)]))
        outputs[rid] = ([t for c in chunks for t in c.token_ids], chunks[-1].stats)
    (first, first_stats), (again, again_stats) = outputs["first"], outputs["again"]
    assert again == first
    assert drafter.global_proposals > 0
    assert again_stats.rounds < first_stats.rounds
    assert again_stats.accepted_tokens > again_stats.rounds  # more than one token a round
