"""The requests a drafter tracks, each holding one slot of its cache."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, Protocol, TypeVar

from specray.actors.model.kv_cache import SlotCache


class HasSlot(Protocol):
    slot: int


StateT = TypeVar("StateT", bound=HasSlot)


class RequestSlots(Generic[StateT]):
    """Per-request drafting state by request id: starting a request allocates
    its cache slot, finishing it frees the slot (finishing twice is a no-op,
    since the engine finishes on every path out of a request)."""

    def __init__(self, cache: SlotCache, owner: str) -> None:
        self._cache = cache
        self._owner = owner  # names the drafter in errors
        self._states: dict[str, StateT] = {}

    def start(self, request_id: str, make: Callable[[int], StateT]) -> StateT:
        """Track ``request_id`` with the state ``make(slot)`` builds."""
        if request_id in self._states:
            raise ValueError(f"request {request_id!r} is already being drafted")
        state = make(self._cache.allocate())
        self._states[request_id] = state
        return state

    def __getitem__(self, request_id: str) -> StateT:
        try:
            return self._states[request_id]
        except KeyError:
            raise KeyError(f"{self._owner} has no request {request_id!r}") from None

    def finish(self, request_id: str) -> None:
        state = self._states.pop(request_id, None)
        if state is not None:
            self._cache.free(state.slot)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._states

    def __len__(self) -> int:
        return len(self._states)

    def __iter__(self) -> Iterator[str]:
        return iter(self._states)
