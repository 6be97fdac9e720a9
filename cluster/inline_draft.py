"""A draft replica in the router's own process, for drafters that only look up.

An n-gram or suffix drafter spends 0.2-1.5 ms a round looking up copies,
while the Ray call to a replica around it took 7.5-15.2 ms a round through
the router on two busy cores (docs/router.md, "Where a served round's time
goes"). Placed with the router, the same :class:`DraftWorker` answers in
the router's event loop and the round waits for its lookup alone.

:class:`InlineDraftHandle` has the surface :class:`DraftPool` uses of an
actor handle: ``handle.method.remote(*args)`` runs the method at once, in
call order (as an actor runs its caller's calls), and returns an awaitable
of its outcome; a method that raises comes back as :class:`InlineDraftError`,
which the pool treats as a replica that failed. So the pool's pinning,
placement, scaling and failure handling are the same for both placements.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

from specray.actors.drafting.spec import PURE_LOOKUP_KINDS
from specray.actors.workers.draft_worker import DraftWorker, DraftWorkerSpec


def check_inline(kind: str) -> None:
    """Only a drafter that looks up and nothing else (no model, no hidden
    states, no threads of its own) may run in the router's process."""
    if kind not in PURE_LOOKUP_KINDS:
        raise ValueError(
            f"placement 'router' is for drafters that only look up "
            f"({', '.join(PURE_LOOKUP_KINDS)}); kind {kind!r} runs a model: use 'actor'"
        )


class InlineDraftError(RuntimeError):
    """A method of an in-process draft replica raised."""


class InlineDraftHandle:
    """A :class:`DraftWorker` built in this process, called like an actor."""

    def __init__(self, spec: DraftWorkerSpec) -> None:
        # Built here rather than from the spec: a replica's spec sets its
        # process's torch threads, and this process is the router's.
        self.worker = DraftWorker(spec.build())
        self.pid = os.getpid()

    def __getattr__(self, name: str) -> _InlineMethod:
        if name == "ping":
            return _InlineMethod(lambda: self.pid)
        return _InlineMethod(getattr(self.worker, name))


class _InlineMethod:
    def __init__(self, method: Callable[..., Any]) -> None:
        self._method = method

    def remote(self, *args: Any) -> asyncio.Future[Any]:
        outcome: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        try:
            outcome.set_result(self._method(*args))
        except Exception as err:  # the pool fails the replica, as for an actor's task
            outcome.set_exception(InlineDraftError(f"{type(err).__name__}: {err}"))
        return outcome
