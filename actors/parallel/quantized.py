"""Quantized matrices as a checkpoint stores them: integer codes in groups of
consecutive columns that share an affine map.

A :class:`GroupAffine` is what a weight reader hands to a layer before the
layer picks a kernel format (see :mod:`specray.actors.parallel.linear_weights`).
Every GGUF block type that llama.cpp uses for Q4_K_M files is one of these:

    value[r, c] = scales[r, c // group_size] * codes[r, c] + offsets[r, c // group_size]

computed in float32 in that order, which is how ``gguf``'s own dequantizer
computes it, so :meth:`GroupAffine.dequantize` is bit-identical to it.

Round-to-nearest quantizers of dense weights into the same form live here
too (int8 per output channel, 4-bit per group), for checkpoints that ship
dense weights and for tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Rows dequantized at a time when re-quantizing: bounds the float32 copy of
# a vocabulary-sized matrix.
CHUNK_ROWS = 8192


@dataclass(frozen=True)
class GroupAffine:
    """A ``[rows, cols]`` matrix of integer codes with one (scale, offset) per
    row and group of ``group_size`` columns."""

    codes: torch.Tensor  # [rows, cols] int8
    scales: torch.Tensor  # [rows, cols // group_size] float32
    offsets: torch.Tensor | None  # [rows, cols // group_size] float32; None means 0
    group_size: int
    code_min: int  # the range the format can hold (not the range present)
    code_max: int
    kind: str  # where the codes came from, e.g. "Q4_K" or "int8"

    def __post_init__(self) -> None:
        rows, cols = self.codes.shape
        if cols % self.group_size:
            raise ValueError(f"{cols} columns are not whole groups of {self.group_size}")
        groups = (rows, cols // self.group_size)
        if tuple(self.scales.shape) != groups:
            raise ValueError(f"scales are {list(self.scales.shape)}, expected {list(groups)}")
        if self.offsets is not None and tuple(self.offsets.shape) != groups:
            raise ValueError(f"offsets are {list(self.offsets.shape)}, expected {list(groups)}")

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.codes.shape
        return int(rows), int(cols)

    @property
    def code_bits(self) -> int:
        """Bits a code needs: 4 for Q4_*, 5 for Q5_*, 6 for Q6_K, 8 for Q8_0."""
        return (self.code_max - self.code_min).bit_length()

    def dequantize(self) -> torch.Tensor:
        """``[rows, cols]`` float32, exactly as the checkpoint format defines it."""
        rows, cols = self.shape
        grouped = self.codes.view(rows, -1, self.group_size).float()
        values = grouped * self.scales.unsqueeze(-1)
        if self.offsets is not None:
            # A separate add (no fused multiply-add): the same two roundings
            # as the reference dequantizers.
            values = values + self.offsets.unsqueeze(-1)
        return values.view(rows, cols)

    def narrow(self, dim: int, start: int, length: int) -> GroupAffine:
        """Rows, or whole groups of columns, ``[start, start + length)``."""
        if dim == 0:
            return self._with(
                self.codes.narrow(0, start, length),
                self.scales.narrow(0, start, length),
                None if self.offsets is None else self.offsets.narrow(0, start, length),
            )
        if start % self.group_size or length % self.group_size:
            raise ValueError(
                f"columns [{start}, {start + length}) cut through {self.kind} groups of "
                f"{self.group_size}; a rank's share of the input features must be whole groups"
            )
        first, count = start // self.group_size, length // self.group_size
        return self._with(
            self.codes.narrow(1, start, length),
            self.scales.narrow(1, first, count),
            None if self.offsets is None else self.offsets.narrow(1, first, count),
        )

    def index_rows(self, index: torch.Tensor) -> GroupAffine:
        """The rows ``index`` ([n] int64) in that order."""
        return self._with(
            self.codes.index_select(0, index),
            self.scales.index_select(0, index),
            None if self.offsets is None else self.offsets.index_select(0, index),
        )

    def pad_rows(self, rows: int) -> GroupAffine:
        """Append zero rows (code 0, scale 0, offset 0: value 0) up to ``rows``."""
        extra = rows - self.shape[0]
        if extra <= 0:
            return self
        return cat_rows([self, _zeros_like_rows(self, extra)])

    def _with(
        self, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None
    ) -> GroupAffine:
        return GroupAffine(
            codes, scales, offsets, self.group_size, self.code_min, self.code_max, self.kind
        )


def _zeros_like_rows(like: GroupAffine, rows: int) -> GroupAffine:
    groups = like.scales.shape[1]
    return like._with(
        torch.zeros(rows, like.shape[1], dtype=torch.int8),
        torch.zeros(rows, groups),
        None if like.offsets is None else torch.zeros(rows, groups),
    )


def cat_rows(parts: Sequence[GroupAffine]) -> GroupAffine:
    """Stack matrices that share a group size and code range along rows."""
    first = parts[0]
    for part in parts[1:]:
        same = (part.group_size, part.code_min, part.code_max, part.shape[1]) == (
            first.group_size,
            first.code_min,
            first.code_max,
            first.shape[1],
        )
        if not same:
            raise ValueError(f"cannot stack {part.kind} rows under {first.kind} rows")
    offsets = None
    if any(part.offsets is not None for part in parts):
        offsets = torch.cat(
            [p.offsets if p.offsets is not None else torch.zeros_like(p.scales) for p in parts]
        )
    kinds = sorted({part.kind for part in parts})
    return GroupAffine(
        torch.cat([p.codes for p in parts]),
        torch.cat([p.scales for p in parts]),
        offsets,
        first.group_size,
        first.code_min,
        first.code_max,
        "+".join(kinds),
    )


def quantize_int8_per_channel(weight: torch.Tensor) -> GroupAffine:
    """Symmetric round-to-nearest int8 with one scale per row (output channel).

    ``scale = max|w| / 127`` per row; the dequantized value is ``scale * code``.
    A row of zeros gets scale 0.
    """
    rows, cols = weight.shape
    codes = torch.empty(rows, cols, dtype=torch.int8)
    scales = torch.empty(rows, 1)
    for start in range(0, rows, CHUNK_ROWS):
        chunk = weight[start : start + CHUNK_ROWS].float()
        scale = chunk.abs().amax(dim=1, keepdim=True) / 127
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes[start : start + CHUNK_ROWS] = (chunk / safe).round().clamp(-127, 127).to(torch.int8)
        scales[start : start + CHUNK_ROWS] = scale
    return GroupAffine(codes, scales, None, cols, -127, 127, "int8")


def requantize_int8_per_channel(matrix: GroupAffine) -> GroupAffine:
    """``matrix`` as int8 with one scale per row, dequantizing a chunk of rows
    at a time. Exact (codes and scales kept) when every row already has a
    single scale, no offset and codes within ±127; otherwise rounds each
    value to the nearest multiple of its row's ``max|w| / 127``."""
    rows, cols = matrix.shape
    uniform = matrix.offsets is None and bool((matrix.scales == matrix.scales[:, :1]).all())
    if uniform and matrix.code_min >= -127 and matrix.code_max <= 127:
        return GroupAffine(
            matrix.codes, matrix.scales[:, :1].clone(), None, cols, -127, 127, matrix.kind
        )
    codes = torch.empty(rows, cols, dtype=torch.int8)
    scales = torch.empty(rows, 1)
    for start in range(0, rows, CHUNK_ROWS):
        part = quantize_int8_per_channel(
            matrix.narrow(0, start, min(CHUNK_ROWS, rows - start)).dequantize()
        )
        codes[start : start + part.shape[0]] = part.codes
        scales[start : start + part.shape[0]] = part.scales
    return GroupAffine(codes, scales, None, cols, -127, 127, f"{matrix.kind}->int8")


