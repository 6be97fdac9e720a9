"""Chunked prefill: prompts feed the target in chunks within a per-round
token budget, beside requests that decode, and the output does not change."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from references import greedy_reference
from tiny_models import VOCAB
from tiny_v4 import save_tiny_v4

from specray.actors.drafting.base import (
    Drafter,
    DraftPaths,
    DraftProposal,
    DraftRequest,
    DraftUpdate,
)
from specray.actors.drafting.draft_model import DraftModelDrafter
from specray.actors.drafting.ngram import NgramDrafter
from specray.actors.engine.engine import EngineConfig, SpecEngine
from specray.actors.engine.gamma import SurvivalEstimate
from specray.actors.engine.lifecycle import start_request
from specray.actors.engine.request import DraftState, GenerationRequest, RunningRequest
from specray.actors.engine.scheduling import GammaScheduler
from specray.actors.engine.target import LocalTarget, VerifyInput, VerifyOutput
from specray.actors.model.loader import load_model
from specray.actors.sampling.params import SamplingParams, StoppingCriteria

MAX_TOKENS = 12


class RecordingTarget(LocalTarget):
    """A local target that remembers how many tokens each verify fed."""

    fed: list[int]

    def verify(
        self, inputs: Sequence[VerifyInput], hidden_layers: tuple[int, ...] = ()
    ) -> list[VerifyOutput]:
        self.fed.append(sum(len(item.token_ids) for item in inputs))
        return super().verify(inputs, hidden_layers)


def _prompt(length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    body = torch.randint(3, VOCAB, (length - 4,), generator=gen).tolist()
    return body + body[:4]


def _run(
    model_dir: Path, drafter: Drafter | None, prompts: list[list[int]], budget: int | None
) -> tuple[dict[str, list[int]], list[int], list[list[str]]]:
    """Outputs by request, tokens fed per verify, and which requests streamed
    tokens in each step."""
    target = RecordingTarget(load_model(model_dir), num_slots=4, max_len=256)
    target.fed = []
    config = EngineConfig(
        max_batch=4, num_speculative_tokens=3, adaptive=False, max_batched_tokens=budget
    )
    engine = SpecEngine(target, drafter, None, (), config)
    stopping = StoppingCriteria(max_tokens=MAX_TOKENS, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(GenerationRequest(f"r{i}", prompt, stopping=stopping))
    outputs: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    streamed: list[list[str]] = []
    while engine.has_work:
        chunks = engine.step()
        streamed.append([c.request_id for c in chunks if c.token_ids])
        for chunk in chunks:
            outputs[chunk.request_id] += chunk.token_ids
    assert not engine.running and target.num_active == 0
    return outputs, target.fed, streamed


@pytest.mark.parametrize("drafter_name", ["none", "ngram", "draft model"])
def test_chunked_prefill_equals_the_no_cache_reference(tiny_dir_factory, drafter_name: str) -> None:  # type: ignore[no-untyped-def]
    model_dir = tiny_dir_factory("qwen2")
    prompts = [_prompt(60, 1), _prompt(9, 2), _prompt(37, 3)]
    drafter: Drafter | None = None
    if drafter_name == "ngram":
        drafter = NgramDrafter(max_ngram=3)
    elif drafter_name == "draft model":
        drafter = DraftModelDrafter(load_model(tiny_dir_factory("qwen2", 7)), 4, 256)
    outputs, fed, _ = _run(model_dir, drafter, prompts, budget=16)
    named = {f"r{i}": p for i, p in enumerate(prompts)}
    assert outputs == greedy_reference(model_dir, named, MAX_TOKENS)
    # Prefill never fed more than the budget in a round; drafts ride on top
    # (at most k + 1 tokens per decoding request).
    assert max(fed) <= 16 + 4 * 3
    assert len(fed) > sum(len(p) for p in prompts) // 16


def test_decoding_requests_stream_every_round_while_a_long_prompt_prefills(
    tiny_dir_factory,
) -> None:  # type: ignore[no-untyped-def]
    model_dir = tiny_dir_factory("qwen2")
    target = LocalTarget(load_model(model_dir), num_slots=2, max_len=256)
    config = EngineConfig(
        max_batch=2, num_speculative_tokens=0, adaptive=False, max_batched_tokens=8
    )
    engine = SpecEngine(target, None, None, (), config)
    stopping = StoppingCriteria(max_tokens=40, ignore_eos=True)
    engine.add_request(GenerationRequest("short", _prompt(6, 4), stopping=stopping))
    engine.step()  # the short prompt prefills and decodes its first token
    engine.add_request(GenerationRequest("long", _prompt(120, 5), stopping=stopping))
    rounds_until_long = 0
    while True:
        chunks = {c.request_id: c for c in engine.step()}
        assert chunks["short"].token_ids  # never held back by the prefill
        if "long" in chunks:
            break
        rounds_until_long += 1
    # 120 prompt tokens, at most 7 a round beside the one decode.
    assert rounds_until_long >= 120 // 8


def _running(request_id: str, prompt_len: int, cached: int) -> RunningRequest:
    draft = DraftState(SurvivalEstimate(), SurvivalEstimate())
    run = start_request(GenerationRequest(request_id, [3] * prompt_len), (), None, 4, draft)
    run.cached_len = cached
    draft.attach(0, prompt_len)
    return run


def test_feeds_put_decodes_first_then_the_shortest_prompts() -> None:
    paths = DraftPaths(model=False, lookup=True)
    scheduler = GammaScheduler(paths, adaptive=False, max_batched_tokens=20)
    decode = _running("decode", 30, 29)
    first = _running("first", 15, 0)
    second = _running("second", 50, 0)
    third = _running("third", 50, 0)
    batch = [decode, first, second, third]
    scheduler.choose(batch)
    assert [r.feed for r in batch] == [1, 15, 4, 0]
    assert [r.prefilling for r in batch] == [False, False, True, True]
    # Only a request that feeds all it has left may draft.
    assert [r.draft.lookup_gamma for r in batch] == [4, 4, 0, 0]


def test_a_short_prompt_is_not_queued_behind_a_long_one() -> None:
    """The oldest prompt keeps a quarter of the prefill budget; a short one
    that arrived after it is fed whole in the same round."""
    scheduler = GammaScheduler(None, max_batched_tokens=64)
    batch = [_running("d", 10, 9), _running("long", 3000, 0), _running("short", 12, 0)]
    scheduler.choose(batch)
    assert [r.feed for r in batch] == [1, 51, 12]
    assert [r.prefilling for r in batch] == [False, True, False]
    # A stream of short prompts never stops the long one.
    shorts = [_running(f"s{i}", 40, 0) for i in range(5)]
    batch = [_running("long", 3000, 0), *shorts]
    scheduler.choose(batch)
    assert batch[0].feed == 16 and sum(r.feed for r in batch) == 64


def test_a_prompt_is_priced_by_what_its_prefix_cache_leaves_to_compute() -> None:
    """Two prompts waiting their turn have peeked: "mostly" is cached but
    for 6 of its 50 tokens, "cold" not at all. "mostly" goes first, whole,
    for 6 tokens of the budget; the oldest keeps its quarter."""
    scheduler = GammaScheduler(None, max_batched_tokens=20)
    oldest, cold, mostly = _running("oldest", 90, 0), _running("cold", 30, 0), _running("m", 50, 0)
    mostly.prefix_hint = 44
    batch = [oldest, cold, mostly]
    scheduler.choose(batch)
    assert [r.feed for r in batch] == [5, 9, 50]
    assert [r.feed_cost for r in batch] == [5, 9, 6] and not mostly.prefilling
    # Chunked, the first feed covers the cached prefix and a share of the rest.
    scheduler = GammaScheduler(None, max_batched_tokens=4)
    scheduler.choose([mostly])
    assert mostly.feed == 48 and mostly.feed_cost == 4


def test_cached_prompts_sent_together_all_start_at_once(tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    """Six prompts the target's prefix cache holds, sent together with a
    budget that computes about one of them a round: those waiting their
    turn ask what is cached, and every one streams its first token by the
    third round, with the output of the no-cache reference."""
    model_dir = tiny_dir_factory("qwen2")
    prompts = {f"r{i}": _prompt(40, 20 + i) for i in range(6)}
    reference = greedy_reference(model_dir, prompts, MAX_TOKENS)
    target = LocalTarget(load_model(model_dir), num_slots=6, max_len=256, prefix_tokens=512)
    config = EngineConfig(max_batch=6, num_speculative_tokens=3, max_batched_tokens=48)
    engine = SpecEngine(target, None, None, (), config)
    stopping = StoppingCriteria(max_tokens=MAX_TOKENS, ignore_eos=True)

    def first_steps(tag: str) -> tuple[dict[str, int], dict[str, list[int]]]:
        for rid, prompt in prompts.items():
            engine.add_request(GenerationRequest(tag + rid, prompt, stopping=stopping))
        first: dict[str, int] = {}
        outputs: dict[str, list[int]] = {rid: [] for rid in prompts}
        step = 0
        while engine.has_work:
            step += 1
            for chunk in engine.step():
                rid = chunk.request_id.removeprefix(tag)
                if chunk.token_ids:
                    first.setdefault(rid, step)
                outputs[rid] += chunk.token_ids
        return first, outputs

    cold, outputs = first_steps("cold-")
    assert outputs == reference and max(cold.values()) >= 5  # about one prompt a round
    warm, outputs = first_steps("warm-")
    assert outputs == reference
    assert max(warm.values()) <= 3, warm


def test_prefills_always_get_a_quarter_of_the_budget() -> None:
    scheduler = GammaScheduler(None, max_batched_tokens=8)
    batch = [_running(f"d{i}", 10, 9) for i in range(12)] + [_running("p", 40, 0)]
    scheduler.choose(batch)
    assert [r.feed for r in batch] == [1] * 12 + [2]


def test_without_a_budget_prompts_feed_whole() -> None:
    scheduler = GammaScheduler(None)
    batch = [_running("a", 300, 0), _running("b", 10, 9)]
    scheduler.choose(batch)
    assert [r.feed for r in batch] == [300, 1] and not any(r.prefilling for r in batch)
    with pytest.raises(ValueError, match="max_batched_tokens"):
        GammaScheduler(None, max_batched_tokens=0)


def test_a_v4_target_prefills_in_chunks_across_compression_windows(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Chunks of 5 tokens end mid-window of every compressor (rates 4 and
    8 in the tiny V4), so the compressed state carries across chunks."""
    model_dir = save_tiny_v4(tmp_path_factory.mktemp("v4chunks"), seed=2)
    prompts = [_prompt(47, 6), _prompt(12, 7)]
    outputs, fed, _ = _run(model_dir, NgramDrafter(max_ngram=3), prompts, budget=5)
    named = {f"r{i}": p for i, p in enumerate(prompts)}
    assert outputs == greedy_reference(model_dir, named, MAX_TOKENS)
    assert len(fed) > (47 + 12) // 5


