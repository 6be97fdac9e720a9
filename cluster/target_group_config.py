"""What a target replica is: its model, its grid of shards (tp × ep), and
how Ray places and runs them."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from specray.actors.workers.shard_model import ShardModel

STRATEGIES = ("STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD")


@dataclass(frozen=True)
class ShardedTargetConfig:
    model: ShardModel  # what every rank loads
    tp: int = 1
    ep: int = 1  # expert-parallel rows of tp ranks each: the group has tp × ep shards
    strategy: str = "STRICT_PACK"
    threads_per_shard: int | None = None  # default: this machine's cores / shards
    cpus_per_shard: float | None = None  # Ray CPUs per bundle; default threads_per_shard
    gpus_per_shard: float = 0.0  # > 0: shards run on CUDA and talk over NCCL
    # Extra Ray resources of each rank's bundle, e.g. ({"node_a": 1}, {"node_b": 1})
    # to pin rank r to the node that offers the r-th resource.
    bundle_resources: Sequence[Mapping[str, float]] = ()
    # A shard that answers no progress probe, or runs no decoder layer, for
    # this long is hung (a computing one is never cut off); also the bound on
    # every collective.
    timeout_s: float = 60.0
    start_timeout_s: float = 300.0  # placement, process start, rendezvous, loading
    time_collectives: bool = False

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ValueError(f"tp must be >= 1, got {self.tp}")
        if self.ep < 1:
            raise ValueError(f"ep must be >= 1, got {self.ep}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.bundle_resources and len(self.bundle_resources) != self.shards:
            raise ValueError(f"bundle_resources needs one mapping per shard ({self.shards})")

    @property
    def shards(self) -> int:
        """Ranks in the group: tp × ep."""
        return self.tp * self.ep

    @property
    def threads(self) -> int:
        if self.threads_per_shard is not None:
            return self.threads_per_shard
        return max(1, (os.cpu_count() or 1) // self.shards)
