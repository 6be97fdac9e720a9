"""Column-, row- and QKV-parallel linear layers that own their sharded loading.

Every layer holds only its rank's slice and reads only that slice from the
checkpoint. With a ``SingleGroup`` the slices are the whole tensors and the
layers are plain linears. The slice is held by a ``LinearWeights`` whose
format (dense, int8, int4) follows what the checkpoint stores.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from specray.actors.parallel.group import TPGroup, split_range
from specray.actors.parallel.linear_weights import DenseWeights, LinearWeights
from specray.actors.parallel.span import Span
from specray.actors.parallel.weight_loading import WeightSlice, load_linear
from specray.actors.parallel.weights import WeightSource


def _param(shape: Sequence[int], dtype: torch.dtype) -> nn.Parameter:
    # Inference only: no init work, no autograd.
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class ReplicatedLinear(nn.Module):
    """``y = x Wᵀ``, the whole weight on every rank (small projections every
    rank needs in full, such as a shared KV head)."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weights: LinearWeights = DenseWeights.empty(out_features, in_features, dtype)

    def load(self, source: WeightSource, prefix: str) -> None:
        self.weights = load_linear(source, [WeightSlice(f"{prefix}.weight")], self.weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in_features]
        return self.weights(x)


class MergedReplicatedLinear(nn.Module):
    """Several projections of the same input, each whole on every rank,
    fused into one matmul: for the few rows of a decode step a GEMM's fixed
    per-call cost can outweigh reading a small weight, so one call beats
    several."""

    def __init__(self, in_features: int, out_features: Sequence[int], dtype: torch.dtype) -> None:
        super().__init__()
        self.sizes = list(out_features)
        self.weights: LinearWeights = DenseWeights.empty(sum(self.sizes), in_features, dtype)

    def load(self, source: WeightSource, prefixes: Sequence[str]) -> None:
        """``prefixes[i]`` names the tensor ``{prefix}.weight`` of part ``i``."""
        if len(prefixes) != len(self.sizes):
            raise ValueError(f"{len(self.sizes)} parts, {len(prefixes)} names: {list(prefixes)}")
        parts = [WeightSlice(f"{prefix}.weight") for prefix in prefixes]
        self.weights = load_linear(source, parts, self.weights)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # x: [..., in_features]
        return list(self.weights(x).split(self.sizes, dim=-1))


