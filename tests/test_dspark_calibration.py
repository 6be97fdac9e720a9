"""Calibrating DSpark's confidence head: one data set serving several layer
choices, the held-out survival labels and STS fit that train-draft runs, and
the real-round ECE that ``bench/head_eval.py`` reports."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dspark_helpers import tiny_draft_data, tiny_dspark

from specray.actors.drafting.dspark.calibration import Calibration
from specray.actors.drafting.dspark.drafter import DSparkDrafter
from specray.actors.drafting.dspark.held_out import (
    fit_held_out,
    held_out_blocks,
    survival_ece,
)
from specray.actors.drafting.dspark.model import DSparkModel
from specray.actors.drafting.head.data import DraftData, DraftDataWriter, DraftSample
from specray.actors.engine.engine import EngineConfig, SpecEngine
from specray.actors.engine.request import GenerationRequest
from specray.actors.engine.target import LocalTarget
from specray.actors.model.loader import load_model
from specray.actors.sampling.params import SamplingParams, StoppingCriteria
from specray.bench.head_eval import RoundRecorder, calibration_rows


def test_data_made_with_more_layers_serves_a_subset_in_any_order(tmp_path: Path) -> None:
    layers, width = (2, 5, 9), 4
    writer = DraftDataWriter(tmp_path, {"generation": {"hidden_layers": list(layers)}})
    hidden = torch.arange(6 * 12, dtype=torch.float32).view(6, 12).to(torch.bfloat16)
    ids = torch.zeros(6, 2, dtype=torch.int64)
    writer.add(DraftSample(torch.arange(6), hidden, ids, torch.full((6, 2), 0.5)))
    writer.close()
    assert torch.equal(DraftData(tmp_path).hidden, hidden)
    picked = DraftData(tmp_path, (9, 2)).hidden
    assert torch.equal(picked, torch.cat([hidden[:, 2 * width :], hidden[:, :width]], dim=1))
    assert torch.equal(DraftData(tmp_path, layers).hidden, hidden)
    with pytest.raises(ValueError, match=r"layers \[2, 5, 9\], not of \[3\]"):
        DraftData(tmp_path, (2, 3))


def test_held_out_labels_and_the_fit(tiny_dir_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Greedy labels are 0/1 and never rise along the block; sampled ones lie
    in [0, 1] and never rise; one block per anchor that fits; the fit's
    first temperature can only lower the first position's ECE (1 is on the
    grid); the reported ECEs are the ones the calibrations give."""
    target_dir = tiny_dir_factory("qwen3")
    data = tiny_draft_data(target_dir, tmp_path / "data", count=8)
    model = tiny_dspark(target_dir, seed=1).eval()
    indices = list(range(len(data)))
    greedy = held_out_blocks(model, data, indices, "greedy", anchors_per_answer=4, bf16=False)
    expected_blocks = sum(min(4, len(s) - 1) for s in data)
    assert greedy.logits.shape == (expected_blocks, 3)
    assert set(greedy.survived.unique().tolist()) <= {0.0, 1.0}
    assert bool(greedy.reached[:, 0].all())
    sampled = held_out_blocks(model, data, indices, "sampled", anchors_per_answer=4, bf16=False)
    assert torch.equal(sampled.logits, greedy.logits)  # the same seeded blocks
    for labels in (greedy.survived, sampled.survived):
        assert bool(((labels >= 0) & (labels <= 1)).all())
        assert bool((labels[:, 1:] <= labels[:, :-1] + 1e-12).all())
    fit = fit_held_out(greedy, "greedy")
    assert fit.blocks == expected_blocks and len(fit.calibration.temperatures) == 3
    assert fit.ece_after[0] <= fit.ece_before[0]
    assert fit.ece_after == survival_ece(
        greedy.logits, greedy.survived, greedy.reached, fit.calibration
    )


