"""Token trees through the round, in one process (fp32).

Greedy output with tree drafts must equal target-only decoding for every
drafter, ceiling and batch size; the target must really be fed trees and
keep paths that are not a prefix of the nodes (a cache move, no second
forward); sampled output with trees must be reproducible from its seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from test_spec_engine import MAX_TOKENS, _prompts, _reference
from tiny_models import VOCAB

from specray.actors.drafting.base import (
    Drafter,
    DraftPaths,
    DraftProposal,
    DraftRequest,
    DraftUpdate,
)
from specray.actors.drafting.build import build_drafter
from specray.actors.drafting.hybrid import HybridDrafter
from specray.actors.drafting.ngram import NgramDrafter
from specray.actors.drafting.spec import DrafterSpec
from specray.actors.drafting.suffix import SpeculationParams, SuffixConfig, SuffixDrafter
from specray.actors.engine.engine import EngineConfig, SpecEngine
from specray.actors.engine.request import GenerationRequest
from specray.actors.engine.target import LocalTarget, VerifyInput, VerifyOutput
from specray.actors.model.loader import load_model
from specray.actors.sampling.params import SamplingParams, StoppingCriteria


class SiblingOracle:
    """Trees whose first child at every depth is wrong and whose second is
    the target's greedy token: every accepted path skips a node per level,
    so the target must move the kept entries into place."""

    name = "sibling-oracle"
    hidden_layers: tuple[int, ...] = ()
    paths = DraftPaths(model=False, lookup=True)

    def __init__(self, answers: dict[tuple[int, ...], list[int]]) -> None:
        self.answers = answers  # prompt -> the target's greedy output
        self._requests: dict[str, tuple[list[int], list[int]]] = {}

    def start(self, request_id: str, prompt_ids: Sequence[int], sampling: SamplingParams) -> None:
        self._requests[request_id] = (self.answers[tuple(prompt_ids)], [])

    def propose(self, requests: Sequence[DraftRequest]) -> list[DraftProposal]:
        proposals = []
        for r in requests:
            answer, done = self._requests[r.request_id]
            right = answer[len(done) : len(done) + r.most // 2]
            tokens, parents = [], []
            for depth, token in enumerate(right):
                tokens += [(token + 1) % VOCAB, token]
                parents += [2 * depth - 1, 2 * depth - 1]
            proposals.append(DraftProposal(tokens, from_lookup=True, parents=parents or None))
        return proposals

    def accept(self, update: DraftUpdate) -> None:
        self._requests[update.request_id][1].extend(update.new_token_ids)

    def finish(self, request_id: str) -> None:
        del self._requests[request_id]


class RecordingTarget(LocalTarget):
    """A local target that remembers the trees it was fed and the paths it kept."""

    trees = 0
    moved_paths = 0

    def verify(
        self, inputs: Sequence[VerifyInput], hidden_layers: tuple[int, ...] = ()
    ) -> list[VerifyOutput]:
        for item in inputs:
            self.trees += item.parents is not None
            path = item.accepted
            self.moved_paths += path is not None and list(path.nodes) != list(
                range(len(path.nodes))
            )
        return super().verify(inputs, hidden_layers)


def _suffix(tree: bool) -> SuffixDrafter:
    speculation = SpeculationParams(max_spec_factor=4.0, min_token_prob=0.0)
    return SuffixDrafter(SuffixConfig(tree=tree, speculation=speculation))


DrafterFactory = Callable[[Path, dict[tuple[int, ...], list[int]]], Drafter]
DRAFTERS: dict[str, DrafterFactory] = {
    "suffix": lambda target, answers: _suffix(tree=False),
    "suffix-tree": lambda target, answers: _suffix(tree=True),
    "sibling-oracle": lambda target, answers: SiblingOracle(answers),
    "hybrid=suffix-tree+ngram": lambda target, answers: HybridDrafter(
        _suffix(tree=True), NgramDrafter(max_ngram=3), 1
    ),
}


def _generate(
    target: LocalTarget,
    drafter: Drafter,
    prompts: list[list[int]],
    k: int,
    sampling: SamplingParams | None = None,
) -> dict[str, list[int]]:
    config = EngineConfig(max_batch=8, num_speculative_tokens=k, adaptive=False)
    engine = SpecEngine(target, drafter, None, (), config)
    stop = StoppingCriteria(max_tokens=MAX_TOKENS, ignore_eos=True)
    requests = [
        GenerationRequest(f"r{i}", p, sampling or SamplingParams(), stop)
        for i, p in enumerate(prompts)
    ]
    outputs: dict[str, list[int]] = {r.request_id: [] for r in requests}
    for chunk in engine.generate(requests):
        outputs[chunk.request_id] += chunk.token_ids
    return outputs


@pytest.mark.parametrize("drafter", sorted(DRAFTERS))
@pytest.mark.parametrize(("k", "batch"), [(4, 1), (16, 3)])
def test_greedy_with_trees_equals_target_only(
    tiny_dir_factory: Callable[..., Path], drafter: str, k: int, batch: int
) -> None:
    target_dir = tiny_dir_factory("qwen2")
    prompts = _prompts(batch)
    reference = _reference(target_dir, prompts)
    answers = {tuple(p): reference[f"r{i}"] for i, p in enumerate(prompts)}
    target = RecordingTarget(load_model(target_dir), num_slots=8, max_len=128)
    assert _generate(target, DRAFTERS[drafter](target_dir, answers), prompts, k) == reference
    if drafter == "sibling-oracle":
        assert target.trees > 0 and target.moved_paths > 0


def test_sampled_trees_are_reproducible_from_the_seed(
    tiny_dir_factory: Callable[..., Path],
) -> None:
    target_dir = tiny_dir_factory("qwen2")
    prompts = _prompts(2)
    reference = _reference(target_dir, prompts)
    answers = {tuple(p): reference[f"r{i}"] for i, p in enumerate(prompts)}
    model = load_model(target_dir)
    runs = []
    for _ in range(2):
        target = RecordingTarget(model, num_slots=8, max_len=128)
        sampling = SamplingParams(temperature=0.8, seed=11)
        runs.append(_generate(target, SiblingOracle(answers), prompts, 8, sampling))
        assert target.trees > 0
    assert runs[0] == runs[1]
    assert all(len(tokens) == MAX_TOKENS for tokens in runs[0].values())


def test_main_chain_follows_first_children() -> None:
    tree = DraftProposal([5, 6, 7, 8, 9], parents=[-1, -1, 0, 0, 2], confidence=[0.9] * 5)
    chain = tree.main_chain()
    assert chain.token_ids == [5, 7, 9] and chain.parents is None
    assert chain.confidence == [0.9] * 3 and chain.from_lookup == tree.from_lookup
    assert DraftProposal([1, 2]).main_chain() == DraftProposal([1, 2])


def test_suffix_kinds_build_suffix_drafters(tiny_dir_factory: Callable[..., Path]) -> None:
    draft_dir = tiny_dir_factory("qwen2", 7)
    suffix = build_drafter(DrafterSpec("suffix"), "float32", 2, 64)
    assert isinstance(suffix, SuffixDrafter) and suffix.config.tree
    assert not DrafterSpec("suffix").paths.model and DrafterSpec("suffix").paths.lookup
    spec = DrafterSpec.parse(f"suffix+{draft_dir}")
    assert spec is not None and spec.paths.model and spec.paths.lookup
    hybrid = build_drafter(spec, "float32", 2, 64, tiny_dir_factory("qwen2"))
    assert isinstance(hybrid, HybridDrafter) and isinstance(hybrid.lookup, SuffixDrafter)
