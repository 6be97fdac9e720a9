"""A model drafter's cost-aware stop (``DraftStop``): the rule itself, where
each model drafter stops, that a stopped proposal leaves the same state as
a shorter one, the scheduler's stop rules, and greedy output unchanged."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from references import greedy_reference
from scheduling_helpers import decoding_run
from tiny_models import VOCAB

from specray.actors.drafting.base import (
    DraftPaths,
    DraftProposal,
    DraftRequest,
    DraftStop,
    DraftUpdate,
)
from specray.actors.drafting.draft_model import DraftModelDrafter
from specray.actors.drafting.head.checkpoint import init_from_target, load_frozen
from specray.actors.drafting.head.config import HeadConfig
from specray.actors.drafting.head.drafter import HeadDrafter
from specray.actors.drafting.head.model import DraftHead
from specray.actors.engine.costs import RoundCostModel
from specray.actors.engine.engine import EngineConfig, SpecEngine
from specray.actors.engine.request import GenerationRequest
from specray.actors.engine.scheduling import GammaScheduler
from specray.actors.engine.target import LocalTarget
from specray.actors.model.config import ModelConfig
from specray.actors.model.loader import load_model
from specray.actors.sampling.params import SamplingParams, StoppingCriteria

FLAT = (1.0,) * 9  # every draft free: keep them all
SECOND_ONLY = (1.0, 1.0, 1.0, 1e9, 1e9, 1e9, 1e9)  # a third draft is never worth it


def test_the_rule_keeps_a_draft_only_while_tokens_per_second_rise() -> None:
    stop = DraftStop((1.0, 1.0, 1.1, 3.0))
    assert stop.keeps(1, 1.0, 0.01)  # the first draft is the scheduler's choice
    assert DraftStop((1.0, 100.0)).keeps(1, 1.0, 0.01)
    # (1.9 + 0.8) * 1.0 >= 1.9 * 1.1: worth 10% more time
    assert stop.keeps(2, 1.9, 0.8)
    assert not stop.keeps(2, 1.9, 0.1)  # 2.0 < 2.09
    assert not stop.keeps(3, 1.0, 1.0)  # 2 * 1.1 < 1 * 3.0: no survival pays for it
    assert not stop.keeps(4, 1.0, 1.0)  # past the ceiling
    # A batch that expects many tokens anyway asks more of each draft.
    assert not DraftStop((1.0, 1.0, 1.1), others_expected=10.0).keeps(2, 1.9, 0.8)


def test_a_step_is_run_only_where_its_draft_could_pay_and_a_made_draft_is_weighed_as_paid() -> None:
    """``tries`` before the step: could the draft pay were it certain?
    ``keeps`` after it: with the step paid whichever way, only its
    verification is weighed."""
    # The second draft costs a step of 0.3 and a verified token of 0.1.
    stop = DraftStop((1.0, 1.0, 1.4, 1e9), draft_seconds=(0.0, 0.0, 0.3, 1.0))
    assert stop.tries(1, 1.0, 1.0)
    assert stop.tries(2, 1.9, 0.9)  # (1.9 + 0.9) * 1.0 >= 1.9 * 1.4
    assert not stop.tries(2, 1.2, 0.2)  # certain, it would add 0.2: 1.4 < 1.68
    assert not stop.tries(3, 1.0, 1.0)  # no survival pays 1e9
    # Made, the second draft is weighed against 1.3 s, not 1.0 s: kept at
    # a survival the step alone would not have paid for.
    assert stop.keeps(2, 1.9, 0.3)  # (1.9 + 0.3) * 1.3 >= 1.9 * 1.4
    assert not DraftStop((1.0, 1.0, 1.4)).keeps(2, 1.9, 0.3)  # its step unpaid: 2.2 < 2.66
    assert not stop.keeps(2, 1.9, 0.05)  # 1.95 * 1.3 < 2.66
    with pytest.raises(ValueError, match="draft_seconds has 2 entries for 3"):
        DraftStop((1.0, 1.0, 1.6), draft_seconds=(0.0, 0.5))


def _head_drafter(model_dir: Path) -> HeadDrafter:
    config = ModelConfig.from_pretrained(model_dir)
    vocab = torch.arange(VOCAB)
    torch.manual_seed(0)
    layers = (0, 1, 2)
    head = DraftHead(
        HeadConfig.for_target(str(model_dir), config, VOCAB, layers),
        vocab,
        load_frozen(model_dir, vocab),
    )
    init_from_target(head, model_dir, config)
    return HeadDrafter(head.eval(), 2, 64)


def _model_drafter(model_dir: Path) -> DraftModelDrafter:
    return DraftModelDrafter(load_model(model_dir), 2, 64)


def _ready(drafter: DraftModelDrafter | HeadDrafter, request_id: str) -> None:
    drafter.start(request_id, [1, 2, 3, 4], SamplingParams())
    if isinstance(drafter, HeadDrafter):  # it drafts from the target's hidden states
        hidden = torch.ones(1, drafter.head.config.fused_size)
        drafter.accept(DraftUpdate(request_id, 0, [5], hidden))


def _propose(
    drafter: DraftModelDrafter | HeadDrafter, round_seconds: Sequence[float] | None
) -> DraftProposal:
    stop = None if round_seconds is None else DraftStop(tuple(round_seconds))
    return drafter.propose([DraftRequest("r", 6, stop=stop)])[0]


class _CountingModel:
    """A draft model that counts its forwards."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.forwards = 0

    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.forwards += 1
        return self.model(*args, **kwargs)


