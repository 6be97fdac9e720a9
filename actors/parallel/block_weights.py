"""GGUF blocks multiplied as stored: :class:`BlockWeights`.

Block formats keep their codes and per-group scales (and offsets): Q4_0,
Q5_0, Q8_0, Q6_K (``value = scale * code``) and Q4_1, Q5_1, Q4_K, Q5_K
(``value = scale * code + offset``). The codes are repacked, tiled by 16
output rows, into a 4-bit plane and one bit plane per extra bit, which the
block kernel (:mod:`specray.actors.parallel.block_kernel`) unpacks with a
few vector instructions, so a decode reads about the bits the file stores
(5.5 per weight for Q5_0, 5 for Q4_K) where per-channel int8 reads 8 and
rounds every value to a row-wide scale. Codes are the file's; scales and
offsets are held in fp16, which is exact for the formats that store an fp16
scale (Q4_0, Q5_0, Q8_0, Q4_1, Q5_1) and rounds the K-quants' products
``d * sc`` and ``dmin * m`` to nearest (at most half an fp16 step, 2^-11 of
the value, for scales in fp16's normal range). What rounds besides is the
activations, to int8 per block of 32 (as llama.cpp does for these formats).
Every row count, prefill included, runs on the kernel, and a row depends on
that row alone: a verify row equals the decode of that row at any batch
size.
"""

from __future__ import annotations

from typing import Any

import torch

from specray.actors.parallel.block_kernel import (
    BlockKernel,
    BoundMatmul,
    PackedBlocks,
    build_block_kernel,
    load_block_kernel,
    named_for_profiler,
)
from specray.actors.parallel.quantized import GroupAffine
from specray.actors.parallel.weight_format import LinearWeights, frozen

BLOCK = 32
BLOCK_GROUP_SIZES = (16, 32)
# Code bits the kernel unpacks: 4 in nibbles, up to 2 more in high bits, or 8.
CODE_BITS = (4, 5, 6, 8)
TILE_ROWS = 16
# Activation dtypes the kernel reads and writes; others are cast to float32.
KERNEL_DTYPES = (torch.float32, torch.bfloat16)
# What torch's profiler calls one block matmul (bench/decode_profile.py).
PROFILER_NAME = "specray::block_matmul"


def fits_blocks(matrix: GroupAffine) -> bool:
    """Whether the block kernel multiplies ``matrix`` as it is."""
    return (
        matrix.group_size in BLOCK_GROUP_SIZES
        and matrix.shape[1] % BLOCK == 0
        and matrix.code_min >= -128
        and matrix.code_max <= 127
        and matrix.code_max - matrix.code_min < 256
    )


def code_bits(matrix: GroupAffine) -> int:
    """The fewest bits of :data:`CODE_BITS` that hold ``matrix``'s code range."""
    return next(bits for bits in CODE_BITS if matrix.code_max - matrix.code_min < 1 << bits)


