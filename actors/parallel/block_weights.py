"""GGUF blocks multiplied as stored: :class:`BlockWeights`.

Symmetric block formats (Q4_0, Q5_0, Q8_0 in groups of 32, Q6_K in groups
of 16: ``value = scale * code``, no offset) keep their codes and per-group
scales; the codes are repacked into bit planes that the block kernel
(:mod:`specray.actors.parallel.block_kernel`) unpacks with a few vector
instructions, so a decode reads about the bits the file stores (5.5 per
weight for Q5_0 with fp16 scales) where per-channel int8 reads 8 and
rounds every value to a row-wide scale. The weights are exactly the file's;
what rounds is the activations, to int8 per block of 32 (as llama.cpp does
for these formats), which is why a verify row equals the decode of that row.

Past :data:`DEQUANTIZED_ROWS` rows (a long prefill, a large batched verify)
the integer dot products stop paying for themselves against a dense GEMM,
so the weight is dequantized, a chunk of output rows at a time, into the
activation dtype and multiplied densely; the same input rows then round
differently, and the engine keeps the rows of one request's decode and
verify below that count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from specray.actors.parallel.block_kernel import BlockKernel, load_block_kernel
from specray.actors.parallel.quantized import GroupAffine
from specray.actors.parallel.weight_format import LinearWeights, frozen

BLOCK = 32
BLOCK_GROUP_SIZES = (16, 32)
# Code bits the kernel unpacks: 4 in nibbles, up to 2 more in bit planes, or 8.
CODE_BITS = (4, 5, 6, 8)
# Rows at which a matmul switches to dequantize-then-GEMM.
DEQUANTIZED_ROWS = 64
# Output rows dequantized at a time: bounds the dense copy of a vocabulary.
DEQUANTIZE_CHUNK = 16384


def fits_blocks(matrix: GroupAffine) -> bool:
    """Whether the block kernel multiplies ``matrix`` as it is."""
    return (
        matrix.offsets is None
        and matrix.group_size in BLOCK_GROUP_SIZES
        and matrix.shape[1] % BLOCK == 0
        and matrix.code_min >= -128
        and matrix.code_max <= 127
    )


def code_bits(matrix: GroupAffine) -> int:
    """The fewest bits of :data:`CODE_BITS` that hold ``matrix``'s code range."""
    return next(bits for bits in CODE_BITS if matrix.code_max - matrix.code_min < 1 << bits)


class BlockWeights(LinearWeights):
    """Signed codes in groups of 16 or 32 with one scale per group, multiplied
    by the block kernel (module docstring)."""

    def __init__(
        self, matrix: GroupAffine, dtype: torch.dtype, kernel: BlockKernel | None = None
    ) -> None:
        super().__init__()
        if not fits_blocks(matrix):
            raise ValueError(f"{matrix.kind} is not a symmetric block format the kernel reads")
        self.kernel = kernel or load_block_kernel()
        rows, cols = matrix.shape
        self.out_features, self.in_features = rows, cols
        self.bits = code_bits(matrix)
        self.group_size = matrix.group_size
        self.dtype = dtype
        empty_u8 = torch.empty(0, dtype=torch.uint8)
        if self.bits == 8:
            self.code_min = 0
            self.codes = frozen(matrix.codes.contiguous())
            self.nibbles, self.planes = frozen(empty_u8), frozen(empty_u8.int())
        else:
            self.code_min = matrix.code_min
            self.nibbles, self.planes = (frozen(t) for t in _bit_planes(matrix, self.bits))
            self.codes = frozen(torch.empty(0, dtype=torch.int8))
        scales = matrix.scales.contiguous()
        # fp16 scales (Q4_0 / Q5_0 / Q8_0 store them so) halve the scale bytes;
        # products like Q6_K's d * sc stay float32.
        half = scales.half()
        exact_in_fp16 = bool((half.float() == scales).all())
        self.scales = frozen(half if exact_in_fp16 else scales)
        self.format_name = f"q{self.bits}/g{self.group_size}"

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.dtype not in (torch.float32, torch.bfloat16):
            flat = flat.float()
        flat = flat.contiguous()
        if flat.shape[0] >= DEQUANTIZED_ROWS:
            out = self._dense_matmul(flat)
        else:
            out = torch.empty(flat.shape[0], self.out_features, dtype=flat.dtype)
            self.kernel.matmul(
                flat,
                self.nibbles,
                self.planes,
                self.codes,
                self.scales,
                self.bits,
                self.group_size,
                self.code_min,
                out,
            )
        out = out.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return out if bias is None else out + bias

    def _dense_matmul(self, flat: torch.Tensor) -> torch.Tensor:
        parts = []
        for first in range(0, self.out_features, DEQUANTIZE_CHUNK):
            parts.append(F.linear(flat, self._dense(first, DEQUANTIZE_CHUNK, flat.dtype)))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def _dense(self, first: int, count: int, dtype: torch.dtype) -> torch.Tensor:
        count = min(count, self.out_features - first)
        out = torch.empty(count, self.in_features, dtype=dtype)
        self.kernel.dequantize(
            self.nibbles,
            self.planes,
            self.codes,
            self.scales,
            self.bits,
            self.group_size,
            self.code_min,
            first,
            out,
        )
        return out

    def dequantize(self) -> torch.Tensor:
        return self._dense(0, self.out_features, torch.float32)


def _bit_planes(matrix: GroupAffine, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes as the kernel reads them: ``[rows, cols / 2]`` nibbles (byte j of
    a block holds values j and j + 16) and ``[rows, blocks, bits - 4]`` int32
    planes (bit j of plane p is bit 4 + p of value j), of ``code - code_min``."""
    rows, cols = matrix.shape
    unsigned = (matrix.codes.to(torch.int16) - matrix.code_min).view(rows, cols // BLOCK, 2, 16)
    nibbles = (unsigned[:, :, 0] & 15) | ((unsigned[:, :, 1] & 15) << 4)
    positions = torch.arange(BLOCK, dtype=torch.int64)
    flat = unsigned.reshape(rows, cols // BLOCK, BLOCK).to(torch.int64)
    planes = []
    for plane in range(bits - 4):
        bit = (flat >> (4 + plane)) & 1
        word = (bit << positions).sum(dim=-1)
        planes.append(torch.where(word >= 1 << 31, word - (1 << 32), word))
    stacked = (
        torch.stack(planes, dim=-1).to(torch.int32)
        if planes
        else torch.empty(rows, cols // BLOCK, 0, dtype=torch.int32)
    )
    return nibbles.to(torch.uint8).reshape(rows, cols // 2).contiguous(), stacked.contiguous()
