"""The router's hold on one request: its running state (committed tokens,
sampling, drafting, where it is pinned) plus what only the router needs —
the queue its chunks stream through, its lane and pending moves."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from specray.actors.engine.request import RequestOutput, RunningRequest


@dataclass
class Tracked:
    """One request as the router holds it, from submission until it is freed.

    ``run.target`` is the target replica it is pinned to, ``run.draft.replica``
    the draft replica (both None while unpinned).
    """

    run: RunningRequest
    chunks: asyncio.Queue[RequestOutput | BaseException]
    lane: int | None = None
    cancelled: bool = False
    move_target: bool = False  # re-prefill on another target replica at the next boundary
    move_draft: bool = False  # restart on another draft replica at the next boundary
    last_chunk_at: float | None = None
    replays: int = 0  # rounds of it that broke their target group

    @property
    def request_id(self) -> str:
        return self.run.request_id