class BlockWeights(LinearWeights):
    """Codes in groups of 16 or 32 with one scale (and offset) per group,
    multiplied by the block kernel (module docstring)."""

    def __init__(
        self, matrix: GroupAffine, dtype: torch.dtype, kernel: BlockKernel | None = None
    ) -> None:
        super().__init__()
        if not fits_blocks(matrix):
            raise ValueError(f"{matrix.kind} is not a block format the block kernel reads")
        self.kernel = kernel or load_block_kernel()
        rows, cols = matrix.shape
        self.out_features, self.in_features = rows, cols
        self.bits = code_bits(matrix)
        self.group_size = matrix.group_size
        # 8-bit codes are stored as code + 128, so that every width is unsigned.
        self.code_min = -128 if self.bits == 8 else matrix.code_min
        nibbles, highs, codes, scales, offsets = _tiles(matrix, self.bits, self.code_min)
        # Scales and offsets in fp16, as the file stores Q4_0 / Q5_0 / Q8_0 /
        # Q4_1 / Q5_1's (exact); the K-quants' products d * sc and dmin * m
        # round to nearest (module docstring).
        self.nibbles, self.highs, self.codes = frozen(nibbles), frozen(highs), frozen(codes)
        self.scales = frozen(scales.half())
        self.offsets = None if offsets is None else frozen(offsets.half())
        self._bound: BoundMatmul | None = None
        affine = "" if offsets is None else "+offset"
        self.format_name = f"q{self.bits}{affine}/g{self.group_size}"

    def __getstate__(self) -> dict[str, Any]:
        # The loaded library is not data: a copy (or an unpickled weight)
        # loads the same build of the kernel where it lands.
        state = dict(self.__dict__)
        state["_kernel_vnni"] = self.kernel.vnni
        state["kernel"], state["_bound"] = None, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        vnni = state.pop("_kernel_vnni")
        super().__setstate__(state)
        kernel = load_block_kernel()
        self.kernel = kernel if kernel.vnni == vnni else build_block_kernel(vnni)

    def packed(self) -> PackedBlocks:
        return PackedBlocks(
            self.nibbles,
            self.highs,
            self.codes,
            self.scales,
            self.offsets,
            self.bits,
            self.group_size,
            self.code_min,
        )

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # A decode step makes a hundred of these calls, so the usual case
        # (2-D, contiguous, float32 or bf16) dispatches no operator but the
        # output's allocation and the kernel.
        flat = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if flat.dtype not in KERNEL_DTYPES:
            flat = flat.float()
        if not flat.is_contiguous():
            flat = flat.contiguous()
        out = torch.empty((flat.shape[0], self.out_features), dtype=flat.dtype)
        bound = self._bound
        if bound is None or bound.scales_at != self.scales.data_ptr():
            bound = self._bound = self.kernel.bind(self.packed())
        named_for_profiler(PROFILER_NAME, lambda: bound(flat, out))
        if x.dim() != 2:
            out = out.view(*x.shape[:-1], self.out_features)
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        if bias is None:
            return out
        # out is this call's own tensor: add in place unless the sum promotes.
        return out.add_(bias) if bias.dtype == out.dtype else out + bias

    def dequantize(self) -> torch.Tensor:
        out = torch.empty(self.out_features, self.in_features)
        self.kernel.dequantize(self.packed(), 0, out)
        return out


def _tiles(
    matrix: GroupAffine, bits: int, code_min: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The kernel's layout (csrc/tiled_matmul.cpp): output rows padded to tiles
    of 16 (zero codes, zero scales); per tile and block, 8 chunks of 64 bytes
    holding 4 input features of each of the 16 rows."""
    rows, cols = matrix.shape
    padded = matrix.pad_rows(-(-rows // TILE_ROWS) * TILE_ROWS)
    tiles, blocks, groups = padded.shape[0] // TILE_ROWS, cols // BLOCK, BLOCK // matrix.group_size
    unsigned = padded.codes.to(torch.int16) - code_min
    # [tiles, 16 rows, blocks, 8 chunks, 4] -> [tiles, blocks, 8 chunks, 16 rows * 4]
    chunks = unsigned.view(tiles, TILE_ROWS, blocks, 8, 4).permute(0, 2, 3, 1, 4)
    chunks = chunks.reshape(tiles, blocks, 8, TILE_ROWS * 4)
    scales, offsets = (
        None if part is None else part.view(tiles, TILE_ROWS, blocks, groups).permute(0, 2, 3, 1)
        for part in (padded.scales, padded.offsets)
    )
    assert scales is not None
    scales = scales.contiguous()
    offsets = None if offsets is None else offsets.contiguous()
    if bits == 8:
        return _EMPTY_U8, _EMPTY_U8, chunks.to(torch.uint8).contiguous(), scales, offsets
    low = chunks & 15
    nibbles = (low[:, :, :4] | (low[:, :, 4:] << 4)).to(torch.uint8).contiguous()
    if bits == 4:
        return nibbles, _EMPTY_U8, _EMPTY_U8, scales, offsets
    # The bits above the nibble, width w per code, 8 / w chunks to a byte:
    # chunk g * (8 / w) + j at bits [w * j, w * j + w) of high group g.
    width = bits - 4
    per_byte = 8 // width
    high = (chunks >> 4).view(tiles, blocks, width, per_byte, TILE_ROWS * 4)
    shifts = (torch.arange(per_byte, dtype=torch.int16) * width).view(per_byte, 1)
    highs = (high << shifts).sum(dim=3)  # [tiles, blocks, width, 64]
    return nibbles, highs.to(torch.uint8).contiguous(), _EMPTY_U8, scales, offsets


_EMPTY_U8 = torch.empty(0, dtype=torch.uint8)