def _rounds(
    target_dir: Path, model: DSparkModel, calibration: Calibration
) -> tuple[RoundRecorder, int]:
    """Two greedy requests through the engine at a fixed γ = 3; the recorder
    and the accepted drafts the engine's stats count."""
    recorder = RoundRecorder(DSparkDrafter(model, 2, 96, calibration))
    target = LocalTarget(load_model(target_dir), num_slots=2, max_len=96)
    engine = SpecEngine(target, recorder, None, (), EngineConfig(2, 3, adaptive=False))
    stop = StoppingCriteria(max_tokens=30, ignore_eos=True)
    requests = [
        GenerationRequest(f"r{i}", [5 + i, 40, 77, 9], SamplingParams(), stop) for i in range(2)
    ]
    accepted = {}
    for chunk in engine.generate(requests):
        accepted[chunk.request_id] = chunk.stats.accepted_tokens
    return recorder, sum(accepted.values())


def test_real_round_calibration_undoes_the_checkpoint_temperatures(tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    """The recorder sees every verified proposal (its accepted drafts add up
    to the engine's count); temperatures change no decision; and the raw ECE
    computed from a calibrated run equals the ECE of a run without one."""
    target_dir = tiny_dir_factory("qwen3")
    model = tiny_dspark(target_dir, seed=1).eval()
    temps = Calibration((2.0, 0.5, 1.5))
    plain, plain_accepted = _rounds(target_dir, model, Calibration.identity(3))
    scaled, scaled_accepted = _rounds(target_dir, model, temps)
    assert plain.outcomes and sum(o.accepted for o in plain.outcomes) == plain_accepted
    assert scaled_accepted == plain_accepted
    assert [(o.verified, o.accepted) for o in scaled.outcomes] == [
        (o.verified, o.accepted) for o in plain.outcomes
    ]
    assert all(o.verified == len(o.confidence) <= 3 for o in plain.outcomes)
    from_plain = calibration_rows(plain.outcomes, Calibration.identity(3))
    from_scaled = calibration_rows(scaled.outcomes, temps)
    for raw, undone in zip(from_plain, from_scaled, strict=True):
        assert undone["proposals"] == raw["proposals"] and undone["survived"] == raw["survived"]
        assert undone["ece_raw"] == pytest.approx(raw["ece_raw"], abs=1e-4)
    assert from_scaled[0]["ece_calibrated"] != pytest.approx(from_scaled[0]["ece_raw"], abs=1e-6)


@pytest.mark.slow
def test_train_compare_trains_both_on_one_data_set_and_evaluates(tmp_path: Path) -> None:
    """bench/train_compare.py end to end on a tiny Qwen2: one data set, a
    head and a DSpark drafter trained on it, τ of n-gram / head / DSpark on
    held-out prompts and the DSpark confidence head's real-round ECE."""
    import json

    from serving_helpers import save_served_model

    from specray.bench import train_compare
    from specray.deploy.cli import main

    model_dir = save_served_model(tmp_path / "model")
    data = tmp_path / "data"
    flags = ["--dtype", "float32", "--home", str(tmp_path / "home"), "--threads", "1"]
    made = ["train-draft", "--target", str(model_dir), "--smoke", "--data-only", "--layers", "1"]
    assert main([*made, "--data", str(data), *flags]) == 0
    result = train_compare.main(
        [
            "--target",
            str(model_dir),
            "--data",
            str(data),
            "--train-minutes",
            "0.2",
            "--epochs",
            "2",
            "--block-size",
            "3",
            "--gammas",
            "3",
            "--max-tokens",
            "12",
            "--per-category",
            "1",
            "--categories",
            "code_edit,chat",
            "--threads",
            "1",
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    for method in train_compare.METHODS:
        summary = result["training"][method]
        assert summary["steps"] > 0 and len(summary["val_loss"]) == 2
    assert result["training"]["dspark"]["calibration"]["labels"] == "greedy"
    drafters = {row["drafter"].split(":")[0] for row in result["eval"]["rows"]}
    assert drafters == {"ngram", "head", "dspark"}
    (entry, *_) = result["eval"]["calibration"]
    assert entry["drafter"].startswith("dspark:") and len(entry["positions"]) == 3
    written = json.loads(
        (tmp_path / "out" / f"draft_train_compare_{model_dir.name}.json").read_text()
    )
    assert written["training"] == result["training"]
    assert "ECE raw" in (tmp_path / "out" / f"draft_train_compare_{model_dir.name}.md").read_text()
