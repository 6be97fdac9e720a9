"""DSpark training: the loss on hand-computed cases, the block layout of the
training data against the drafting path, the shared trainer, and sequential
temperature scaling of the confidence head."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from dspark_helpers import tiny_draft_data, tiny_dspark
from tiny_models import VOCAB

from specray.actors.drafting.dspark.calibration import (
    Calibration,
    expected_calibration_error,
    fit_sequential_temperatures,
    outcome_labels,
)
from specray.actors.drafting.dspark.loss import (
    DSparkLossSettings,
    TargetTopK,
    dspark_loss,
    position_weights,
    top_k_l1,
)
from specray.actors.drafting.dspark.model import DSparkModel
from specray.actors.drafting.dspark.train import gather_blocks, sample_anchors
from specray.actors.drafting.head.loss import TrainBatch
from specray.actors.drafting.head.trainer import TrainSettings, train_head
from specray.actors.model.loader import load_model

LN2 = math.log(2.0)


def _full(probs: list[list[float]]) -> TargetTopK:
    """A target given as its whole distribution (top-k = every token)."""
    table = torch.tensor([probs])  # [1, γ, V]
    ids = torch.arange(table.shape[-1]).expand(*table.shape)
    return TargetTopK(ids, table)


def test_loss_on_a_hand_computed_block() -> None:
    """Two positions, two tokens, a uniform draft and a confidence of 1/2:
    CE = ln 2 at both; L1 = |1/2 - 1| + |1/2 - 0| = 1 at the first, 0 at the
    second, so c* = 1/2 and 1; BCE(1/2, c*) = ln 2 at both. Weights 1, e^-1/2."""
    draft_logits = torch.zeros(1, 2, 2)
    confidence_logits = torch.zeros(1, 2)
    labels = torch.tensor([[0, 1]])
    target = _full([[1.0, 0.0], [0.5, 0.5]])
    valid = torch.ones(1, 2, dtype=torch.bool)
    parts = dspark_loss(
        draft_logits, confidence_logits, labels, target, valid, DSparkLossSettings(decay=2.0)
    )
    w2 = math.exp(-0.5)
    assert parts.ce_mean == pytest.approx(LN2)
    assert parts.l1_mean == pytest.approx(1.0 / (1.0 + w2))
    assert parts.confidence_mean == pytest.approx(LN2)
    assert float(parts.total) == pytest.approx(0.1 * LN2 + 0.9 / (1.0 + w2) + LN2)
    assert parts.tv == pytest.approx([0.5, 0.0]) and parts.rows == [1, 1]
    assert parts.accuracy == [1.0, 0.0]  # argmax of a tie is token 0

    # An invalid second position drops out of every mean.
    parts = dspark_loss(
        draft_logits,
        confidence_logits,
        labels,
        target,
        torch.tensor([[True, False]]),
        DSparkLossSettings(decay=2.0),
    )
    assert parts.l1_mean == pytest.approx(1.0) and parts.rows == [1, 0]
    assert math.isnan(parts.ce[1])


def test_confidence_label_carries_no_gradient_to_the_draft() -> None:
    """c* is a label: the BCE term moves only the confidence logits."""
    draft_logits = torch.tensor([[[0.3, -0.2, 0.1]]], requires_grad=True)
    confidence_logits = torch.tensor([[0.4]], requires_grad=True)
    settings = DSparkLossSettings(ce_weight=0.0, l1_weight=0.0)
    parts = dspark_loss(
        draft_logits,
        confidence_logits,
        torch.tensor([[0]]),
        _full([[0.2, 0.5, 0.3]]),
        torch.ones(1, 1, dtype=torch.bool),
        settings,
    )
    parts.total.backward()
    assert draft_logits.grad is not None and torch.count_nonzero(draft_logits.grad) == 0
    assert confidence_logits.grad is not None and float(confidence_logits.grad.abs()) > 0


def test_top_k_l1_and_position_weights() -> None:
    draft = torch.tensor([[0.5, 0.3, 0.2]])
    # Target top-2 {token 1: 0.6, token 0: 0.3}, rest 0.1; draft rest (token 2) 0.2.
    top = TargetTopK(torch.tensor([[1, 0]]), torch.tensor([[0.6, 0.3]]))
    assert float(top_k_l1(draft, top)[0]) == pytest.approx(0.3 + 0.2 + 0.1)
    everything = TargetTopK(torch.tensor([[0, 1, 2]]), torch.tensor([[0.3, 0.6, 0.1]]))
    assert float(top_k_l1(draft, everything)[0]) == pytest.approx(0.2 + 0.3 + 0.1)
    assert position_weights(3, None).tolist() == pytest.approx(
        [1, math.exp(-1 / 3), math.exp(-2 / 3)]
    )
    assert position_weights(2, 4.0).tolist() == pytest.approx([1, math.exp(-0.25)])


def test_blocks_take_the_rows_drafting_sees() -> None:
    tokens = torch.tensor([[10, 11, 12, 13, 14, 0]])  # one answer of 5 rows, padded
    batch = TrainBatch(
        tokens,
        torch.zeros(1, 6, 4),
        (tokens * 10).unsqueeze(-1),  # top-1 id of row t: 10 * tokens[t]
        torch.ones(1, 6, 1),
        torch.tensor([5]),
    )
    blocks = gather_blocks(batch, torch.tensor([[2, 3]]), torch.tensor([[True, True]]), 3)
    assert blocks.anchor_ids.tolist() == [[11, 12]]
    assert blocks.previous.tolist() == [[[11, 12, 13], [12, 13, 14]]]
    assert blocks.labels[0, 0].tolist() == [12, 13, 14]
    assert blocks.target.ids[0, 0, :, 0].tolist() == [120, 130, 140]
    assert blocks.valid.tolist() == [[[True, True, True], [True, True, False]]]

    anchors, keep = sample_anchors(torch.tensor([5, 2, 1]), 3, torch.Generator().manual_seed(0))
    assert sorted(anchors[0].tolist()) == anchors[0].tolist()
    assert set(anchors[0].tolist()) <= {1, 2, 3, 4} and len(set(anchors[0].tolist())) == 3
    assert keep.tolist() == [[True] * 3, [True, False, False], [False] * 3]


def test_teacher_forced_blocks_are_what_drafting_computes(tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    """Block (b, a) of the training forward equals a drafting forward after
    feeding rows 0..a-1, with the true tokens before each draft."""
    model = tiny_dspark(tiny_dir_factory("qwen3")).eval()
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (2, 9), generator=gen)
    hidden = torch.randn(2, 9, model.config.fused_size, generator=gen)
    batch = TrainBatch(
        tokens, hidden, tokens.unsqueeze(-1), torch.ones(2, 9, 1), torch.tensor([9, 6])
    )
    anchors = torch.tensor([[1, 5], [2, 4]])
    blocks = gather_blocks(batch, anchors, torch.ones(2, 2, dtype=torch.bool), 3)
    with torch.no_grad():
        forced = model.teacher_forced(hidden, blocks.anchor_ids, anchors, blocks.previous)
    for b in range(2):
        for i, a in enumerate(anchors[b].tolist()):
            cache = model.new_cache(1, 16)
            slot = cache.allocate()
            model.feed_context(hidden[b, :a], torch.full((a,), slot), torch.arange(a), cache)
            out = model.draft_block(
                tokens[b, a - 1 : a], torch.tensor([a]), cache, [slot], torch.tensor([0])
            )
            previous = blocks.previous[b, i]
            expected = model.markov_logits(out.base_logits[0], previous)
            torch.testing.assert_close(forced.draft_logits[b, i], expected, atol=1e-5, rtol=1e-5)
            confidence = model.confidence_logits(out.hidden[0], previous)
            assert forced.confidence_logits is not None and confidence is not None
            torch.testing.assert_close(
                forced.confidence_logits[b, i], confidence, atol=1e-5, rtol=1e-5
            )


@pytest.mark.slow
def test_training_is_deterministic_and_lowers_the_loss(tiny_dir_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The head's trainer drives a DSpark drafter: the same seed gives the
    same weights, validation loss falls, the frozen parts stay the target's."""
    target_dir = tiny_dir_factory("qwen3")
    data = tiny_draft_data(target_dir, tmp_path / "data")
    settings = TrainSettings(
        epochs=3, batch_size=4, lr=3e-3, warmup=2, val_fraction=0.25, anchors=6, bf16=False
    )

    def trained(seed: int) -> tuple[DSparkModel, list[float]]:
        model = tiny_dspark(target_dir, seed)
        result = train_head(model, data, TrainSettings(**{**settings.__dict__, "seed": seed}))
        assert len(result.val[0].ce) == 3  # one entry per block position
        return model, [v.loss for v in result.val]

    first, losses = trained(0)
    again, same = trained(0)
    assert losses == same and losses[-1] < losses[0]
    state = first.state_dict()
    assert all(torch.equal(t, again.state_dict()[n]) for n, t in state.items())
    untouched = tiny_dspark(target_dir, 0)
    assert torch.equal(first.lm_head.weights.weight, untouched.lm_head.weights.weight)
    assert not torch.equal(first.fc.weights.weight, untouched.fc.weights.weight)


