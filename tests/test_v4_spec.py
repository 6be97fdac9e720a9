"""Lossless speculative decoding on a DeepSeek-V4 target, in process (fp32).

Greedy output of every drafter (n-gram lookup, a second tiny V4 as draft
model, a copy of the target, the checkpoint's MTP block, n-gram + MTP) equals
target-only decoding and transformers' from-scratch greedy loop; sampled
output follows the target's distribution.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from sampling_helpers import chi_square_p_value
from tiny_models import repeating_prompts
from tiny_v4 import VOCAB, hf_greedy, save_tiny_v4, save_v4_draft

from specray.actors.drafting.base import Drafter, DraftRequest, DraftUpdate
from specray.actors.drafting.draft_model import DraftModelDrafter
from specray.actors.drafting.hybrid import HybridDrafter
from specray.actors.drafting.mtp import MTPDrafter
from specray.actors.drafting.ngram import NgramDrafter
from specray.actors.drafting.suffix import SpeculationParams, SuffixConfig, SuffixDrafter
from specray.actors.engine.engine import EngineConfig, SpecEngine
from specray.actors.engine.request import GenerationRequest, RequestStats
from specray.actors.engine.target import LocalTarget
from specray.actors.model.batch import ForwardBatch, SequenceInput
from specray.actors.model.loader import load_model
from specray.actors.model.v4.mtp import NoMTPWeightsError, load_mtp
from specray.actors.sampling.logits import SamplingTensors, compute_probs
from specray.actors.sampling.params import SamplingParams, StoppingCriteria

MAX_TOKENS = 16
MAX_LEN = 96


# Tiny V4 forwards are many small ops: one thread spares OpenMP's spinning.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_v4(tmp_path_factory.mktemp("v4target"), seed=0, mtp=True)


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A different tiny V4 with the same vocabulary: other weights, layer mix
    and stream count."""
    return save_v4_draft(tmp_path_factory.mktemp("v4draft"), seed=7, hc_mult=1)


def _prompts() -> list[list[int]]:
    return repeating_prompts(3, (5, 14, 23), VOCAB)


def _run(
    target_dir: Path,
    drafter: Drafter | None,
    prompts: list[list[int]],
    k: int,
    sampling: Callable[[int], SamplingParams] = lambda i: SamplingParams(),
    max_tokens: int = MAX_TOKENS,
    max_batch: int = 8,
) -> tuple[dict[str, list[int]], list[RequestStats]]:
    """Each request's tokens, and each request's final statistics."""
    target = LocalTarget(load_model(target_dir), num_slots=max_batch, max_len=MAX_LEN)
    config = EngineConfig(max_batch=max_batch, num_speculative_tokens=k, adaptive=False)
    engine = SpecEngine(target, drafter, None, (), config)
    requests = [
        GenerationRequest(f"r{i}", p, sampling(i), StoppingCriteria(max_tokens, ignore_eos=True))
        for i, p in enumerate(prompts)
    ]
    outputs: dict[str, list[int]] = {r.request_id: [] for r in requests}
    stats = []
    for chunk in engine.generate(requests):
        outputs[chunk.request_id] += chunk.token_ids
        if chunk.finished:
            stats.append(chunk.stats)
    assert len(stats) == len(requests)
    assert not engine.running and target.num_active == 0
    return outputs, stats


# name -> (target dir, draft dir, slots) -> drafter
DRAFTERS: dict[str, Callable[[Path, Path, int], Drafter]] = {
    "ngram": lambda target, draft, slots: NgramDrafter(max_ngram=3),
    "draft=other-v4": lambda target, draft, slots: DraftModelDrafter(
        load_model(draft), slots, MAX_LEN
    ),
    "draft=copy": lambda target, draft, slots: DraftModelDrafter(
        load_model(target), slots, MAX_LEN
    ),
    "mtp": lambda target, draft, slots: MTPDrafter(load_mtp(target), slots, MAX_LEN),
    # V4 verifies chains only: the round sends each tree's main chain.
    "suffix-tree": lambda target, draft, slots: SuffixDrafter(
        SuffixConfig(tree=True, speculation=SpeculationParams(max_spec_factor=4.0))
    ),
    "hybrid=ngram+mtp": lambda target, draft, slots: HybridDrafter(
        NgramDrafter(max_ngram=3), MTPDrafter(load_mtp(target), slots, MAX_LEN), 2
    ),
}


@pytest.fixture(scope="module")
def greedy_reference(target_dir: Path) -> dict[str, list[int]]:
    reference, _ = _run(target_dir, None, _prompts(), k=0)
    for i, prompt in enumerate(_prompts()):
        assert reference[f"r{i}"] == hf_greedy(target_dir, prompt, MAX_TOKENS)
    return reference


