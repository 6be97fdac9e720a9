"""The tensor-parallel group, injected into every parallel layer.

Layers never ask torch.distributed who they are: they receive a ``TPGroup``
that knows its rank, its size and how to run the two collectives tensor
parallelism needs. ``SingleGroup`` makes the same layer code run unsharded.
"""

from __future__ import annotations

from typing import Protocol

import torch


class TPGroup(Protocol):
    """Rank, size and collectives of one tensor-parallel group."""

    @property
    def rank(self) -> int: ...

    @property
    def size(self) -> int: ...

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the group; every rank gets the result."""
        ...

    def all_gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """Concatenate every rank's equally shaped ``tensor`` along ``dim``."""
        ...


class SingleGroup:
    """A group of one: collectives are identities."""

    rank = 0
    size = 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        return tensor


def split_range(total: int, rank: int, size: int) -> tuple[int, int]:
    """``[start, end)`` of rank's equal share of ``total`` (which size divides)."""
    if total % size:
        raise ValueError(f"cannot split {total} evenly over {size} ranks")
    shard = total // size
    return rank * shard, (rank + 1) * shard
