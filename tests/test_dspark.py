"""The DSpark drafter in the engine: lossless in process, exact draft
probabilities, per-request state that batching and rollback leave alone.

The drafters are random-weight DSpark models for the tiny Qwen3 target
(tests/tiny_models.py), built by ``fresh_dspark``; agreement with DeepSpec
itself is tests/test_dspark_reference.py's subject.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dspark_helpers import serve_in_process
from sampling_helpers import chi_square_p_value, total_variation
from tiny_models import VOCAB

from specray.actors.drafting.base import (
    CatchesUp,
    DraftProposal,
    DraftRequest,
    DraftStop,
    DraftUpdate,
)
from specray.actors.drafting.dspark.checkpoint import (
    load_dspark,
    save_dspark,
)
from specray.actors.drafting.dspark.drafter import DSparkDrafter
from specray.actors.drafting.dspark.fresh import fresh_dspark
from specray.actors.drafting.dspark.model import DSparkModel
from specray.actors.drafting.spec import DrafterSpec
from specray.actors.engine.request import GenerationRequest
from specray.actors.engine.target import LocalTarget, VerifyInput
from specray.actors.model.loader import load_model
from specray.actors.sampling.logits import SamplingTensors, compute_probs, make_generator
from specray.actors.sampling.params import SamplingParams, StoppingCriteria
from specray.actors.sampling.rejection import DraftBatch, rejection_sample

LAYERS = (0, 1)


def _model(target_dir: Path, block: int = 4, std: float = 0.3, seed: int = 0) -> DSparkModel:
    model, _ = fresh_dspark(
        target_dir,
        num_layers=2,
        block_size=block,
        target_layer_ids=LAYERS,
        markov_rank=8,
        init_std=std,
        seed=seed,
    )
    return model.eval()


def _prompts(count: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (3 + 4 * i,), generator=gen).tolist() for i in range(count)]


def _run(target_dir: Path, drafter: DSparkDrafter | None, k: int, sampling: SamplingParams) -> dict:
    requests = [
        GenerationRequest(
            f"r{i}", p, sampling, StoppingCriteria(max_tokens=18 + 3 * i, ignore_eos=True)
        )
        for i, p in enumerate(_prompts(4, seed=3))
    ]
    out, drafted = serve_in_process(target_dir, drafter, k, requests)
    return {"tokens": out, "drafted": drafted}


@pytest.mark.parametrize("k", [2, 4, 6])
def test_greedy_output_equals_target_only(tiny_dir_factory, k: int) -> None:  # type: ignore[no-untyped-def]
    """k = 6 asks for more than the block of 4: the drafter gives 4."""
    target_dir = tiny_dir_factory("qwen3")
    reference = _run(target_dir, None, 0, SamplingParams())
    spec = _run(target_dir, DSparkDrafter(_model(target_dir), 4, 128), k, SamplingParams())
    assert spec["tokens"] == reference["tokens"]
    assert spec["drafted"] > 0


def test_sampled_output_is_reproducible_from_its_seed(tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    target_dir = tiny_dir_factory("qwen3")
    sampling = SamplingParams(temperature=0.7, top_p=0.9, seed=11)
    model = _model(target_dir)
    runs = [_run(target_dir, DSparkDrafter(model, 4, 128), 4, sampling) for _ in range(2)]
    assert runs[0] == runs[1]
    assert runs[0]["drafted"] > 0
    other = _run(target_dir, DSparkDrafter(model, 4, 128), 4, SamplingParams(0.7, seed=12))
    assert other["tokens"] != runs[0]["tokens"]


def _primed(drafter: DSparkDrafter, target_dir: Path, request_ids: list[str], prompt: list[int]):  # type: ignore[no-untyped-def]
    """Start requests as if a round had just committed ``prompt[1:]``: the
    drafter holds hidden states of positions 0..len-2, the anchor is the last."""
    target = LocalTarget(load_model(target_dir), 1, 64)
    (out,) = target.verify([VerifyInput("p", 0, prompt[:-1], len(prompt) - 1)], LAYERS)
    assert out.hidden_states is not None
    for request_id in request_ids:
        drafter.accept(DraftUpdate(request_id, len(prompt) - 2, prompt[1:], out.hidden_states))
    return out


def test_batching_and_asking_fewer_leave_each_proposal_alone(tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    """A request's drafts depend on its own context and seed only: alone or in
    a batch, first or second, asking for 4 or 2 (a prefix of the same block)."""
    target_dir = tiny_dir_factory("qwen3")
    model = _model(target_dir)
    prompts = {"a": [5, 9, 12, 40, 7], "b": [11, 3, 77, 90, 6, 31, 8]}
    params = {"a": SamplingParams(temperature=0.9, seed=3), "b": SamplingParams()}

    def propose(
        ids: list[str], asks: dict[str, int], stop: DraftStop | None = None
    ) -> dict[str, DraftProposal]:
        drafter = DSparkDrafter(model, 3, 64)
        for request_id in ids:
            drafter.start(request_id, prompts[request_id][:1], params[request_id])
            assert drafter.propose([DraftRequest(request_id, 4)])[0].token_ids == []
            _primed(drafter, target_dir, [request_id], prompts[request_id])
        proposals = drafter.propose([DraftRequest(i, asks[i], stop=stop) for i in ids])
        return dict(zip(ids, proposals, strict=True))

    alone = {i: propose([i], {i: 4})[i] for i in prompts}
    together = propose(["b", "a"], {"a": 4, "b": 4})
    fewer = propose(["a", "b"], {"a": 2, "b": 2})
    for request_id in prompts:
        first, second = alone[request_id], together[request_id]
        assert first.token_ids == second.token_ids and len(first.token_ids) == 4
        assert first.confidence == pytest.approx(second.confidence, abs=1e-6)
        assert fewer[request_id].token_ids == first.token_ids[:2]
    # A stop that prices a third draft out cuts the block after two.
    stopped = propose(["a", "b"], {"a": 4, "b": 4}, DraftStop((1.0, 1.0, 1.0, 1e9, 1e9)))
    for request_id in prompts:
        assert stopped[request_id].token_ids == alone[request_id].token_ids[:2]
    sampled = alone["a"]
    assert sampled.draft_probs is not None and sampled.draft_probs.shape == (4, VOCAB)
    assert alone["b"].draft_probs is None
    for row, token in enumerate(sampled.token_ids):
        assert sampled.draft_probs[row, token] > 0
        assert float(sampled.draft_probs[row].sum()) == pytest.approx(1.0, abs=1e-5)
    confidence = alone["b"].confidence
    assert confidence is not None and all(0.0 < c < 1.0 for c in confidence)


def test_rejections_roll_nothing_back_and_gaps_restart_the_context(tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    """Blocks never enter the cache: after any round the drafter is the one
    that saw only the committed rows. A round without hidden states restarts
    the context at the next rows it gets."""
    target_dir = tiny_dir_factory("qwen3")
    model = _model(target_dir)
    prompt = [5, 9, 12, 40, 7, 21]
    used, fresh = DSparkDrafter(model, 2, 64), DSparkDrafter(model, 2, 64)
    for drafter in (used, fresh):
        drafter.start("r", prompt[:1], SamplingParams())
        out = _primed(drafter, target_dir, ["r"], prompt)
    used.propose([DraftRequest("r", 4)])
    more = torch.randn(2, model.config.fused_size, generator=torch.Generator().manual_seed(1))
    for drafter in (used, fresh):
        drafter.accept(DraftUpdate("r", 1, [44, 45], more))
    used_draft, fresh_draft = (d.propose([DraftRequest("r", 4)])[0] for d in (used, fresh))
    # Same tokens; confidences agree to float tolerance (the used drafter's
    # context was fed in different row groupings, so sums round differently).
    assert used_draft.token_ids == fresh_draft.token_ids
    assert used_draft.confidence == pytest.approx(fresh_draft.confidence, abs=1e-5)
    with pytest.raises(ValueError, match="target_hidden has shape"):
        used.accept(DraftUpdate("r", 0, [4], more))

    gap = DSparkDrafter(model, 2, 64)
    gap.start("r", prompt[:1], SamplingParams())
    _primed(gap, target_dir, ["r"], prompt)
    gap.accept(DraftUpdate("r", 0, [50], None))
    assert gap.propose([DraftRequest("r", 4)])[0].token_ids == []
    gap.accept(DraftUpdate("r", 0, [51], out.hidden_states[:1]))
    assert len(gap.propose([DraftRequest("r", 4)])[0]) == 4


def test_feed_profile_times_context_feeds_and_frees_its_slot(tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    drafter = DSparkDrafter(_model(tiny_dir_factory("qwen3")), 1, 64)
    assert isinstance(drafter, CatchesUp)
    points = drafter.feed_profile([1, 8, 1000])
    assert [size for size, _ in points] == [1, 8]  # 1000 does not fit the cache
    assert all(seconds > 0 for _, seconds in points)
    assert drafter.cache.num_free_slots == 1


def test_saved_drafter_loads_to_the_same_drafts(tiny_dir_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Our save writes DeepSpec's format (the fixture's tensor names); loading
    it back, or borrowing the embedding from the target, drafts the same."""
    target_dir = tiny_dir_factory("qwen3")
    model, hf = fresh_dspark(
        target_dir, num_layers=2, block_size=4, target_layer_ids=LAYERS, markov_rank=8
    )
    saved = save_dspark(model, tmp_path / "d", hf)
    from safetensors import safe_open

    fixture = Path(__file__).parent / "data" / "dspark" / "qwen3_tiny" / "model.safetensors"
    with safe_open(str(fixture), "pt") as a, safe_open(str(saved / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
    loaded = load_dspark(saved, target_dir=target_dir)
    assert loaded.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    spec = DrafterSpec.parse(f"dspark:{saved}")
    assert spec is not None and spec.kind == "dspark" and spec.model_path == saved


def _conditional_p_value(
    emitted: list[list[int]],
    next_target: torch.Tensor,  # [V (first token), V]
    bins: int = 8,
) -> float:
    """Pearson chi-square that each second token follows ``next_target`` of
    the first, over every first token seen at least ``5 * bins`` times. Per
    first token the vocabulary is cut into ``bins`` cells of about equal
    target mass (most likely tokens first); statistics and degrees of
    freedom add up over first tokens."""
    pairs = torch.tensor([tokens[:2] for tokens in emitted if len(tokens) >= 2])
    statistic, dof = 0.0, 0
    for a in pairs[:, 0].unique().tolist():
        seconds = pairs[pairs[:, 0] == a, 1]
        if seconds.numel() < 5 * bins:
            continue
        probs = next_target[a].double()
        order = probs.argsort(descending=True)
        cell = torch.empty(VOCAB, dtype=torch.int64)
        cell[order] = (probs[order].cumsum(0) * bins - 1e-9).long().clamp(0, bins - 1)
        expected = torch.zeros(bins, dtype=torch.float64).index_add_(0, cell, probs)
        expected = expected * seconds.numel()
        observed = torch.bincount(cell[seconds], minlength=bins).double()
        used = expected > 0
        statistic += float(((observed - expected)[used] ** 2 / expected[used]).sum())
        dof += int(used.sum()) - 1
    assert dof >= 100, "too few two-token outputs for the test to mean anything"
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), torch.tensor(statistic / 2.0)))