@pytest.mark.parametrize("drafter", sorted(DRAFTERS))
@pytest.mark.parametrize("k", [1, 4])
def test_greedy_equals_target_only_and_the_reference(
    target_dir: Path,
    draft_dir: Path,
    greedy_reference: dict[str, list[int]],
    drafter: str,
    k: int,
) -> None:
    spec, _ = _run(target_dir, DRAFTERS[drafter](target_dir, draft_dir, 8), _prompts(), k)
    assert spec == greedy_reference
    assert all(len(tokens) == MAX_TOKENS for tokens in spec.values())


def test_a_copy_of_the_target_is_always_accepted(target_dir: Path) -> None:
    """Rollback never happens, but every verify feeds 5 tokens at once."""
    target = LocalTarget(load_model(target_dir), num_slots=1, max_len=MAX_LEN)
    drafter = DraftModelDrafter(load_model(target_dir), 1, MAX_LEN)
    engine = SpecEngine(target, drafter, None, (), EngineConfig(1, 4, adaptive=False))
    request = GenerationRequest("a", _prompts()[1], stopping=StoppingCriteria(21, ignore_eos=True))
    last = list(engine.generate([request]))[-1]
    assert last.stats.accepted_tokens == last.stats.draft_tokens > 0
    assert last.stats.rounds == 5


def test_mtp_drafts_do_not_depend_on_rolled_back_chains(target_dir: Path) -> None:
    """Rounds of drafting, random verdicts and rollbacks leave the MTP
    drafter where feeding the same committed (streams, token) pairs at once
    leaves a fresh one."""
    model = load_mtp(target_dir)
    width = model.streams * model.config.hidden_size
    gen = torch.Generator().manual_seed(4)
    rolled, fresh = MTPDrafter(model, 1, MAX_LEN), MTPDrafter(model, 1, MAX_LEN)
    for drafter in (rolled, fresh):
        drafter.start("r", [5, 6, 7], SamplingParams())
    tokens: list[int] = []
    streams = []
    for _ in range(8):
        count = int(torch.randint(1, 5, (1,), generator=gen))
        new = torch.randint(3, VOCAB, (count,), generator=gen).tolist()
        rows = torch.randn(count, width, generator=gen)
        rolled.accept(DraftUpdate("r", count - 1, new, rows))
        assert len(rolled.propose([DraftRequest("r", 4)])[0]) == 4
        tokens += new
        streams.append(rows)
    fresh.accept(DraftUpdate("r", 0, tokens, torch.cat(streams)))
    want = fresh.propose([DraftRequest("r", 4)])[0].token_ids
    assert rolled.propose([DraftRequest("r", 4)])[0].token_ids == want


def test_mtp_needs_its_weights(draft_dir: Path) -> None:
    with pytest.raises(NoMTPWeightsError, match=r"no multi-token-prediction weights \(mtp.0"):
        load_mtp(draft_dir)


@pytest.mark.parametrize("drafter", ["mtp", "draft=other-v4"])
def test_sampled_tokens_follow_the_target(target_dir: Path, draft_dir: Path, drafter: str) -> None:
    """The first two sampled tokens of 400 seeded requests against their
    exact target distributions. The MTP block drafts from the second token
    on (its first round has no target streams yet), the draft model from
    the first."""
    params = SamplingParams(temperature=0.8, top_k=40)
    prompt = _prompts()[0]
    n = 400
    outputs, stats = _run(
        target_dir,
        DRAFTERS[drafter](target_dir, draft_dir, 16),
        [prompt] * n,
        k=2,
        sampling=lambda i: SamplingParams(temperature=0.8, top_k=40, seed=1000 + i),
        max_tokens=3,
        max_batch=16,
    )
    first = torch.tensor([tokens[0] for tokens in outputs.values()])
    second = torch.tensor([tokens[1] for tokens in outputs.values()])

    # Exact distributions from the target: first token, then the second
    # token's marginal over the first.
    model = load_model(target_dir)

    def probs_after(prefixes: list[list[int]]) -> torch.Tensor:
        cache = model.new_cache(len(prefixes), MAX_LEN)
        seqs = [SequenceInput(cache.allocate(), p, 0) for p in prefixes]
        logits = model(ForwardBatch.build(seqs), cache).logits
        return compute_probs(logits, SamplingTensors.from_params([params] * len(prefixes)))

    first_probs = probs_after([prompt])[0]
    support = [c for c in range(VOCAB) if first_probs[c] > 0]
    after = probs_after([[*prompt, c] for c in support])  # [support, vocab]
    second_probs = (first_probs[support].unsqueeze(1) * after).sum(0)

    assert chi_square_p_value(torch.bincount(first, minlength=VOCAB), first_probs) > 1e-3
    assert chi_square_p_value(torch.bincount(second, minlength=VOCAB), second_probs) > 1e-3
    # Meaningful only if drafts were made, and both accepted and rejected.
    drafted = sum(s.draft_tokens for s in stats)
    accepted = sum(s.accepted_tokens for s in stats)
    assert drafted >= n
    assert 0.05 < accepted / drafted < 0.95