@pytest.mark.parametrize("kind", ["draft model", "head"])
def test_a_model_drafter_stops_where_the_next_draft_is_not_worth_it(
    tiny_dir_factory, kind: str
) -> None:  # type: ignore[no-untyped-def]
    model_dir = tiny_dir_factory("qwen2")
    build = _model_drafter if kind == "draft model" else _head_drafter
    drafters = [build(model_dir) for _ in range(3)]
    for drafter in drafters:
        _ready(drafter, "r")
    counted = None
    if isinstance(drafters[2], DraftModelDrafter):
        counted = _CountingModel(drafters[2].model)
        drafters[2].model = counted  # type: ignore[assignment]
    whole, free, stopped = (
        _propose(drafters[0], None),
        _propose(drafters[1], FLAT),
        _propose(drafters[2], SECOND_ONLY),
    )
    assert len(whole) == 6 and free.token_ids == whole.token_ids
    assert whole.confidence is not None and all(0.0 < c <= 1.0 for c in whole.confidence)
    assert stopped.token_ids == whole.token_ids[:2]
    # No survival pays for a third draft: its step is never run.
    assert stopped.dropped == 0
    if counted is not None:
        assert counted.forwards == 2
    assert stopped.confidence == pytest.approx(whole.confidence[:2])
    # A stopped proposal leaves the state a shorter one would: the next round
    # drafts the same as after a drafter that never stopped.
    committed = [*whole.token_ids[:1], 7]
    hidden = torch.ones(2, drafters[0].head.config.fused_size) if kind == "head" else None
    for drafter in (drafters[0], drafters[2]):
        drafter.accept(DraftUpdate("r", 1, committed, hidden))
    assert _propose(drafters[2], None).token_ids == _propose(drafters[0], None).token_ids


def test_the_scheduler_asks_for_the_ceiling_with_a_stop_priced_per_draft() -> None:
    costs = RoundCostModel()
    costs.verify.set_profile([(1, 0.1), (4, 0.12), (32, 0.9)])
    costs.draft.set_profile([(1, 0.01), (64, 0.05)])
    batch = [
        decoding_run("a", 1, 0.9, max_tokens=64, max_gamma=8),
        decoding_run("b", 1, 0.9, max_tokens=64, max_gamma=8),
    ]
    GammaScheduler(DraftPaths(model=True, lookup=False), costs=costs).choose(batch)
    for run in batch:
        stop = run.draft.stop
        assert run.draft.gamma == 8
        assert stop is not None and len(stop.round_seconds) == 9
        assert list(stop.round_seconds) == sorted(stop.round_seconds)
        assert stop.others_expected > 1.0  # the other request drafts too
    # Compute-bound verification: not even a perfect drafter would pay,
    # so nobody drafts (not even a probe) and nobody needs a stop.
    costs.verify.set_profile([(1, 0.1), (32, 3.2)])
    batch = [decoding_run("a", 1, 0.6, max_tokens=64, max_gamma=8)]
    scheduler = GammaScheduler(DraftPaths(model=True, lookup=False), costs=costs)
    scheduler.choose(batch)
    scheduler.choose(batch)
    assert batch[0].draft.gamma == 0 and batch[0].draft.stop is None