def test_sequential_temperature_scaling_recovers_an_overconfident_head() -> None:
    """Outcomes drawn from known survival rates; the head reports logits
    three times too large. STS finds temperatures near 3 and cuts the ECE
    of the survival products."""
    gen = torch.Generator().manual_seed(0)
    n, block = 20_000, 4
    true_logits = torch.randn(n, block, generator=gen) * 1.2 + 1.0
    accept = torch.rand(n, block, generator=gen) < torch.sigmoid(true_logits)
    accepted = torch.where(accept.all(1), block, (~accept).int().argmax(1))  # first rejection
    verified = torch.full((n,), block)
    survived, reached = outcome_labels(verified, accepted, block)
    reported = true_logits * 3.0
    fitted = fit_sequential_temperatures(reported, survived, reached)
    # The first position pins its temperature; later products are smaller and
    # flatter in T, so only the ECE they reach is checked tightly.
    assert fitted.temperatures[0] == pytest.approx(3.0, rel=0.1)
    assert all(2.0 < t < 4.0 for t in fitted.temperatures)

    def ece(calibration: Calibration, k: int) -> float:
        survival = calibration.confidences(reported).cumprod(1)[:, k]
        return expected_calibration_error(survival, survived[:, k])

    for k in range(block):
        assert ece(fitted, k) < 0.02 < ece(Calibration.identity(block), k)


