"""The trained draft head: its two attention paths agree, it rolls back, it is
lossless through the engine (greedy fp32 output equals target-only, whatever
the head's quality), training is deterministic and lowers the loss, and the
`specray train-draft --smoke` → `specray generate --draft head:DIR` path works.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import VOCAB

from specray.actors.drafting.base import DraftRequest, DraftUpdate
from specray.actors.drafting.head.checkpoint import (
    init_from_target,
    load_frozen,
    load_head,
    save_head,
)
from specray.actors.drafting.head.config import HeadConfig
from specray.actors.drafting.head.data import DraftData, DraftDataWriter
from specray.actors.drafting.head.datagen import (
    GenerationSettings,
    forced_samples,
    generate_samples,
)
from specray.actors.drafting.head.drafter import HeadDrafter
from specray.actors.drafting.head.loss import TrainBatch, head_loss
from specray.actors.drafting.head.model import DraftHead
from specray.actors.drafting.head.trainer import TrainSettings, train_head
from specray.actors.drafting.head.vocab import choose_draft_vocab, token_counts
from specray.actors.drafting.spec import DrafterSpec
from specray.actors.engine.engine import EngineConfig, SpecEngine
from specray.actors.engine.request import GenerationRequest
from specray.actors.engine.target import LocalTarget
from specray.actors.model.batch import ForwardBatch, SequenceInput
from specray.actors.model.config import ModelConfig
from specray.actors.model.loader import load_model
from specray.actors.sampling.params import SamplingParams, StoppingCriteria
from specray.bench.common import parse_drafters
from specray.deploy.cli import main
from specray.deploy.config import DrafterConfig, RouterSettings

LAYERS = (0, 1, 2)


def _head(model_dir: Path, vocab_size: int = VOCAB, seed: int = 0) -> DraftHead:
    """An untrained head started from the target (vocabulary: the top ids)."""
    config = ModelConfig.from_pretrained(model_dir)
    vocab = torch.arange(VOCAB - vocab_size, VOCAB)
    torch.manual_seed(seed)
    head = DraftHead(
        HeadConfig.for_target(str(model_dir), config, vocab_size, LAYERS),
        vocab,
        load_frozen(model_dir, vocab),
    )
    init_from_target(head, model_dir, config)
    return head.eval()


def _prompts(count: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randint(3, VOCAB, (3 + 4 * i % 11,), generator=gen).tolist() for i in range(count)
    ]


def _data(model_dir: Path, directory: Path, count: int = 24) -> DraftData:
    settings = GenerationSettings(LAYERS, eos_token_ids=(), max_tokens=24, batch_size=8, top_k=8)
    model = load_model(model_dir)
    writer = DraftDataWriter(directory, {"test": 1})
    generate_samples(model, _prompts(count), settings, lambda _, s: writer.add(s))
    pairs = [(p, p[::-1] * 2) for p in _prompts(4, seed=9)]
    forced_samples(model, pairs, settings, lambda _, s: writer.add(s))
    writer.close()
    return DraftData(directory)


def _run(model_dir: Path, drafter: HeadDrafter | None, k: int, sampling: SamplingParams) -> dict:
    target = LocalTarget(load_model(model_dir), num_slots=4, max_len=128)
    engine = SpecEngine(target, drafter, None, (), EngineConfig(4, k, adaptive=False))
    requests = [
        GenerationRequest(
            f"r{i}", p, sampling, StoppingCriteria(max_tokens=20 + 3 * i, ignore_eos=True)
        )
        for i, p in enumerate(_prompts(5, seed=3))
    ]
    out: dict[str, list[int]] = {r.request_id: [] for r in requests}
    stats = {}
    for chunk in engine.generate(requests):
        out[chunk.request_id] += chunk.token_ids
        stats[chunk.request_id] = chunk.stats
    return {"tokens": out, "drafted": sum(s.draft_tokens for s in stats.values())}


def test_training_time_test_matches_cached_drafting(tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    """Step k of the unrolled forward at anchor a is what the drafter computes
    after feeding positions 0..a and chaining k - 1 true tokens."""
    head = _head(tiny_dir_factory("qwen2"), vocab_size=100)
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(2, 12, head.config.fused_size, generator=gen)
    tokens = torch.randint(0, VOCAB, (2, 12), generator=gen)
    with torch.no_grad():
        unrolled = head.forward_unrolled(features, tokens, steps=3)
    assert [tuple(s.shape) for s in unrolled] == [(2, 12, 100)] * 3
    cache = head.new_cache(2, 32)
    for b, anchor in ((0, 0), (1, 7)):
        slot = cache.allocate()
        seq = SequenceInput(slot, tokens[b, : anchor + 1].tolist(), 0)
        step = head.forward_cached(
            features[b : b + 1, : anchor + 1], ForwardBatch.build([seq]), cache, True
        )
        torch.testing.assert_close(step.logits[0], unrolled[0][b, anchor], atol=1e-4, rtol=1e-4)
        for k in (1, 2):
            seq = SequenceInput(slot, [int(tokens[b, anchor + k])], anchor + k)
            step = head.forward_cached(
                step.hidden.unsqueeze(0), ForwardBatch.build([seq]), cache, False
            )
            torch.testing.assert_close(step.logits[0], unrolled[k][b, anchor], atol=1e-4, rtol=1e-4)


def test_rollback_leaves_the_state_of_a_fresh_drafter(tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    """Drafting then rejecting everything must leave no trace: the next
    proposal equals one from a drafter that never drafted the first time."""
    head = _head(tiny_dir_factory("qwen2"))
    gen = torch.Generator().manual_seed(2)
    hidden = [torch.randn(n, head.config.fused_size, generator=gen) for n in (1, 3)]
    tokens = [[5], [7, 9, 11]]
    used, fresh = HeadDrafter(head, 2, 64), HeadDrafter(head, 2, 64)
    for drafter in (used, fresh):
        drafter.start("r", [1, 2, 3], SamplingParams())
        assert drafter.propose([DraftRequest("r", 4)])[0].token_ids == []  # no hidden yet
        drafter.accept(DraftUpdate("r", 0, tokens[0], hidden[0]))
    first = used.propose([DraftRequest("r", 5)])[0]
    assert len(first) == 5
    assert used.cache.length(0) == 1 + 4  # one fed position, four chained drafts
    used.accept(DraftUpdate("r", 2, tokens[1], hidden[1]))
    assert used.cache.length(0) == 1  # the chained drafts are gone
    fresh.accept(DraftUpdate("r", 2, tokens[1], hidden[1]))
    assert used.propose([DraftRequest("r", 3)])[0].token_ids == (
        fresh.propose([DraftRequest("r", 3)])[0].token_ids
    )
    with pytest.raises(ValueError, match="target_hidden has shape"):
        used.accept(DraftUpdate("r", 0, [4], hidden[1]))


def test_mixed_batch_gives_probabilities_only_to_sampled_requests(tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    head = _head(tiny_dir_factory("qwen2"))
    drafter = HeadDrafter(head, 2, 64)
    drafter.start("greedy", [1], SamplingParams())
    drafter.start("sampled", [1], SamplingParams(temperature=0.8, seed=1))
    for request_id in ("greedy", "sampled"):
        drafter.accept(DraftUpdate(request_id, 0, [5], torch.ones(1, head.config.fused_size)))
    greedy, sampled = drafter.propose([DraftRequest("greedy", 4), DraftRequest("sampled", 2)])
    assert len(greedy) == 4 and greedy.draft_probs is None
    assert sampled.draft_probs is not None and sampled.draft_probs.shape == (2, VOCAB)
    for row, token in enumerate(sampled.token_ids):
        assert sampled.draft_probs[row, token] > 0
        assert sampled.draft_probs[row].sum() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_output_equals_target_only(tiny_dir_factory, family: str, k: int) -> None:  # type: ignore[no-untyped-def]
    model_dir = tiny_dir_factory(family)
    reference = _run(model_dir, None, 0, SamplingParams())
    spec = _run(
        model_dir, HeadDrafter(_head(model_dir, vocab_size=120), 4, 128), k, SamplingParams()
    )
    assert spec["tokens"] == reference["tokens"]
    assert spec["drafted"] > 0


def test_sampled_output_is_reproducible_from_its_seed(tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    model_dir = tiny_dir_factory("qwen2")
    sampling = SamplingParams(temperature=0.7, top_p=0.9, seed=11)
    runs = [_run(model_dir, HeadDrafter(_head(model_dir), 4, 128), 4, sampling) for _ in range(2)]
    assert runs[0] == runs[1]
    assert runs[0]["drafted"] > 0


def test_saved_head_loads_to_the_same_drafts(tiny_dir_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model_dir = tiny_dir_factory("qwen2")
    head = _head(model_dir, vocab_size=90)
    loaded = load_head(save_head(head, tmp_path / "head"), model_dir)
    assert loaded.config == head.config
    assert torch.equal(loaded.draft_vocab, head.draft_vocab)
    for name, tensor in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_draft_vocabulary_and_top_k_tv() -> None:
    counts = torch.tensor([0, 5, 9, 9, 1, 0])
    assert choose_draft_vocab(counts, 2, always=(5,)).tolist() == [2, 5]
    assert choose_draft_vocab(counts, 10).tolist() == [1, 2, 3, 4]  # only seen tokens
    assert token_counts([torch.tensor([1, 1, 4])], 6).tolist() == [0, 2, 0, 0, 1, 0]
    # A head that puts the target's top-k probabilities exactly scores TV 0.
    to_draft = torch.tensor([0, 1, 2, -1])
    probs = torch.tensor([0.5, 0.3, 0.2])
    logits = torch.log(probs).view(1, 1, 3).expand(1, 3, 3)
    batch = TrainBatch(
        tokens=torch.zeros(1, 3, dtype=torch.int64),
        hidden=torch.zeros(1, 3, 1),
        top_ids=torch.tensor([[0, 1, 3]]).expand(1, 3, 3),
        top_probs=torch.tensor([0.5, 0.3, 0.15]).expand(1, 3, 3),
        lengths=torch.tensor([3]),
    )
    parts = head_loss([logits], batch, to_draft)
    # Top-k coarsening: |0.15 - 0| on the absent id, |0.05 - 0.2| on the rest.
    assert parts.tv[0] == pytest.approx(0.5 * (0.15 + 0.15))
    assert parts.accuracy == [1.0] and parts.rows == [2]


def test_spec_bench_names_a_head_by_its_directory() -> None:
    assert parse_drafters("head:/x/y:5,head:/z,ngram:3", 4) == [
        ("head:/x/y", 5),
        ("head:/z", 4),
        ("ngram", 3),
    ]
    spec = DrafterSpec.parse("head:/x/y")
    assert spec is not None and spec.kind == "head" and spec.model_path == Path("/x/y")
    with pytest.raises(ValueError, match="needs a model or directory"):
        DrafterSpec.parse("head:")


def test_serve_config_names_a_head_replica() -> None:
    settings = RouterSettings.model_validate({}).with_draft("head:/heads/qwen")
    drafter = settings.drafter
    assert drafter is not None and (drafter.kind, drafter.model) == ("head", "/heads/qwen")
    assert drafter.spec.name == "head:/heads/qwen"
    with pytest.raises(ValueError, match="needs `model`"):
        DrafterConfig.model_validate({"kind": "head"})


def test_training_is_deterministic_and_lowers_the_loss(tiny_dir_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model_dir = tiny_dir_factory("qwen2")
    data = _data(model_dir, tmp_path / "data")
    assert len(data) == 28 and data.hidden.dtype == torch.bfloat16
    counts = token_counts((s.tokens for s in data), VOCAB)
    settings = TrainSettings(epochs=4, batch_size=4, steps=3, lr=3e-3, warmup=4, val_fraction=0.2)

    def trained(seed: int) -> tuple[DraftHead, list[float]]:
        config = ModelConfig.from_pretrained(model_dir)
        vocab = choose_draft_vocab(counts, 128)
        torch.manual_seed(seed)
        head = DraftHead(
            HeadConfig.for_target(str(model_dir), config, len(vocab), LAYERS),
            vocab,
            load_frozen(model_dir, vocab),
        )
        init_from_target(head, model_dir, config)
        result = train_head(head, data, TrainSettings(**{**settings.__dict__, "seed": seed}))
        return head, [v.loss for v in result.val]

    first, losses = trained(0)
    again, same_losses = trained(0)
    other, _ = trained(1)
    assert losses == same_losses
    assert losses[-1] < losses[0]
    state = first.state_dict()
    assert all(torch.equal(t, again.state_dict()[n]) for n, t in state.items())
    assert not all(torch.equal(t, other.state_dict()[n]) for n, t in state.items())


def test_train_draft_smoke_then_generate_with_the_head(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI end to end on a tiny model with a real tokenizer: train, then
    serve the head through `specray generate`, lossless against target-only."""
    from serving_helpers import save_served_model

    model_dir = save_served_model(tmp_path / "model")
    out = tmp_path / "head"
    flags = ["--dtype", "float32", "--home", str(tmp_path / "home"), "--threads", "1"]
    assert (
        main(["train-draft", "--target", str(model_dir), "--smoke", "--out", str(out), *flags]) == 0
    )
    log = json.loads((out / "train_log.json").read_text())
    assert log["val"][-1]["loss"] < log["val"][0]["loss"]
    assert (out / "head.safetensors").is_file() and (out / "train_curve.png").is_file()
    capsys.readouterr()

    def generate(draft: str, *extra: str) -> dict:
        common = ["--dtype", "float32", "--max-tokens", "24", "--ignore-eos", "--json"]
        args = ["generate", "--target", str(model_dir), "--draft", draft, "--k", "3", *common]
        assert main([*args, *extra, "--threads", "1", "--prompt", "def add(a, b):"]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    target_only = generate("none")
    with_head = generate(f"head:{out}", "--fixed-k")
    adaptive = generate(f"head:{out}")  # γ from the measured head cost
    assert with_head["token_ids"] == target_only["token_ids"] == adaptive["token_ids"]
    assert with_head["stats"]["draft_tokens"] > 0


def test_a_time_budget_anneals_the_learning_rate() -> None:
    """The cosine runs over the steps, or over the time budget when that
    is further along: a run stopped by its budget ends at the floor."""
    from specray.actors.drafting.head.trainer import _lr_scale

    assert _lr_scale(0, 10, 100) == pytest.approx(0.1)  # warm-up
    assert _lr_scale(10, 10, 100) == pytest.approx(1.0)
    assert _lr_scale(55, 10, 100) == pytest.approx(0.55)
    assert _lr_scale(55, 10, 100, spent=0.2) == pytest.approx(0.55)  # steps lead
    assert _lr_scale(11, 10, 100, spent=1.0) == pytest.approx(0.1)  # the budget is spent
    assert _lr_scale(11, 10, 100, spent=0.5) == pytest.approx(0.55)
