"""The V4 benchmark's speculative section runs every method through the
engine on the shipped prompts and reports consistent figures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from specray.actors.model.loader import load_model
from specray.actors.store.tiny_v4 import write_tiny_v4
from specray.bench import v4_spec
from specray.bench.prompts import CATEGORIES

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_every_method_reports_tau_speedup_and_round_cost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(v4_spec, "NEW_TOKENS", 10)
    monkeypatch.setattr(v4_spec, "GAMMAS", (1, 3))
    monkeypatch.setattr(v4_spec, "PROMPT_BYTES", 40)
    model_dir = write_tiny_v4(tmp_path / "v4")
    spec = v4_spec.measure(model_dir, load_model(model_dir), torch.float32)
    assert len(spec["prompts"]) == len(CATEGORIES)
    labels = ["target-only", "ngram γ=1", "ngram γ=3", "mtp γ=1", "mtp γ=3"]
    assert list(spec["methods"]) == labels
    base = spec["methods"]["target-only"]
    assert base["tau"] == 1.0 and base["speedup"] == 1.0
    for label in labels[1:]:
        row = spec["methods"][label]
        gamma = int(label.rsplit("=", 1)[1])
        assert 1.0 <= row["tau"] <= gamma + 1
        assert row["speedup"] > 0 and row["tokens_per_s"] > 0
    text = "\n".join(v4_spec.markdown(spec))
    assert text.count("\n| ") == len(labels) + 2  # header, rule, a row per method


def test_prompts_enter_as_their_last_bytes() -> None:
    ids = v4_spec.prompt_ids("ab" * 200 + "é")
    assert len(ids) == v4_spec.PROMPT_BYTES
    assert ids[-2:] == [v4_spec.BYTE_OFFSET + b for b in "é".encode()]
    assert min(ids) >= v4_spec.BYTE_OFFSET