class ColumnParallelLinear(nn.Module):
    """``y = x Wᵀ + b`` with the output features split across ranks.

    The output stays sharded: rank r returns features
    ``[r * out/size, (r+1) * out/size)``.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool, group: TPGroup, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.out_start, self.out_end = split_range(out_features, group.rank, group.size)
        rows = self.out_end - self.out_start
        self.weights: LinearWeights = DenseWeights.empty(rows, in_features, dtype)
        self.bias = _param((rows,), dtype) if bias else None

    def load(self, source: WeightSource, prefix: str) -> None:
        rows = Span(0, self.out_start, self.out_end)
        self.weights = load_linear(source, [WeightSlice(f"{prefix}.weight", rows)], self.weights)
        if self.bias is not None:
            self.bias.copy_(source.read(f"{prefix}.bias", rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in_features]
        return self.weights(x, self.bias)


class MergedColumnParallelLinear(nn.Module):
    """Several column-parallel projections of the same input fused into one
    matmul (gate and up of a gated MLP). Each rank holds its slice of each."""

    def __init__(
        self,
        in_features: int,
        out_features: Sequence[int],
        group: TPGroup,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.ranges = [split_range(n, group.rank, group.size) for n in out_features]
        self.local_sizes = [end - start for start, end in self.ranges]
        self.weights: LinearWeights = DenseWeights.empty(sum(self.local_sizes), in_features, dtype)

    def load(self, source: WeightSource, prefixes: Sequence[str]) -> None:
        parts = [
            WeightSlice(f"{prefix}.weight", Span(0, start, end))
            for prefix, (start, end) in zip(prefixes, self.ranges, strict=True)
        ]
        self.weights = load_linear(source, parts, self.weights)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # x: [..., in_features]
        return list(self.weights(x).split(self.local_sizes, dim=-1))


class QKVParallelLinear(nn.Module):
    """Fused q/k/v projection with attention heads split across ranks.

    Query heads are split evenly. With fewer KV heads than ranks (GQA), each
    KV head is replicated on the ranks whose query heads read it, so every
    rank stays self-contained.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        bias: bool,
        group: TPGroup,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        size, rank = group.size, group.rank
        if num_heads % size:
            raise ValueError(f"{num_heads} attention heads cannot be split over {size} ranks")
        if num_kv_heads >= size:
            if num_kv_heads % size:
                raise ValueError(f"{num_kv_heads} KV heads cannot be split over {size} ranks")
            self.local_kv_heads = num_kv_heads // size
            kv_head_start = rank * self.local_kv_heads
        else:
            if size % num_kv_heads:
                raise ValueError(f"{size} ranks cannot share {num_kv_heads} KV heads evenly")
            self.local_kv_heads = 1
            kv_head_start = rank * num_kv_heads // size
        self.local_heads = num_heads // size
        self.head_dim = head_dim
        self.q_range = (
            rank * self.local_heads * head_dim,
            (rank + 1) * self.local_heads * head_dim,
        )
        self.kv_range = (kv_head_start * head_dim, (kv_head_start + self.local_kv_heads) * head_dim)
        self.q_size = self.local_heads * head_dim
        self.kv_size = self.local_kv_heads * head_dim
        rows = self.q_size + 2 * self.kv_size
        self.weights: LinearWeights = DenseWeights.empty(rows, hidden_size, dtype)
        self.bias = _param((rows,), dtype) if bias else None

    def load(self, source: WeightSource, prefix: str) -> None:
        """``prefix`` is the attention module, holding q_proj, k_proj, v_proj."""
        parts = (("q_proj", self.q_range), ("k_proj", self.kv_range), ("v_proj", self.kv_range))
        slices = [
            WeightSlice(f"{prefix}.{name}.weight", Span(0, start, end))
            for name, (start, end) in parts
        ]
        self.weights = load_linear(source, slices, self.weights)
        row = 0
        for name, (start, end) in parts:
            if self.bias is not None:
                self.bias[row : row + end - start].copy_(
                    source.read(f"{prefix}.{name}.bias", Span(0, start, end))
                )
            row += end - start

    def forward(
        self,
        x: torch.Tensor,  # [..., hidden]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        qkv = self.weights(x, self.bias)
        q, k, v = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        return q, k, v

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # x: [..., hidden]
        """Query and key heads side by side ``[..., local_heads + local_kv_heads,
        head_dim]`` and value heads ``[..., local_kv_heads, head_dim]``: what one
        rotary call turns, where q and k need nothing else apart."""
        qkv = self.weights(x, self.bias)
        qk, v = qkv.split((self.q_size + self.kv_size, self.kv_size), dim=-1)
        return qk.unflatten(-1, (-1, self.head_dim)), v.unflatten(-1, (-1, self.head_dim))

    def kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # x: [..., hidden]
        """Only the key and value projections: inputs that are never queries."""
        bias = None if self.bias is None else self.bias[self.q_size :]
        kv = self.weights.rows_from(x, self.q_size, bias)
        k, v = kv.split((self.kv_size, self.kv_size), dim=-1)
        return k, v


class RowParallelLinear(nn.Module):
    """``y = x Wᵀ + b`` with the input features split across ranks.

    Takes a sharded input (the output of a column-parallel layer), and sums
    the partial products over the group, so every rank gets the full output.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool, group: TPGroup, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.group = group
        self.in_start, self.in_end = split_range(in_features, group.rank, group.size)
        self.weights: LinearWeights = DenseWeights.empty(
            out_features, self.in_end - self.in_start, dtype
        )
        self.bias = _param((out_features,), dtype) if bias else None

    def load(self, source: WeightSource, prefix: str) -> None:
        part = WeightSlice(f"{prefix}.weight", Span(1, self.in_start, self.in_end))
        self.weights = load_linear(source, [part], self.weights)
        if self.bias is not None:
            self.bias.copy_(source.read(f"{prefix}.bias"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in_features / size]
        out = self.group.all_reduce(self.weights(x))
        # Bias after the reduction, or it would be added size times.
        return out if self.bias is None else out + self.bias
