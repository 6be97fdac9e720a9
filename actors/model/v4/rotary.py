"""Partial, interleaved rotary embeddings with optional YaRN.

V4 rotates only the last ``dim`` channels of a head (the rest carry no
position) and pairs *adjacent* channels ``(2i, 2i + 1)`` with frequency
``θ_i``, unlike the half-split pairing of :mod:`specray.actors.model.rotary`.
Compressed layers use a larger base with YaRN interpolation; V4 does not
scale cos / sin by YaRN's attention factor.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from specray.actors.model.config import RopeConfig
from specray.actors.model.rotary import inverse_frequencies
from specray.actors.model.v4.params import PartialRope, YarnParams


def _yarn(dim: int, theta: float, yarn: YarnParams) -> torch.Tensor:
    """Blend interpolated (``/ factor``) and original frequencies: the fast
    ones (many rotations over the original context) keep their value, the
    slow ones are interpolated, with a linear ramp in between."""

    def correction_dim(rotations: float) -> float:
        length = yarn.original_max_position_embeddings
        return dim * math.log(length / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate
    divisors = theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    return 1.0 / (yarn.factor * divisors) * (1 - keep) + 1.0 / divisors * keep


class PartialRotary(nn.Module):
    """cos / sin of one :class:`PartialRope` at arbitrary positions."""

    def __init__(self, rope: PartialRope) -> None:
        super().__init__()
        if rope.yarn is None:
            inv_freq = inverse_frequencies(RopeConfig(theta=rope.theta), rope.dim)
        else:
            inv_freq = _yarn(rope.dim, rope.theta, rope.yarn)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.inv_freq: torch.Tensor

    def forward(
        self,
        positions: torch.Tensor,  # [n] int64
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # cos, sin: [n, dim / 2] in dtype
        angles = positions.unsqueeze(-1).float() * self.inv_freq
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_partial_rope(
    x: torch.Tensor,  # [n, ..., head_dim]
    cos: torch.Tensor,  # [n, rope_dim / 2]
    sin: torch.Tensor,  # [n, rope_dim / 2]; pass -sin to undo a rotation
) -> torch.Tensor:
    """Rotate the last ``rope_dim`` channels of ``x`` by pairs, in float32."""
    while cos.dim() < x.dim():  # broadcast over the middle (head) dims
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    half = cos.shape[-1]
    nope, rope = x[..., : -2 * half], x[..., -2 * half :].float()
    even, odd = rope[..., 0::2], rope[..., 1::2]
    cos, sin = cos.float(), sin.float()
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1)
    return torch.cat((nope, rotated.flatten(-2).to(x.dtype)), dim=-1)
