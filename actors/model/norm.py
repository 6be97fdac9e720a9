"""RMSNorm in the two flavours the supported families use."""

from __future__ import annotations

import torch
from torch import nn

from specray.actors.parallel.block_kernel import inference_kernel, named_for_profiler
from specray.actors.parallel.weights import WeightSource

# What torch's profiler calls one kernel call (bench/decode_profile.py).
PROFILER_NAME = "specray::rms_norm"


class RMSNorm(nn.Module):
    """``x / rms(x) * w`` (Llama, Qwen, DeepSeek-V4) or ``* (1 + w)`` (Gemma 3).

    The families also round differently: Llama casts the normalised
    activations back to the input dtype before scaling, Gemma scales in fp32
    and casts last, and DeepSeek-V4 keeps the weight itself in fp32
    (``float_weight``) and scales in fp32. All are kept exact so bf16
    outputs match the reference.

    On CPU, outside autograd, one compiled call does it (csrc/row_norm.cpp:
    the same roundings, its sum of squares in its own fixed order), where
    torch's eight operators cost a decode step about 20 us per norm.
    """

    def __init__(
        self,
        dim: int,
        eps: float,
        dtype: torch.dtype,
        gemma: bool = False,
        float_weight: bool = False,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.gemma = gemma
        self.float_weight = float_weight
        weight_dtype = torch.float32 if float_weight else dtype
        self.weight = nn.Parameter(torch.empty(dim, dtype=weight_dtype), requires_grad=False)

    def load(self, source: WeightSource, prefix: str) -> None:
        self.weight.copy_(source.read(f"{prefix}.weight"))

    @property
    def kernel_mode(self) -> int:
        """How csrc/row_norm.cpp applies the weight (its header)."""
        return 1 if self.gemma else 2 if self.float_weight else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., dim]
        kernel = inference_kernel(x, self.weight)
        if kernel is not None:
            rows = x.reshape(-1, x.shape[-1]).contiguous()
            out = named_for_profiler(
                PROFILER_NAME,
                lambda: kernel.rms_norm(rows, self.weight, self.eps, self.kernel_mode),
            )
            if out is not None:
                return out.view(x.shape)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.gemma:
            return (normed * (1.0 + self.weight.float())).type_as(x)
        if self.float_weight:
            return (self.weight * normed).type_as(x)
        return self.weight * normed.to(x.dtype)
