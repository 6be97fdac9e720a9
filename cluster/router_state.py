"""What the router reports about itself: replicas, moves, learned costs,
where round time goes, and the outcome of a scale call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TargetReplicaState:
    replica_id: int
    requests: tuple[str, ...]
    releasing: int  # slots whose release has not been confirmed yet
    draining: bool
    shard_pids: tuple[int, ...]


@dataclass(frozen=True)
class DraftReplicaState:
    replica_id: int
    pid: int
    pinned: int  # requests the router pinned here
    tracked: int  # requests the replica itself holds state for (-1: unreachable)
    draining: bool


@dataclass(frozen=True)
class RouterState:
    waiting: int
    running: int
    targets: tuple[TargetReplicaState, ...]
    drafts: tuple[DraftReplicaState, ...]
    target_moves: int  # requests re-prefilled on another target replica
    draft_moves: int  # requests restarted on another draft replica
    draft_failures: int  # draft replicas lost
    metrics_port: int | None
    verify_costs: dict[str, Any]  # level (s) × shape (tokens -> relative cost)
    draft_costs: dict[int, float]  # deepest γ -> seconds (learned)


@dataclass
class RoundTimings:
    """Where the router's rounds spent their time, summed over rounds and lanes."""

    rounds: int = 0
    request_rounds: int = 0
    round_s: float = 0.0  # whole rounds
    propose_s: float = 0.0  # waiting for draft replicas
    verify_s: float = 0.0  # waiting for target replicas
    local_s: float = 0.0  # γ, accept, commit, stream: work the in-process engine does too


@dataclass(frozen=True)
class RouterTimings:
    """The router's phases against the replicas' own compute time.

    ``transport_s`` is what talking to actors costs: the propose and verify
    waits minus the time the replicas computed. Meaningful as a share of
    ``round_s`` with one lane and one replica of each kind (otherwise
    replicas compute concurrently and their sums exceed the wall time).
    """

    router: RoundTimings
    target_compute_s: float  # rank 0's verify time, summed over target replicas
    draft_compute_s: float  # propose time inside the draft replicas

    @property
    def transport_s(self) -> float:
        waits = self.router.propose_s + self.router.verify_s
        return waits - self.target_compute_s - self.draft_compute_s

    @property
    def overhead_fraction(self) -> float:
        return self.transport_s / self.router.round_s if self.router.round_s else 0.0


@dataclass(frozen=True)
class ScaleReport:
    targets: int
    drafts: int
    target_moves: int
    draft_moves: int
    seconds: float
