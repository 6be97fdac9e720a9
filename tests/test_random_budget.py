"""Greedy speculation equals target-only decoding whatever a round verifies.

The adaptive budget's choices follow measured timings, so which verify
shapes a run produces is not reproducible. A seeded random budget
(``specray.bench.budget_fuzz.RandomBudget``) cuts every draft to a random
length instead: chains and trees of every size, drafts riding on prefill
chunks, side branches accepted and moved into place, in batches, with the
prefix cache serving later requests. The reference is the plain no-cache
argmax loop, which shares no code with the round. (A chained draft model's
drafts are never cut by the budget, which prices them while drafting: the
greedy table of test_spec_engine.py covers them at every ceiling.)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from serving_helpers import save_served_model
from test_spec_engine import MAX_TOKENS, _prompts, _reference

from specray.actors.drafting.base import Drafter
from specray.actors.drafting.draft_model import DraftModelDrafter
from specray.actors.drafting.hybrid import HybridDrafter
from specray.actors.drafting.ngram import NgramDrafter
from specray.actors.drafting.suffix import SpeculationParams, SuffixConfig, SuffixDrafter
from specray.actors.engine.engine import EngineConfig, SpecEngine
from specray.actors.engine.request import GenerationRequest
from specray.actors.engine.target import LocalTarget
from specray.actors.model.loader import load_model
from specray.actors.sampling.params import SamplingParams, StoppingCriteria
from specray.bench import budget_fuzz
from specray.bench.budget_fuzz import fuzzed
from specray.bench.prompts import load_prompts, sessions


def _suffix_tree() -> SuffixDrafter:
    speculation = SpeculationParams(max_spec_factor=4.0, min_token_prob=0.0)
    return SuffixDrafter(SuffixConfig(tree=True, speculation=speculation))


DrafterFactory = Callable[[Callable[..., Path]], Drafter]
DRAFTERS: dict[str, DrafterFactory] = {
    "suffix-tree": lambda make: _suffix_tree(),
    "ngram": lambda make: NgramDrafter(max_ngram=3),
    "hybrid=suffix-tree+draft-model": lambda make: HybridDrafter(
        _suffix_tree(), DraftModelDrafter(load_model(make("qwen2", 7)), 8, 128), 2
    ),
}


@pytest.mark.parametrize("drafter", sorted(DRAFTERS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_equals_target_only_under_a_random_budget(
    tiny_dir_factory: Callable[..., Path], drafter: str, seed: int
) -> None:
    target_dir = tiny_dir_factory("qwen2")
    # The same prompts twice, the second time as later requests, so the
    # prefix cache serves them and the suffix tree has seen their answers.
    prompts = _prompts(3, seed)
    reference = _reference(target_dir, prompts)
    target = LocalTarget(load_model(target_dir), num_slots=8, max_len=128, prefix_tokens=512)
    # A round budget of 8 tokens: prompts prefill over several rounds, the
    # last chunk carrying drafts, beside requests that decode.
    config = EngineConfig(max_batch=8, num_speculative_tokens=16, max_batched_tokens=8)
    engine = SpecEngine(target, DRAFTERS[drafter](tiny_dir_factory), None, (), config)
    budget = fuzzed(engine, seed)
    stop = StoppingCriteria(max_tokens=MAX_TOKENS, ignore_eos=True)
    for attempt in range(2):
        requests = [
            GenerationRequest(f"r{i}-{attempt}", p, SamplingParams(), stop)
            for i, p in enumerate(prompts)
        ]
        outputs: dict[str, list[int]] = {r.request_id: [] for r in requests}
        for chunk in engine.generate(requests):
            outputs[chunk.request_id] += chunk.token_ids
        assert outputs == {f"r{i}-{attempt}": reference[f"r{i}"] for i in range(len(prompts))}
    # The budget really varied what was verified.
    assert len(set(budget.kept)) >= 3


def test_the_budget_fuzz_bench_replays_sessions_against_target_only(tmp_path: Path) -> None:
    model = save_served_model(tmp_path / "model")
    argv = [
        "--target", str(model), "--dtype", "float32", "--threads", "1", "--sessions", "1",
        "--max-tokens", "8", "--resend", "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    result = budget_fuzz.main(argv)
    session = sessions(load_prompts(["agentic"]))[0]
    assert [row["id"] for row in result["rows"]] == [p.id for p in session]
    assert all(row["first_difference"] is None for row in result["rows"])
    assert result["summary"]["identical"] == result["summary"]["turns"] == len(session)
    text = (tmp_path / "out" / "budget_fuzz_model_dense.md").read_text()
    assert "whole conversation resent" in text and f"in {len(session)} of {len(session)}" in text
