"""A dense weight in oneDNN's blocked layout: ``x · Wᵀ`` at memory speed.

torch's ``F.linear`` on a CPU hands the weight to the BLAS in its stored
row-major layout, and for the few rows of a decode or a verify that BLAS
streams it well below the memory bandwidth (an AVX2-only EPYC, fp32, 2
threads: ~12 GB/s at one row, and 17 rows cost ~3× one). oneDNN, which torch
ships on x86, reorders the weight once into the blocks its kernels read
(``mkldnn._reorder_linear_weight``, the same call torch's own CPU inference
compiler makes); the matmul on that copy ran ~25 GB/s at one row and 17 rows
cost ~2.5× one on that machine. The values are the same weight; only the
order of the float additions differs, as between any two GEMMs.

Availability depends on the build and the CPU (bf16 needs AVX512-BF16 or
AVX-NE-CONVERT), so :func:`pack_dense` answers ``None`` where oneDNN declines
and the caller keeps ``F.linear``.
"""

from __future__ import annotations

import torch

# The batch size oneDNN is told to expect when it picks the block layout:
# 8 rows was at or near the best from 1 to 512 rows on every weight shape of
# Qwen2.5-Coder-0.5B (measured against packing for 1, 4 and 16).
PACKED_FOR_ROWS = 8


def pack_dense(weight: torch.Tensor) -> torch.Tensor | None:  # [out, in] -> opaque
    """``weight`` in oneDNN's blocked layout, or None where that is unavailable."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACKED_FOR_ROWS)
        # A trial call: some CPUs accept the reorder but not the matmul.
        probe = torch.zeros(1, weight.shape[1], dtype=weight.dtype)
        packed_linear(probe, packed, None)
    except (RuntimeError, NotImplementedError):
        return None
    return packed


def packed_linear(
    x: torch.Tensor,  # [..., in]
    packed: torch.Tensor,  # oneDNN blocked [out, in]
    bias: torch.Tensor | None,  # [out]
) -> torch.Tensor:  # [..., out]
    out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return out


def unpack(packed: torch.Tensor) -> torch.Tensor:  # opaque -> [out, in]
    """The plain row-major weight back (a copy)."""
    return packed.to_dense()
