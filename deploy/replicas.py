"""What a backend that can be scaled reports, for the Admin service
(``specray scale``): how many draft and target replicas run now."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

# More replicas than this in one request is a typo, not a plan.
MAX_REPLICAS = 256


@dataclass(frozen=True)
class ReplicaState:
    backend: str  # "router" | "engine"
    drafts: int  # draft replicas taking requests (draining ones left out)
    targets: int  # target replicas taking requests, each a TP group
    tensor_parallel_size: int  # shards per target replica (per row of experts)
    running: int  # requests in a batch now
    waiting: int  # requests queued for a target slot
    target_moves: int = 0  # requests re-prefilled on another target replica, ever
    draft_moves: int = 0  # requests restarted on another draft replica, ever
    expert_parallel_size: int = 1  # rows of experts per target replica


@runtime_checkable
class Scalable(Protocol):
    """A backend the Admin service can report on and rescale."""

    async def replicas(self) -> ReplicaState: ...

    async def scale(self, drafts: int, targets: int) -> None: ...


@runtime_checkable
class Diagnosable(Protocol):
    """A backend that can say what its speculation decisions rest on."""

    async def diagnostics(self, reset_rounds: bool = False) -> dict[str, Any]:
        """JSON-ready: cost models, shared copy estimates, rounds by size."""
        ...
