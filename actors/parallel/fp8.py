"""Block-scaled FP8 weights, as DeepSeek ships V3 and V4.

A weight ``W`` of shape ``[out, in]`` is stored as ``float8_e4m3fn`` next to
a scale tensor of shape ``[ceil(out / bo), ceil(in / bi)]`` (``bo x bi`` =
``weight_block_size``, 128 x 128 unless ``config.json``'s
``quantization_config`` says otherwise): ``W ≈ fp8 * scale`` block by block.
V3 names the scale ``<module>.weight_scale_inv``, V4 ``<module>.scale``
(there possibly as ``float8_e8m0fnu``, a power of two). The name says
"inverse" because quantising divided by it; dequantising multiplies.
"""

from __future__ import annotations

import torch

DEFAULT_BLOCK = (128, 128)
SCALE_SUFFIXES = ("weight_scale_inv", "scale")


def scale_names(weight_name: str) -> list[str]:
    """Where the scale of ``<module>.weight`` may be stored."""
    module = weight_name.removesuffix("weight")
    return [module + suffix for suffix in SCALE_SUFFIXES]


def dequantize(
    weight: torch.Tensor,  # [rows, cols] float8_e4m3fn: a block-aligned window of the weight
    scale: torch.Tensor,  # [ceil(rows / bo), ceil(cols / bi)]: the window's blocks' scales
    block: tuple[int, int],  # (bo, bi)
) -> torch.Tensor:  # [rows, cols] float32
    rows, cols = weight.shape
    full = scale.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return weight.float() * full[:rows, :cols]


def quantize(
    weight: torch.Tensor,  # [rows, cols] float
    block: tuple[int, int] = DEFAULT_BLOCK,
    power_of_two: bool = False,  # scales rounded up to 2^k (storable as float8_e8m0fnu)
) -> tuple[torch.Tensor, torch.Tensor]:  # fp8 weight, float32 scale (see dequantize)
    """Per-block absmax scaling onto e4m3's range (max 448)."""
    rows, cols = weight.shape
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    padded = weight.float().new_zeros(grid[0] * block[0], grid[1] * block[1])
    padded[:rows, :cols] = weight.float()
    blocks = padded.view(grid[0], block[0], grid[1], block[1])
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    if power_of_two:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    quantized = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn)
    return quantized.view_as(padded)[:rows, :cols].contiguous(), scale