def quantize_int4_grouped(weight: torch.Tensor, group_size: int) -> GroupAffine:
    """Asymmetric round-to-nearest 4-bit codes (0..15) per group of
    ``group_size`` columns: ``scale = (max - min) / 15``, ``offset = min``."""
    rows, cols = weight.shape
    grouped = weight.float().reshape(rows, cols // group_size, group_size)
    low = grouped.amin(dim=-1)
    scale = (grouped.amax(dim=-1) - low) / 15
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = ((grouped - low.unsqueeze(-1)) / safe.unsqueeze(-1)).round().clamp(0, 15)
    return GroupAffine(
        codes.to(torch.int8).reshape(rows, cols), scale, low, group_size, 0, 15, "int4"
    )


def quantize_symmetric_blocks(weight: torch.Tensor, bits: int, group_size: int = 32) -> GroupAffine:
    """Symmetric round-to-nearest ``bits``-bit codes per group (Q5_0-like for
    5): ``scale = max|w| / (2^(bits-1) - 1)``, codes in ``[-2^(bits-1), 2^(bits-1))``."""
    rows, cols = weight.shape
    grouped = weight.float().reshape(rows, cols // group_size, group_size)
    top = (1 << (bits - 1)) - 1
    scale = grouped.abs().amax(dim=-1) / top
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = (grouped / safe.unsqueeze(-1)).round().clamp(-top - 1, top)
    return GroupAffine(
        codes.to(torch.int8).reshape(rows, cols), scale, None, group_size, -top - 1, top, f"q{bits}"
    )
