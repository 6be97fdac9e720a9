"""``bench/kernel_ab``: two revisions' block kernels (and weight layouts), each
in a process of its own, timed in alternation on a tiny GGUF model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_gguf import write_tiny_qwen2

from specray.actors.parallel.block_kernel import block_kernel_reason
from specray.bench.kernel_ab import main


def test_a_revision_against_itself_is_identical(tmp_path: Path) -> None:
    if block_kernel_reason() is not None:
        pytest.skip(f"block kernel: {block_kernel_reason()}")
    model_dir = write_tiny_qwen2(tmp_path / "model")
    flags = ["--base", "HEAD", "--target", str(model_dir), "--rows", "1,3", "--repeats", "2"]
    result = main([*flags, "--threads", "1", "--tag", "self", "--out", str(tmp_path)])
    assert [row["rows"] for row in result["rows"]] == [1, 3]
    assert all(row["identical"] for row in result["rows"])
    assert all(row["base_ms"] > 0 and row["head_ms"] > 0 for row in result["rows"])
    assert result["weights"] > 0 and result["rows"][0]["head_vs_one"] == 1.0
    saved = json.loads((tmp_path / f"kernel_ab_{model_dir.name}_self.json").read_text())
    assert saved["rows"] == result["rows"] and saved["base"] == "HEAD"
    assert "outputs identical" in (tmp_path / f"kernel_ab_{model_dir.name}_self.md").read_text()
