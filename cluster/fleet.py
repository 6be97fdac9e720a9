"""What the router's parts share: the replica pools they act on, and where
they report (metrics, and the :class:`Inbox` of losses and wake-ups)."""

from __future__ import annotations

from dataclasses import dataclass

from specray.cluster.draft_pool import DraftPool
from specray.cluster.events import Inbox
from specray.cluster.metrics import RouterMetrics
from specray.cluster.target_pool import TargetPool


@dataclass(frozen=True, eq=False)
class Fleet:
    """One router's replicas and reporting, built once at its start and
    handed to its request table, lanes, recovery and scaler."""

    targets: TargetPool
    drafts: DraftPool | None  # None: target-only decoding
    metrics: RouterMetrics
    inbox: Inbox