@pytest.mark.slow
def test_emitted_tokens_follow_the_target(tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    """Lossless in distribution: 20 000 requests with the same context and
    their own seeds draft a block of 2 with the Markov head; rejection
    sampling against the tiny target must emit the target's first token and,
    after an accepted first draft ``a``, the target's next token given ``a``.
    That second check fails if ``draft_probs[1]`` were not the distribution
    the second draft was drawn from (e.g. without the Markov bias of ``a``)."""
    target_dir = tiny_dir_factory("qwen3")
    n, prompt = 20_000, [5, 9, 12, 40, 7, 21]
    model = _model(target_dir, block=2, std=0.1, seed=4)
    assert model.markov_head is not None
    with torch.no_grad():
        # A strong Markov head, so a wrong second-draft distribution shows;
        # silent after the anchor, so first drafts are often accepted.
        model.markov_head.markov_w1.mul_(10.0)
        model.markov_head.markov_w1[prompt[-1]] = 0.0
    params = SamplingParams(temperature=0.2)  # sharpens the tiny models' flat logits
    drafter = DSparkDrafter(model, n, 8)
    ids = [f"r{i}" for i in range(n)]
    for i, request_id in enumerate(ids):
        drafter.start(request_id, prompt[:1], SamplingParams(temperature=0.2, seed=i))
    _primed(drafter, target_dir, ids, prompt)
    proposals = drafter.propose([DraftRequest(i, 2) for i in ids])

    # Target rows: after the prompt, and after the prompt plus each first token.
    target = LocalTarget(load_model(target_dir), VOCAB, 16)
    outputs = target.verify([VerifyInput(f"v{t}", 0, [*prompt, t], 2) for t in range(VOCAB)])
    sampling = SamplingTensors.from_params([params] * (2 * VOCAB))
    rows = compute_probs(torch.cat([o.full_logits() for o in outputs]), sampling)
    rows = rows.view(VOCAB, 2, -1)
    first_target, next_target = rows[0, 0], rows[:, 1]  # [V], [V (first token), V]

    def emit(draft_probs: list[torch.Tensor | None]) -> list[list[int]]:
        draft = DraftBatch.from_proposals([p.token_ids for p in proposals], draft_probs)
        after_first = next_target[draft.token_ids[:, 0]]
        target_probs = torch.stack([first_target.expand(n, -1), after_first, after_first], 1)
        generators = [make_generator(10_000 + i) for i in range(n)]
        return rejection_sample(draft, target_probs, [False] * n, generators).output_token_ids

    emitted = emit([p.draft_probs for p in proposals])
    assert 0.05 < sum(len(tokens) > 1 for tokens in emitted) / n < 0.95
    first = torch.bincount(torch.tensor([tokens[0] for tokens in emitted]), minlength=VOCAB)
    assert total_variation(first, first_target) < 0.05  # sampling noise alone is ~0.03
    assert chi_square_p_value(first, first_target) > 1e-3
    assert _conditional_p_value(emitted, next_target) > 1e-3

    # The check has power: claiming the second draft came from the backbone's
    # logits alone (no Markov bias of the first) skews the second token.
    block = model.draft_block(
        torch.tensor([prompt[-1]]),
        torch.tensor([len(prompt) - 1]),
        drafter.cache,
        [0],
        torch.tensor([0]),
    )
    unbiased = compute_probs(block.base_logits[0], SamplingTensors.from_params([params] * 2))
    wrong = [
        None if p.draft_probs is None else torch.stack([p.draft_probs[0], unbiased[1]])
        for p in proposals
    ]
    assert _conditional_p_value(emit(wrong), next_target) < 1e-6
