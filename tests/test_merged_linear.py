"""MergedReplicatedLinear: several projections of one input in one matmul,
each part equal to its own linear, loaded by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from specray.actors.parallel.linear import MergedReplicatedLinear
from specray.actors.parallel.weights import WeightSource

PARTS = {"attn.wq_a": 12, "attn.wkv": 8, "attn.indexer.weights_proj": 3}


def _checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tensors = {
        f"{name}.weight": torch.randn(rows, 16, generator=generator) for name, rows in PARTS.items()
    }
    save_file(tensors, str(directory / "model.safetensors"))
    return tensors


def test_each_part_equals_its_own_linear(tmp_path: Path) -> None:
    tensors = _checkpoint(tmp_path)
    merged = MergedReplicatedLinear(16, list(PARTS.values()), torch.float32)
    with WeightSource(tmp_path, ()) as source:
        merged.load(source, list(PARTS))
    x = torch.randn(5, 16)
    outputs = merged(x)
    assert [out.shape for out in outputs] == [(5, rows) for rows in PARTS.values()]
    for out, name in zip(outputs, PARTS, strict=True):
        torch.testing.assert_close(out, F.linear(x, tensors[f"{name}.weight"]))


def test_a_missing_name_is_an_error_naming_both_counts(tmp_path: Path) -> None:
    _checkpoint(tmp_path)
    merged = MergedReplicatedLinear(16, list(PARTS.values()), torch.float32)
    with WeightSource(tmp_path, ()) as source, pytest.raises(ValueError, match="3 parts, 2 names"):
        merged.load(source, list(PARTS)[:2])
