"""Column-, row- and QKV-parallel linear layers that own their sharded loading.

Every layer holds only its rank's slice and reads only that slice from the
checkpoint. With a ``SingleGroup`` the slices are the whole tensors and the
layers are plain linears.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from specray.actors.parallel.group import TPGroup, split_range
from specray.actors.parallel.weights import WeightSource


def _param(shape: Sequence[int], dtype: torch.dtype) -> nn.Parameter:
    # Inference only: no init work, no autograd.
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class ReplicatedLinear(nn.Module):
    """``y = x Wᵀ``, the whole weight on every rank (small projections every
    rank needs in full, such as a shared KV head)."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = _param((out_features, in_features), dtype)

    def load(self, source: WeightSource, prefix: str) -> None:
        self.weight.copy_(source.read(f"{prefix}.weight"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in_features]
        return F.linear(x, self.weight)


class ColumnParallelLinear(nn.Module):
    """``y = x Wᵀ + b`` with the output features split across ranks.

    The output stays sharded: rank r returns features
    ``[r * out/size, (r+1) * out/size)``.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool, group: TPGroup, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.group = group
        self.out_start, self.out_end = split_range(out_features, group.rank, group.size)
        self.weight = _param((self.out_end - self.out_start, in_features), dtype)
        self.bias = _param((self.out_end - self.out_start,), dtype) if bias else None

    def load(self, source: WeightSource, prefix: str) -> None:
        self.weight.copy_(source.read(f"{prefix}.weight", 0, self.out_start, self.out_end))
        if self.bias is not None:
            self.bias.copy_(source.read(f"{prefix}.bias", 0, self.out_start, self.out_end))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in_features]
        return F.linear(x, self.weight, self.bias)


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
        self.group = group
        self.ranges = [split_range(n, group.rank, group.size) for n in out_features]
        self.local_sizes = [end - start for start, end in self.ranges]
        self.weight = _param((sum(self.local_sizes), in_features), dtype)

    def load(self, source: WeightSource, prefixes: Sequence[str]) -> None:
        row = 0
        for prefix, (start, end) in zip(prefixes, self.ranges, strict=True):
            self.weight[row : row + end - start].copy_(
                source.read(f"{prefix}.weight", 0, start, end)
            )
            row += end - start

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # x: [..., in_features]
        return list(F.linear(x, self.weight).split(self.local_sizes, dim=-1))


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
        self.weight = _param((rows, hidden_size), dtype)
        self.bias = _param((rows,), dtype) if bias else None

    def load(self, source: WeightSource, prefix: str) -> None:
        """``prefix`` is the attention module, holding q_proj, k_proj, v_proj."""
        parts = (("q_proj", self.q_range), ("k_proj", self.kv_range), ("v_proj", self.kv_range))
        row = 0
        for name, (start, end) in parts:
            self.weight[row : row + end - start].copy_(
                source.read(f"{prefix}.{name}.weight", 0, start, end)
            )
            if self.bias is not None:
                self.bias[row : row + end - start].copy_(
                    source.read(f"{prefix}.{name}.bias", 0, start, end)
                )
            row += end - start

    def forward(
        self,
        x: torch.Tensor,  # [..., hidden]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        qkv = F.linear(x, self.weight, self.bias)
        q, k, v = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        return q, k, v

    def kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # x: [..., hidden]
        """Only the key and value projections: inputs that are never queries."""
        bias = None if self.bias is None else self.bias[self.q_size :]
        kv = F.linear(x, self.weight[self.q_size :], bias)
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
        self.weight = _param((out_features, self.in_end - self.in_start), dtype)
        self.bias = _param((out_features,), dtype) if bias else None

    def load(self, source: WeightSource, prefix: str) -> None:
        self.weight.copy_(source.read(f"{prefix}.weight", 1, self.in_start, self.in_end))
        if self.bias is not None:
            self.bias.copy_(source.read(f"{prefix}.bias"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in_features / size]
        out = self.group.all_reduce(F.linear(x, self.weight))
        # Bias after the reduction, or it would be added size times.
        return out if self.bias is None else out + self.bias
