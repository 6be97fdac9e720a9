"""Manifold-constrained hyper-connections: the residual as ``n`` streams.

Each token carries ``n`` residual streams ``[n, hidden]``. Before a block, a
learned projection of the (normalised, flattened) streams gives three
weightings: ``pre`` collapses the streams into the block's input, ``post``
spreads the block's output back over the streams, and ``comb`` (``n x n``,
made doubly stochastic by Sinkhorn-Knopp iterations) mixes the old streams
into the new ones::

    new_stream[k] = post[k] * block(Σ_j pre[j] stream[j]) + Σ_j comb[j, k] stream[j]

The hyper head collapses the streams one last time before the final norm.
All weightings are computed in float32 from float32 parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from specray.actors.model.v4.params import HyperConnectionConfig
from specray.actors.model.v4.sinkhorn import sinkhorn_
from specray.actors.parallel.weights import WeightSource


def unweighted_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / rms(x)`` over the last dim, the factor computed in float32."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=torch.float32), requires_grad=False)


class _StreamWeights(nn.Module):
    """Weightings of the streams from a learned projection of their
    normalised, flattened values: ``fn`` and ``base`` give ``width``
    weightings, in ``scales`` groups with a ``scale`` each."""

    def __init__(
        self,
        config: HyperConnectionConfig,
        hidden_size: int,
        norm_eps: float,
        width: int,
        scales: int,
    ) -> None:
        super().__init__()
        n = config.streams
        self.streams = n
        self.eps = config.eps
        self.norm_eps = norm_eps
        self.fn = _param(width, n * hidden_size)
        self.base = _param(width)
        self.scale = _param(scales)

    def load(self, source: WeightSource, prefix: str) -> None:
        """``prefix`` names the tensors ``{prefix}fn``, ``base``, ``scale``."""
        for name in ("fn", "base", "scale"):
            getattr(self, name).copy_(source.read(f"{prefix}{name}"))

    def _project(self, streams: torch.Tensor) -> torch.Tensor:
        """[tokens, width] f32 from the streams [tokens, n, hidden]."""
        flat = unweighted_rms_norm(streams.flatten(1).float(), self.norm_eps)
        return F.linear(flat, self.fn)


def _collapse(
    pre: torch.Tensor,  # [tokens, n] f32
    streams: torch.Tensor,  # [tokens, n, hidden]
) -> torch.Tensor:  # [tokens, hidden] in the streams' dtype
    return (pre.unsqueeze(-1) * streams).sum(dim=1).to(streams.dtype)


class HyperConnection(_StreamWeights):
    """The ``pre`` / ``post`` / ``comb`` weightings around one block."""

    def __init__(self, config: HyperConnectionConfig, hidden_size: int, norm_eps: float) -> None:
        n = config.streams
        super().__init__(config, hidden_size, norm_eps, (2 + n) * n, 3)
        self.sinkhorn_iters = config.sinkhorn_iters

    def load(self, source: WeightSource, prefix: str) -> None:
        """``prefix`` names the tensors ``{prefix}_fn``, ``_base``, ``_scale``."""
        super().load(source, f"{prefix}_")

    def forward(
        self,
        streams: torch.Tensor,  # [tokens, n, hidden]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``post`` [tokens, n] f32, ``comb`` [tokens, n, n] f32 and the
        collapsed block input [tokens, hidden] in the streams' dtype."""
        n = self.streams
        mixes = self._project(streams)
        pre_w, post_w, comb_w = mixes.split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base.split([n, n, n * n])
        pre_scale, post_scale, comb_scale = self.scale.unbind(0)
        pre = torch.sigmoid(pre_w * pre_scale + pre_b) + self.eps
        post = 2 * torch.sigmoid(post_w * post_scale + post_b)
        comb = comb_w.view(-1, n, n) * comb_scale + comb_b.view(n, n)
        comb = sinkhorn_(torch.softmax(comb, dim=-1).add_(self.eps), self.sinkhorn_iters, self.eps)
        return post, comb, _collapse(pre, streams)


def merge_streams(
    streams: torch.Tensor,  # [tokens, n, hidden]: the block's input streams
    block_out: torch.Tensor,  # [tokens, hidden]
    post: torch.Tensor,  # [tokens, n] f32
    comb: torch.Tensor,  # [tokens, n, n] f32
) -> torch.Tensor:  # [tokens, n, hidden]
    """``post ⊗ block_out + combᵀ · streams`` in float32, rounded once to the
    streams' dtype. transformers rounds ``post``, ``comb`` and both terms to
    bf16 first; float32 is closer to the exact sum, and a 4 x 4 matmul in
    float32 is a fraction of the cost of oneDNN's bf16 one."""
    mixed = torch.matmul(comb.transpose(-1, -2), streams.float())
    mixed.add_(post.unsqueeze(-1) * block_out.float().unsqueeze(-2))
    return mixed.to(streams.dtype)


class HyperHead(_StreamWeights):
    """Collapses the streams into one hidden state before the final norm."""

    def __init__(self, config: HyperConnectionConfig, hidden_size: int, norm_eps: float) -> None:
        super().__init__(config, hidden_size, norm_eps, config.streams, 1)

    def forward(self, streams: torch.Tensor) -> torch.Tensor:  # [tokens, n, hidden]
        pre = torch.sigmoid(self._project(streams) * self.scale + self.base) + self.eps
        return _collapse(pre, streams)
