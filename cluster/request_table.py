"""The router's requests: every tracked request, the queue of those waiting
for a target slot, and the lanes (ordered sets of request ids) running them.

It is the one place a request enters (:meth:`RequestTable.submit`), streams
(:meth:`emit`) and leaves (:meth:`free`, after :meth:`cancel` or
:meth:`fail`): freeing drops it from every replica that holds state for it.
Everything here runs on the router's event loop.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections import deque
from dataclasses import replace

from specray.actors.engine.errors import DuplicateRequestError, RequestCancelledError
from specray.actors.engine.request import RequestOutput, RunningRequest
from specray.cluster.fleet import Fleet
from specray.cluster.tracked import Tracked


class RequestTable:
    def __init__(self, fleet: Fleet, num_lanes: int) -> None:
        self.tracked: dict[str, Tracked] = {}
        self.waiting: deque[str] = deque()
        self.lanes: list[dict[str, None]] = [{} for _ in range(num_lanes)]
        self._fleet = fleet

    @property
    def num_running(self) -> int:
        return sum(len(lane) for lane in self.lanes)

    def submit(self, run: RunningRequest) -> Tracked:
        """Queue a started request for a target slot."""
        if run.request_id in self.tracked:
            raise DuplicateRequestError(run.request_id)
        tracked = Tracked(run, asyncio.Queue())
        self.tracked[run.request_id] = tracked
        self.waiting.append(run.request_id)
        self.update_gauges()
        self._fleet.inbox.wake()
        return tracked

    def emit(self, tracked: Tracked, output: RequestOutput) -> None:
        """Stream one chunk; the last one frees the request."""
        now = time.perf_counter()
        stats = copy.copy(output.stats)  # later rounds keep mutating the live one
        if output.token_ids:
            if tracked.last_chunk_at is None:
                self._fleet.metrics.observe_first_token(now - stats.created_at)
            else:
                self._fleet.metrics.observe_inter_token(now - tracked.last_chunk_at)
            tracked.last_chunk_at = now
        tracked.chunks.put_nowait(replace(output, stats=stats))
        if output.finished:
            self._fleet.metrics.observe_finished(now - stats.created_at)
            self.free(tracked)

    def cancel(self, request_id: str, why: str | None = None) -> bool:
        """Cancel a request; False if it is unknown or already cancelled. One in
        a round is freed by its lane at the round's end, any other at once."""
        tracked = self.tracked.get(request_id)
        if tracked is None or tracked.cancelled:
            return False
        tracked.cancelled = True
        tracked.chunks.put_nowait(
            RequestCancelledError(why or f"request {request_id!r} was cancelled")
        )
        if tracked.lane is None:  # not in any round: free now
            self.free(tracked)
        self._fleet.inbox.wake()  # an idle lane frees it at its boundary
        return True

    def fail(self, tracked: Tracked, err: BaseException) -> None:
        tracked.chunks.put_nowait(err)
        self.free(tracked)

    def free(self, tracked: Tracked) -> None:
        """Drop a request everywhere: lane, queue, target slot and draft state."""
        request_id = tracked.request_id
        self.tracked.pop(request_id, None)
        if tracked.lane is not None:
            self.lanes[tracked.lane].pop(request_id, None)
            tracked.lane = None
        if request_id in self.waiting:
            self.waiting.remove(request_id)
        run = tracked.run
        self._fleet.targets.release(run.target, request_id, run.tokens)
        run.target = None
        if self._fleet.drafts is not None and run.draft.replica is not None:
            self._fleet.drafts.detach(run.draft.replica, [request_id], run.tokens)
        run.draft.detach()
        self.update_gauges()
        self._fleet.inbox.wake()

    def close(self, why: str) -> None:
        """Fail every request left (the router shuts down)."""
        for tracked in list(self.tracked.values()):
            tracked.chunks.put_nowait(RequestCancelledError(why))
        self.tracked.clear()
        self.waiting.clear()

    def update_gauges(self) -> None:
        self._fleet.metrics.set_queues(self.num_running, len(self.waiting))
