"""Rotary position embeddings (default, linear and Llama-3 scaling)."""

from __future__ import annotations

import math

import torch
from torch import nn

from specray.actors.model.config import RopeConfig
from specray.actors.parallel.block_kernel import inference_kernel, named_for_profiler

# What torch's profiler calls one kernel call (bench/decode_profile.py).
PROFILER_NAME = "specray::rotary"


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """``[head_dim / 2]`` float32 inverse frequencies of one rope variant."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Computes cos/sin for arbitrary per-token positions."""

    def __init__(self, rope: RopeConfig, head_dim: int) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inverse_frequencies(rope, head_dim), persistent=False)
        self.inv_freq: torch.Tensor

    def forward(
        self,
        positions: torch.Tensor,  # [tokens] or [batch, seq] int64
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.unsqueeze(-1).float() * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        # [..., 1, head_dim] so they broadcast over heads
        return angles.cos().to(dtype).unsqueeze(-2), angles.sin().to(dtype).unsqueeze(-2)


def apply_rotary(
    x: torch.Tensor,  # [..., heads, head_dim]
    cos: torch.Tensor,  # [..., 1, head_dim]
    sin: torch.Tensor,  # [..., 1, head_dim]
) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin``. On CPU, outside autograd, for a
    packed batch (``x`` 3-D), one compiled call computes it bit for bit as
    the operators below do (csrc/rotary.cpp), a decode step's seven
    operators per layer fewer."""
    kernel = inference_kernel(x, cos, sin)
    if (
        kernel is not None
        and x.dim() == 3
        and x.stride(-1) == 1
        and cos.dtype == sin.dtype == x.dtype
        and cos.shape == sin.shape == (x.shape[0], 1, x.shape[2])
        and cos.is_contiguous()
        and sin.is_contiguous()
    ):
        out = named_for_profiler(PROFILER_NAME, lambda: kernel.rotary(x, cos, sin))
        if out is not None:
            return out
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
