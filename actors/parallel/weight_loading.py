"""What a parallel layer calls to load its slice in whatever format the
checkpoint holds it.

A source that can hand out quantized slices (a GGUF file) implements
:class:`QuantizedSource`; any other source (safetensors) is read dense. The
layer passes its current weights (a dense placeholder, allocated at
construction): dense slices are copied into it, quantized ones replace it
with the format :func:`~specray.actors.parallel.linear_weights.linear_weights_from`
picks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from specray.actors.parallel.embedding_rows import GroupRows
from specray.actors.parallel.linear_weights import (
    DenseWeights,
    LinearWeights,
    linear_weights_from,
)
from specray.actors.parallel.quantized import GroupAffine
from specray.actors.parallel.span import Span
from specray.actors.parallel.weights import WeightSource


@dataclass(frozen=True)
class WeightSlice:
    """Tensor ``name``, or its ``span``."""

    name: str
    span: Span | None = None


@runtime_checkable
class QuantizedSource(Protocol):
    def read_quantized(self, name: str, span: Span | None = None) -> GroupAffine | None:
        """The slice as stored codes, or None where the tensor is stored dense."""
        ...


def read_slice(source: WeightSource, part: WeightSlice) -> torch.Tensor | GroupAffine:
    if isinstance(source, QuantizedSource):
        quantized = source.read_quantized(part.name, part.span)
        if quantized is not None:
            return quantized
    return source.read(part.name, part.span)


def load_linear(
    source: WeightSource,
    parts: Sequence[WeightSlice],
    current: LinearWeights,
    rows: int | None = None,
) -> LinearWeights:
    """The row blocks ``parts`` stacked, then zero rows up to ``rows``.

    ``current`` is a :class:`DenseWeights` of the final shape: returned,
    filled, when every part is dense; it gives the dtype and device otherwise.
    """
    if not isinstance(current, DenseWeights):
        raise TypeError("weights are loaded once, into their dense placeholder")
    blocks = [read_slice(source, part) for part in parts]
    dense = current.weight
    if all(isinstance(block, torch.Tensor) for block in blocks):
        row = 0
        for block in blocks:
            assert isinstance(block, torch.Tensor)
            dense[row : row + block.shape[0]].copy_(block)
            row += block.shape[0]
        return current
    padded = rows or sum(block.shape[0] for block in blocks)
    missing = padded - sum(block.shape[0] for block in blocks)
    if missing > 0:
        blocks.append(_zero_rows(blocks[-1], missing))
    return linear_weights_from(blocks, dense.dtype, dense.device)


def load_rows(
    source: WeightSource, part: WeightSlice, current: DenseWeights | GroupRows, rows: int
) -> DenseWeights | GroupRows:
    """An embedding table's slice, zero rows appended up to ``rows``."""
    if not isinstance(current, DenseWeights):
        raise TypeError("weights are loaded once, into their dense placeholder")
    block = read_slice(source, part)
    dense = current.weight
    if isinstance(block, torch.Tensor):
        dense[: block.shape[0]].copy_(block)
        return current
    return GroupRows(block.pad_rows(rows), dense.dtype, dense.device)


def _zero_rows(like: torch.Tensor | GroupAffine, count: int) -> torch.Tensor | GroupAffine:
    if isinstance(like, GroupAffine):
        return like.pad_rows(like.shape[0] + count).narrow(0, like.shape[0], count)
    return torch.zeros(count, like.shape[1], dtype=like.dtype)
