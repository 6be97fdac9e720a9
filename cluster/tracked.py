"""The router's state of one request: its running state (committed tokens,
sampling, stop checker, stats), where it is pinned, and what it still owes
its draft replica."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from specray.actors.engine.gamma import SurvivalEstimate
from specray.actors.engine.request import RequestOutput, RunningRequest
from specray.actors.engine.round import DraftUpdate


@dataclass
class Tracked:
    """One request as the router holds it, from submission until it is freed."""

    run: RunningRequest
    chunks: asyncio.Queue[RequestOutput | BaseException]
    lane: int | None = None
    target: int | None = None  # target replica it is pinned to
    draft: int | None = None  # draft replica it is pinned to
    updates: list[DraftUpdate] = field(default_factory=list)  # not yet sent to the draft
    # committed tokens its draft replica has not fed (its next proposal's first step)
    draft_backlog: int = 0
    lookup_gamma: int = 0  # copies asked for this round (a model's drafts: run.gamma)
    # per-token acceptance of each way of drafting (a hybrid has both)
    lookup_acceptance: SurvivalEstimate = field(default_factory=SurvivalEstimate)
    model_acceptance: SurvivalEstimate = field(default_factory=SurvivalEstimate)
    cancelled: bool = False
    move_target: bool = False
    move_draft: bool = False
    last_chunk_at: float | None = None
    replays: int = 0  # rounds of it that broke their target group

    @property
    def request_id(self) -> str:
        return self.run.request_id

    @property
    def wants_draft(self) -> bool:
        return self.run.request.num_speculative_tokens != 0 and self.run.max_gamma > 0