class _Recording(DraftModelDrafter):
    """A draft model that records how long each proposal was and what was asked."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.asked: list[int] = []
        self.lengths: list[int] = []

    def propose(self, requests: Sequence[DraftRequest]) -> list[DraftProposal]:
        proposals = super().propose(requests)
        self.asked += [r.num_tokens for r in requests if r.stop is not None]
        self.lengths += [
            len(p) for p, r in zip(proposals, requests, strict=True) if r.stop is not None
        ]
        return proposals


def test_greedy_output_is_unchanged_where_stops_cut_drafts(tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    """A steep verify curve: the scheduler drafts, and the stops cut the
    unrelated draft model's proposals short of the ceiling."""
    target_dir = tiny_dir_factory("qwen2")
    gen = torch.Generator().manual_seed(4)
    prompts = {f"r{i}": torch.randint(3, VOCAB, (6 + i,), generator=gen).tolist() for i in range(3)}
    reference = greedy_reference(target_dir, prompts, 20)
    costs = RoundCostModel()
    costs.verify.set_profile([(1, 0.1), (2, 0.1), (4, 0.11), (8, 0.3), (64, 3.0)])
    costs.draft.set_profile([(1, 0.001), (64, 0.002)])
    drafter = _Recording(load_model(tiny_dir_factory("qwen2", 7)), 4, 128)
    engine = SpecEngine(
        LocalTarget(load_model(target_dir), num_slots=4, max_len=128),
        drafter,
        tokenizer=None,
        eos_token_ids=(),
        config=EngineConfig(max_batch=4, num_speculative_tokens=8, adaptive=True),
        costs=costs,
    )
    requests = [
        GenerationRequest(
            rid, p, SamplingParams(), StoppingCriteria(max_tokens=20, ignore_eos=True)
        )
        for rid, p in prompts.items()
    ]
    outputs: dict[str, list[int]] = {rid: [] for rid in prompts}
    for chunk in engine.generate(requests):
        outputs[chunk.request_id] += chunk.token_ids
    assert outputs == reference
    # Asked for the ceiling (less near max_tokens), and the stops cut some.
    assert drafter.asked and max(drafter.asked) == 8
    assert any(0 < n < asked for n, asked in zip(drafter.lengths, drafter.asked, strict=True))


@pytest.mark.parametrize("kind", ["draft model", "head"])
def test_a_dropped_draft_is_reported_and_no_step_runs_that_could_not_pay(
    tiny_dir_factory, kind: str
) -> None:  # type: ignore[no-untyped-def]
    """A stop that lets the second draft be tried but not kept: the
    proposal says it dropped one, a draft model ran exactly the steps it
    reports, and the next round drafts as after a drafter that never
    stopped. A third step, which no survival could pay for, never runs."""
    model_dir = tiny_dir_factory("qwen2")
    build = _model_drafter if kind == "draft model" else _head_drafter
    drafters = [build(model_dir) for _ in range(2)]
    for drafter in drafters:
        _ready(drafter, "r")
    whole = _propose(drafters[0], None)
    assert whole.confidence is not None
    first, second = whole.confidence[:2]
    # The second step is tried (certain, the draft would pay) and its draft
    # dropped (at its own confidence it does not): T2 / T1 = 1 + x.
    x = first * (1 + second) / 2 / (1 + first)
    counted = None
    if isinstance(drafters[1], DraftModelDrafter):
        counted = _CountingModel(drafters[1].model)
        drafters[1].model = counted  # type: ignore[assignment]
    stopped = _propose(drafters[1], (1.0, 1.0, 1.0 + x, 1e9, 1e9, 1e9, 1e9))
    assert stopped.token_ids == whole.token_ids[:1] and stopped.dropped == 1
    if counted is not None:
        assert counted.forwards == stopped.model_steps == 2
    committed = [whole.token_ids[0], 7]
    hidden = torch.ones(2, drafters[0].head.config.fused_size) if kind == "head" else None
    for drafter in drafters:
        drafter.accept(DraftUpdate("r", 1, committed, hidden))
    assert _propose(drafters[1], None).token_ids == _propose(drafters[0], None).token_ids
