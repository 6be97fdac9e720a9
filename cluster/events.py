"""What happens to the router's replicas off the round's path, as events
the lanes apply at their next round boundary.

The replica pools and :mod:`specray.cluster.recovery` never call back into
the router: they post here (a replica found dead) or just wake the lanes (a
slot freed, a replica joined, a bound passed), and a lane takes the events
at its boundary, where no round is using the requests they touch.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass(frozen=True)
class TargetLost:
    """A target replica is gone: its requests re-prefill elsewhere."""

    replica_id: int


@dataclass(frozen=True)
class DraftLost:
    """A draft replica is gone: its requests go target-only until they
    re-attach elsewhere."""

    replica_id: int


Event = TargetLost | DraftLost


class Inbox:
    """Events for the lanes, and the signal that wakes an idle lane."""

    def __init__(self) -> None:
        self._events: list[Event] = []
        self._work = asyncio.Event()

    def post(self, event: Event) -> None:
        self._events.append(event)
        self._work.set()

    def wake(self) -> None:
        """Something a lane may act on changed (a request, a slot, a replica)."""
        self._work.set()

    def take(self) -> list[Event]:
        """The events posted since the last take, oldest first."""
        events, self._events = self._events, []
        return events

    def clear(self) -> None:
        """A lane starts looking: only what happens from now on wakes it."""
        self._work.clear()

    async def wait(self) -> None:
        await self._work.wait()
