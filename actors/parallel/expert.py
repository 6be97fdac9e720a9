"""Which share of a mixture-of-experts layer a rank holds, and where the
shares meet.

A target group of ``tp × ep`` ranks is a grid of ``ep`` rows of ``tp``
ranks (rank ``r`` sits in row ``r // tp``, column ``r % tp``; see
:class:`ShardGrid`). Attention, the embedding and the head are
tensor-parallel along a row and repeated in every row. The routed experts
are split both ways: row ``e`` owns experts ``[e·E/ep, (e+1)·E/ep)``
(expert parallelism), and column ``t`` holds columns ``[t·I/tp, (t+1)·I/tp)``
of each owned expert's intermediate dim (tensor parallelism, as
transformers' V4 plan slices ``gate_up_proj`` by columns and ``down_proj``
by rows). The shared expert's intermediate dim is split over all
``tp × ep`` ranks.

Every rank holds the same tokens (the attention before the MoE leaves them
replicated), so dispatch moves nothing: each rank runs its experts on the
tokens routed to them. Combine is one all-reduce over the whole group of
the routed and shared partial outputs. That costs one collective per MoE
layer, the same as the shared expert's alone under plain TP, where an
all-to-all dispatch would cost two and only pays when ranks hold different
tokens (data-parallel attention, which a group that runs one batch has not).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specray.actors.parallel.group import TPGroup, split_range


@dataclass(frozen=True)
class ShardGrid:
    """The ``ep`` rows × ``tp`` columns of a target group, and where a rank sits."""

    tp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        if self.tp < 1 or self.ep < 1:
            raise ValueError(f"tp and ep must be >= 1, got tp={self.tp}, ep={self.ep}")

    @property
    def size(self) -> int:
        return self.tp * self.ep

    def row(self, rank: int) -> int:
        """The rank's expert-parallel index."""
        return rank // self.tp

    def column(self, rank: int) -> int:
        """The rank's tensor-parallel index."""
        return rank % self.tp

    def row_ranks(self, row: int) -> list[int]:
        """The ranks of one tensor-parallel group."""
        return [row * self.tp + column for column in range(self.tp)]


@dataclass(frozen=True)
class ExpertShard:
    """One rank's share of every MoE layer, and the group the shares sum over."""

    combine: TPGroup  # every rank of the target group
    ep_rank: int = 0
    ep_size: int = 1
    tp_rank: int = 0
    tp_size: int = 1

    @classmethod
    def tensor_parallel(cls, group: TPGroup) -> ExpertShard:
        """Plain TP: every rank holds every expert, a column slice of each."""
        return cls(group, 0, 1, group.rank, group.size)

    @classmethod
    def on_grid(cls, grid: ShardGrid, rank: int, combine: TPGroup) -> ExpertShard:
        return cls(combine, grid.row(rank), grid.ep, grid.column(rank), grid.tp)

    def owned_experts(self, num_experts: int) -> tuple[int, int]:
        """``[first, last)`` global expert ids this rank runs."""
        if num_experts % self.ep_size:
            raise ValueError(f"{num_experts} routed experts cannot be split over ep={self.ep_size}")
        return split_range(num_experts, self.ep_rank, self.ep_size)

    def expert_columns(self, intermediate: int) -> tuple[int, int]:
        """``[start, end)`` of each owned expert's intermediate dim."""
        if intermediate % self.tp_size:
            raise ValueError(
                f"an expert's intermediate size {intermediate} cannot be split over "
                f"tp={self.tp_size}"
            )
        return split_range(intermediate, self.tp_rank, self.tp_size)

    @property
    def partial(self) -> PartialSum:
        """The combine group's shape for layers whose sums the MoE does itself."""
        return PartialSum(self.combine.rank, self.combine.size)


@dataclass(frozen=True)
class PartialSum:
    """A :class:`TPGroup` view that leaves its all-reduce to the caller.

    A row-parallel layer built on it returns this rank's partial product,
    which the MoE adds to the routed experts' before one all-reduce of both.
    """

    rank: int
    size: int

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        raise NotImplementedError("a partial-sum view gathers nothing")