def test_a_draft_model_catches_up_in_chunks_then_drafts_the_same(tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    model = load_model(tiny_dir_factory("qwen2", 7))
    chunked, whole = DraftModelDrafter(model, 1, 256), DraftModelDrafter(model, 1, 256)
    prompt = _prompt(50, 8)
    for drafter in (chunked, whole):
        drafter.start("r", prompt, SamplingParams())
    calls = 0
    while not (proposal := chunked.propose([DraftRequest("r", 3, max_feed=16)])[0]).token_ids:
        calls += 1  # a chunk fed, nothing proposed
    assert calls == 3  # 50 tokens: 16 + 16 + 16, then the last 2 with the drafts
    assert proposal.token_ids == whole.propose([DraftRequest("r", 3)])[0].token_ids


def test_the_scheduler_counts_a_catch_up_chunk_off_the_backlog() -> None:
    paths = DraftPaths(model=True, lookup=False)
    scheduler = GammaScheduler(paths, adaptive=False, max_batched_tokens=16)
    run = _running("r", 50, 49)
    run.output_ids.append(3)  # past its first token: the draft model may catch up
    run.draft.backlog = 50
    scheduler.choose([run])
    assert run.draft.gamma > 0
    scheduler.record(run, DraftProposal([]), DraftUpdate("r", 0, [7], None))
    assert run.draft.backlog == 50 - 16 + 1
    assert scheduler.entry_seconds(run, 0.5, 4, False) == 0.0  # unmeasured: free