@pytest.mark.slow
def test_train_draft_dspark_smoke_then_draft_losslessly(tmp_path: Path) -> None:
    """`specray train-draft --method dspark` end to end on a tiny Qwen2 with
    a tokenizer: the saved directory is DeepSpec's format, loads with the
    target, and drafts without changing greedy output."""
    from serving_helpers import save_served_model

    from specray.actors.drafting.dspark.checkpoint import load_dspark
    from specray.actors.drafting.dspark.drafter import DSparkDrafter
    from specray.actors.engine.engine import EngineConfig, SpecEngine
    from specray.actors.engine.request import GenerationRequest
    from specray.actors.engine.target import LocalTarget
    from specray.actors.sampling.params import SamplingParams, StoppingCriteria
    from specray.deploy.cli import main

    model_dir = save_served_model(tmp_path / "model")
    out = tmp_path / "dspark"
    flags = ["--dtype", "float32", "--home", str(tmp_path / "home"), "--threads", "1"]
    method = ["--method", "dspark", "--block-size", "3", "--markov-rank", "16", "--anchors", "4"]
    args = ["train-draft", "--target", str(model_dir), "--smoke", "--out", str(out)]
    assert main([*args, *method, *flags]) == 0
    log = json.loads((out / "train_log.json").read_text())
    assert log["method"] == "dspark" and log["val"][-1]["loss"] < log["val"][0]["loss"]
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    fit = log["calibration"]  # STS on the held-out answers, saved beside the weights
    assert fit["labels"] == "greedy" and len(fit["ece_before"]) == len(fit["ece_after"]) == 3
    saved = json.loads((out / "calibration.json").read_text())["temperatures"]
    assert saved == fit["calibration"]["temperatures"]
    model = load_dspark(out, target_dir=model_dir)
    assert model.config.block_size == 3 and not model.config.decoder.qk_norm

    def generate(drafter: DSparkDrafter | None) -> list[list[int]]:
        target = LocalTarget(load_model(model_dir), num_slots=2, max_len=96)
        engine = SpecEngine(target, drafter, None, (), EngineConfig(2, 3, adaptive=False))
        stop = StoppingCriteria(max_tokens=24, ignore_eos=True)
        requests = [
            GenerationRequest(f"r{i}", [5 + i, 40, 77, 9], SamplingParams(), stop) for i in range(2)
        ]
        out: dict[str, list[int]] = {r.request_id: [] for r in requests}
        for chunk in engine.generate(requests):
            out[chunk.request_id] += chunk.token_ids
        return list(out.values())

    assert generate(DSparkDrafter(model, 2, 96)) == generate(None)
