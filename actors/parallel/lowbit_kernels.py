"""torch's weight-only low-bit matmuls, behind one call per format and device.

int4: ``y = x · Wᵀ`` with ``W[n, k] = (code[n, k] - 8) * scale[g, n] + zero[g, n]``
for ``g = k // group_size``, codes 0..15. On CPU this is
``aten._weight_int4pack_mm_for_cpu``; on CUDA ``aten._weight_int4pack_mm``
(tensor-core layout, bfloat16 activations). Each device has its own packed
layout, so weights are packed on the device they run on.

int8: ``W[n, k] = code[n, k] * scale[n]`` (one scale per output channel). On
CPU ``aten._weight_int8pack_mm``; elsewhere the scale factors out of the sum,
``y = (x · codeᵀ) * scale``, which is the same value computed with a dense
matmul on the codes. :func:`int8_per_token_matmul` is the CPU alternative
that also rounds the activations to int8, one scale per row (llama.cpp
rounds them with one scale per 32 values): the integer product is exact,
and on CPUs where it measures faster it runs instead
(:mod:`specray.actors.parallel.int8_kernels`).

Both CPU kernels take a 2-D contiguous activation; callers' leading
dimensions are flattened here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INT4_GROUP_SIZES = (32, 64, 128, 256)
# The CPU int4 packing tiles output channels by 16 (CUDA by 8): weights are
# padded with zero rows up to a multiple of this and outputs cut back.
INT4_ROW_MULTIPLE = 16


def pack_int4(
    codes: torch.Tensor,  # [N, K] integer 0..15, N a multiple of INT4_ROW_MULTIPLE
    device: torch.device,
) -> torch.Tensor:
    """Codes in the layout the int4 matmul of ``device`` reads."""
    if device.type == "cuda":
        nibbles = codes.to(torch.uint8)
        paired = (nibbles[:, ::2] << 4) | nibbles[:, 1::2]
        return torch.ops.aten._convert_weight_to_int4pack(
            paired.to(device), _inner_k_tiles(codes.shape[1])
        )
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).to(device), 1)


def _inner_k_tiles(in_features: int) -> int:
    for tiles in (8, 4, 2):
        if in_features % (tiles * 16) == 0:
            return tiles
    raise ValueError(f"the CUDA int4 kernel needs K a multiple of 32, got {in_features}")


def int4_matmul(
    x: torch.Tensor,  # [..., K]
    packed: torch.Tensor,  # from pack_int4
    group_size: int,
    scales_and_zeros: torch.Tensor,  # [K // group_size, N, 2] in x's dtype
) -> torch.Tensor:  # [..., N]
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    if x.device.type == "cuda":
        out = torch.ops.aten._weight_int4pack_mm(flat, packed, group_size, scales_and_zeros)
    else:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed, group_size, scales_and_zeros)
    return out.view(*x.shape[:-1], out.shape[-1])


def int8_matmul(
    x: torch.Tensor,  # [..., K]
    codes: torch.Tensor,  # [N, K] int8
    scales: torch.Tensor,  # [N] in x's dtype
) -> torch.Tensor:  # [..., N]
    if x.device.type != "cpu":
        return F.linear(x, codes.to(x.dtype)) * scales
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.ops.aten._weight_int8pack_mm(flat, codes, scales)
    return out.view(*x.shape[:-1], out.shape[-1])


def int8_per_token_matmul(
    x: torch.Tensor,  # [..., K]
    codes: torch.Tensor,  # [N, K] int8
    scales: torch.Tensor,  # [N] float32
) -> torch.Tensor:  # [..., N] in x's dtype
    """``x · Wᵀ`` with each row of ``x`` rounded to int8 on its own scale
    (its largest magnitude becomes 127), the integer product summed exactly
    in int32 (``torch._int_mm``), then both scales applied in float32.

    A row's result depends on that row alone and the integer sum has no
    rounding, so the rows of a k-row verify equal k one-row decodes bit for
    bit, whatever the kernel's blocking.
    """
    flat = x.reshape(-1, x.shape[-1]).float()
    row_scales = flat.abs().amax(dim=1, keepdim=True) / 127
    # An all-zero row stays zero; dividing by 1 avoids 0 / 0.
    row_scales = torch.where(row_scales > 0, row_scales, torch.ones_like(row_scales))
    row_codes = torch.round(flat / row_scales).to(torch.int8)
    sums = torch._int_mm(row_codes, codes.t())
    out = (sums.float() * row_scales * scales).to(x.dtype)
    return out.view(*x.shape[:-1], out.shape[-1])
