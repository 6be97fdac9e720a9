"""A TP group wrapper that counts collectives and the time spent in them."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from specray.actors.parallel.group import TPGroup


@dataclass
class CollectiveStats:
    """Counts and wall seconds of one rank's collectives.

    The time includes waiting for the slowest peer to arrive, so it is the
    cost of communication *and* of load imbalance between ranks.
    """

    all_reduce_calls: int = 0
    all_reduce_s: float = 0.0
    all_gather_calls: int = 0
    all_gather_s: float = 0.0


class TimedGroup:
    """Forwards to ``inner`` and times every collective."""

    def __init__(self, inner: TPGroup) -> None:
        self.inner = inner
        self.rank = inner.rank
        self.size = inner.size
        self.stats = CollectiveStats()

    def reset(self) -> CollectiveStats:
        """Return the stats so far and start counting afresh."""
        stats, self.stats = self.stats, CollectiveStats()
        return stats

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        start = self._now(tensor)
        out = self.inner.all_reduce(tensor)
        self.stats.all_reduce_s += self._now(out) - start
        self.stats.all_reduce_calls += 1
        return out

    def all_gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        start = self._now(tensor)
        out = self.inner.all_gather(tensor, dim)
        self.stats.all_gather_s += self._now(out) - start
        self.stats.all_gather_calls += 1
        return out

    @staticmethod
    def _now(tensor: torch.Tensor) -> float:
        # CUDA collectives are asynchronous: wait for them, or we time a launch.
        if tensor.is_cuda:
            torch.cuda.synchronize(tensor.device)
        return time.perf_counter()
