"""``bench/decode_profile``: a decode step's operators, grouped by kind, on a
tiny model (the committed results come from the real checkpoints)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from specray.bench.decode_profile import kind_of, main


@pytest.mark.parametrize(
    ("op", "kind"),
    [
        ("aten::_weight_int4pack_mm_for_cpu", "low-bit matmul"),
        ("aten::_int_mm", "low-bit matmul"),
        ("aten::mm", "dense matmul"),
        ("aten::_softmax", "attention"),
        ("aten::rsqrt", "norms"),
        ("aten::index_put_", "cache and indexing"),
        ("aten::silu", "elementwise"),
        ("aten::empty_strided", "other"),
    ],
)
def test_operators_are_grouped_by_kind(op: str, kind: str) -> None:
    assert kind_of(op) == kind


def test_a_profile_accounts_for_the_step(tiny_dir_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model_dir = tiny_dir_factory("qwen2")
    flags = ["--model", str(model_dir), "--weights", "fp32", "--threads", "1"]
    result = main([*flags, "--steps", "3", "--repeats", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / f"decode_profile_{model_dir.name}_fp32.json").read_text())
    assert saved["ops"] == result["ops"] and result["wall_ms"] > 0
    assert result["kinds_ms"]["dense matmul"] > 0 and result["kinds_ms"]["attention"] > 0
    assert sum(result["kinds_ms"].values()) == pytest.approx(result["in_ops_ms"])
    assert all(op["calls"] >= 0 and op["ms"] > 0 for op in result["ops"])
    assert "ms per token" in (tmp_path / f"decode_profile_{model_dir.name}_fp32.md").read_text()
