"""What the router reports about itself: replicas, moves, learned costs,
failures and restarts, where round time goes, the per-request state every
actor holds, and the outcome of a scale call."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
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
    placement: str = "actor"  # "router": in the router's process (``pid`` is the router's)


@dataclass(frozen=True)
class RecoveryState:
    """Replicas lost and started in their place since the router started."""

    draft_failures: int = 0
    target_failures: int = 0
    draft_restarts: int = 0
    target_restarts: int = 0  # whole TP groups (gang restarts)
    failed_restarts: int = 0  # attempts that failed (each retried after a backoff)
    fallbacks: int = 0  # requests that lost their draft replica mid-request
    # Seconds each replacement took to start, oldest first (the last 32).
    draft_restart_s: tuple[float, ...] = ()
    target_restart_s: tuple[float, ...] = ()
    outage_s: float | None = None  # how long no target replica has been up; None: one is


@dataclass(frozen=True)
class RouterHealth:
    """The cheap liveness summary the front door polls (no replica is called)."""

    targets_up: int  # live target replicas: 0 means nothing can be served now
    targets_starting: int
    drafts_up: int
    outage_s: float | None

    @property
    def serving(self) -> bool:
        return self.targets_up > 0


@dataclass(frozen=True)
class Footprint:
    """Per-request state on every actor, each as the actor itself reports it
    (leak checks: all of it returns to zero once the router is idle)."""

    router_requests: int  # requests the router tracks (queued, running, cancelled)
    target_slots: dict[int, tuple[int, ...]]  # replica -> KV slots in use, per shard
    draft_requests: dict[int, int]  # replica -> requests it holds draft state for
    # Pins requests hold on prefix-cache blocks (the cached blocks themselves
    # stay: they are the cache, not per-request state).
    target_prefix_pins: dict[int, tuple[int, ...]] = field(default_factory=dict)  # per shard
    draft_prefix_pins: dict[int, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        slots = sum(sum(per_shard) for per_shard in self.target_slots.values())
        pins = sum(sum(per_shard) for per_shard in self.target_prefix_pins.values())
        pins += sum(self.draft_prefix_pins.values())
        return self.router_requests + slots + sum(self.draft_requests.values()) + pins


@dataclass(frozen=True)
class StartupProfile:
    """The cost curves' shapes as timed when the router started."""

    verify_sizes: tuple[int, ...]  # tokens one verify was timed at
    verify_s: float
    draft_s: float  # the first draft replica's feeds (0: none, or a lookup)


@dataclass(frozen=True)
class StartupTimes:
    """Where a router's start went, in seconds: its replicas started and
    loaded side by side, then the profiles one after the other."""

    replicas_s: float
    profile: StartupProfile
    total_s: float

    def describe(self) -> str:
        profile = self.profile
        largest = max(profile.verify_sizes, default=0)
        return (
            f"{self.total_s:.1f} s: replicas started and loaded {self.replicas_s:.1f} s, "
            f"verify cost profiled {profile.verify_s:.1f} s "
            f"({len(profile.verify_sizes)} sizes up to {largest} tokens), "
            f"draft cost profiled {profile.draft_s:.1f} s"
        )


def describe_weights(weights: Mapping[str, str]) -> str:
    """:attr:`RouterState.weights` in one phrase: ``target gguf (bfloat16), ...``."""
    return ", ".join(f"{role} {what}" for role, what in weights.items())


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
    draft_costs: dict[str, Any]  # level (s) × shape (tokens fed in a step -> relative cost)
    recovery: RecoveryState = field(default_factory=RecoveryState)
    copy_estimates: dict[str, Any] = field(default_factory=dict)  # VerifyBudget.describe()
    startup: StartupTimes | None = None  # None: a state not read from a started router
    # What the replicas were told to load, e.g. {"target": "gguf (bfloat16)"}:
    # a start-up probe chooses it, so a slow server shows here whether it ran
    # on the format planned. "draft" only where the drafter has a model.
    weights: dict[str, str] = field(default_factory=dict)


@dataclass
class SizeTimings:
    """The rounds of one verified size (:attr:`RoundTimings.by_verified`)."""

    rounds: int = 0
    priced_s: float = 0.0
    wait_s: float = 0.0


@dataclass
class RoundTimings:
    """Where the router's rounds spent their time, summed over rounds and lanes."""

    rounds: int = 0
    request_rounds: int = 0
    round_s: float = 0.0  # whole rounds
    propose_s: float = 0.0  # waiting for draft replicas
    verify_s: float = 0.0  # waiting for target replicas
    # γ, the budget's cut, accept, commit, stream: work the in-process engine does too
    local_s: float = 0.0
    # By the tokens a round's targets computed: its rounds, their price and
    # their wait for the targets. Whether the budget priced a round's extra
    # tokens right shows here, where an average over sizes cannot show it.
    by_verified: dict[int, SizeTimings] = field(default_factory=dict)

    @property
    def verified_tokens(self) -> int:
        """Tokens the targets computed."""
        return sum(tokens * size.rounds for tokens, size in self.by_verified.items())

    @property
    def priced_verify_s(self) -> float:
        """What the verify cost model priced those forwards at."""
        return sum(size.priced_s for size in self.by_verified.values())

    def add_verify(self, tokens: int, priced_s: float, wait_s: float) -> None:
        size = self.by_verified.setdefault(tokens, SizeTimings())
        size.rounds += 1
        size.priced_s += priced_s
        size.wait_s += wait_s


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
