"""The interface every weight format behind a parallel linear layer has."""

from __future__ import annotations

import torch
from torch import nn


def frozen(tensor: torch.Tensor) -> nn.Parameter:
    # Parameters (not buffers) so that parameter counts see every format.
    return nn.Parameter(tensor, requires_grad=False)


class LinearWeights(nn.Module):
    """A ``[out_features, in_features]`` weight in some format."""

    out_features: int
    in_features: int
    format_name: str

    def forward(
        self,
        x: torch.Tensor,  # [..., in_features]
        bias: torch.Tensor | None = None,  # [out_features]
    ) -> torch.Tensor:  # [..., out_features]
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The weight this format multiplies by, ``[out, in]`` float32."""
        raise NotImplementedError

    def rows_from(
        self,
        x: torch.Tensor,  # [..., in_features]
        first: int,  # output rows before this one are not wanted
        bias: torch.Tensor | None = None,  # [out_features - first]
    ) -> torch.Tensor:  # [..., out_features - first]
        """The output features from ``first`` on (a fused projection's tail).
        Formats that cannot skip rows compute all and drop the head."""
        out = self(x)[..., first:]
        return out if bias is None else out + bias

    def matrix(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as a ``[out, in]`` tensor in ``dtype``, for math that is
        not a plain matmul (a dense weight is returned as it is, uncopied)."""
        return self.dequantize().to(dtype)
