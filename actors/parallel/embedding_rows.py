"""An embedding table kept in its checkpoint's quantized form.

A lookup reads a handful of rows, so the table is stored compactly (int8
codes, float32 scales and offsets per group) and only the rows looked up are
dequantized. The values are exactly the checkpoint's (see
:meth:`GroupAffine.dequantize`), cast to the model dtype like a dense table.
A tied LM head multiplies by the whole table instead: it gets its own
:class:`~specray.actors.parallel.linear_weights.LinearWeights` built from the
same codes (:meth:`GroupRows.group_affine`).
"""

from __future__ import annotations

import torch
from torch import nn

from specray.actors.parallel.quantized import GroupAffine


class GroupRows(nn.Module):
    """``[num_rows, dim]`` group-affine rows, dequantized on lookup."""

    def __init__(self, matrix: GroupAffine, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.dtype = dtype
        self.codes = nn.Parameter(matrix.codes.to(device), requires_grad=False)
        self.scales = nn.Parameter(matrix.scales.to(device), requires_grad=False)
        self.offsets = (
            None
            if matrix.offsets is None
            else nn.Parameter(matrix.offsets.to(device), requires_grad=False)
        )
        self._layout = (matrix.group_size, matrix.code_min, matrix.code_max, matrix.kind)
        self.format_name = f"rows/{matrix.kind}"

    def group_affine(self) -> GroupAffine:
        group_size, code_min, code_max, kind = self._layout
        offsets = None if self.offsets is None else self.offsets.data
        return GroupAffine(
            self.codes.data, self.scales.data, offsets, group_size, code_min, code_max, kind
        )

    def rows(self, token_ids: torch.Tensor) -> torch.Tensor:  # [...] int64 -> [..., dim]
        flat = token_ids.reshape(-1)
        picked = self.group_affine().index_rows(flat).dequantize().to(self.dtype)
        return picked.view(*token_ids.shape, -1)
