"""``bench/decode_profile``: a decode step's operators, grouped by kind, on a
tiny model (the committed results come from the real checkpoints)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_gguf import write_tiny_qwen2

from specray.actors.engine.target import LocalTarget
from specray.actors.model.loader import load_model
from specray.actors.parallel.block_kernel import block_kernel_reason
from specray.bench.decode_profile import KernelClock, decode_steps, kind_of, main


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
    assert "ms per step" in (tmp_path / f"decode_profile_{model_dir.name}_fp32.md").read_text()


def test_a_verify_of_several_rows_is_profiled_as_one_step(tiny_dir_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model_dir = tiny_dir_factory("qwen2")
    flags = ["--model", str(model_dir), "--weights", "fp32", "--threads", "1", "--steps", "3"]
    flags += ["--repeats", "1", "--out", str(tmp_path)]
    one, five = main(flags), main([*flags, "--rows", "5"])
    assert five["rows"] == 5 and five["wall_ms"] > 0

    def matmuls(result: dict) -> int:  # type: ignore[type-arg]
        return sum(op["calls"] for op in result["ops"] if kind_of(op["op"]) == "dense matmul")

    # One forward per step: a layer's projections run once per step, not once per row.
    assert matmuls(five) == matmuls(one) > 0
    report = (tmp_path / f"decode_profile_{model_dir.name}_fp32_rows5.md").read_text()
    assert "One verify of 5 rows" in report


def test_the_block_kernel_share_of_a_step_is_timed_without_the_profiler(tmp_path: Path) -> None:
    if block_kernel_reason() is not None:
        pytest.skip(f"block kernel: {block_kernel_reason()}")
    model = load_model(write_tiny_qwen2(tmp_path / "model"), torch.bfloat16, weights="gguf")
    target = LocalTarget(model, 1, 64)
    clock = KernelClock(model)
    assert clock.weights
    with clock:
        step = decode_steps(target, 8, 3, clock=clock)
        assert 0 < clock.seconds / 3 < step  # the prefill before the steps is not counted
    # Once timed, the weights go back to their plain calls.
    assert all(weights._bound is None for weights in clock.weights)
    decode_steps(target, 8, 1)


def test_dense_weights_have_no_kernel_split(tiny_dir_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model_dir = tiny_dir_factory("qwen2")
    flags = ["--model", str(model_dir), "--weights", "fp32", "--threads", "1"]
    result = main([*flags, "--steps", "2", "--repeats", "1", "--out", str(tmp_path)])
    assert result["kernel_split"] is None
