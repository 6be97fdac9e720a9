"""One draft replica: any :class:`Drafter` in its own process, one RPC per round.

The router talks to a replica with :meth:`DraftWorker.propose`, which first
applies the verdicts of the requests' earlier rounds (their
:class:`DraftUpdate`: how many drafts survived, what was committed, hence how
far to roll back) and then drafts. Rollback rides on the next proposal, so a
round costs one message each way, as the target's verify does.

Pure torch; :mod:`specray.cluster.draft_pool` places it in a Ray actor.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from specray.actors.drafting.base import (
    CatchesUp,
    Drafter,
    DraftProposal,
    DraftRequest,
    DraftUpdate,
    RunsModels,
    SharesPrefixes,
)
from specray.actors.drafting.build import build_drafter
from specray.actors.drafting.spec import DrafterSpec
from specray.actors.sampling.params import SamplingParams
from specray.actors.workers.progress import ForwardCount


@dataclass(frozen=True)
class DraftWorkerSpec:
    """Which drafter a replica hosts and with what resources."""

    drafter: DrafterSpec = field(default_factory=lambda: DrafterSpec("ngram"))  # model resolved
    dtype: str = "float32"
    num_slots: int = 16  # requests one replica drafts for at once (draft-model KV slots)
    max_len: int = 2048
    num_threads: int = 1  # torch intra-op threads in the replica's process
    target_dir: str | None = None  # the target it drafts for (a head reads its weights)
    prefix_tokens: int = 0  # a draft model's prefix cache, in positions (0: none)
    weights: str = "dense"  # a draft model's: dense, or gguf (its blocks on the block kernel)

    def __post_init__(self) -> None:
        if self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")

    def build(self) -> Drafter:
        target = Path(self.target_dir) if self.target_dir else None
        return build_drafter(
            self.drafter,
            self.dtype,
            self.num_slots,
            self.max_len,
            target,
            self.prefix_tokens,
            self.weights,
        )


@dataclass(frozen=True)
class DraftWorkerStats:
    propose_calls: int
    propose_s: float  # time inside propose (updates applied and drafting), this process


class DraftWorker:
    """Hosts one drafter; tracks which requests it drafts for."""

    def __init__(self, source: DraftWorkerSpec | Drafter) -> None:
        """``source``: a spec to build the drafter from in this process (a
        replica, which owns its process and so sets its thread count), or a
        drafter already built (the in-process engine)."""
        if isinstance(source, DraftWorkerSpec):
            torch.set_num_threads(source.num_threads)
            source = source.build()
        self.drafter = source
        self._forwards = ForwardCount(source.models() if isinstance(source, RunsModels) else ())
        self._requests: set[str] = set()
        self._propose_calls = 0
        self._propose_s = 0.0

    def hidden_layers(self) -> tuple[int, ...]:
        """Target layers whose hidden states the drafter reads; () for none."""
        return tuple(self.drafter.hidden_layers)

    def start(self, request_id: str, token_ids: Sequence[int], sampling: SamplingParams) -> None:
        """Begin drafting for a request whose committed tokens are ``token_ids``
        (its prompt, or prompt plus output when it moves here from elsewhere)."""
        self.drafter.start(request_id, list(token_ids), sampling)
        self._requests.add(request_id)

    def propose(
        self, requests: Sequence[DraftRequest], updates: Sequence[DraftUpdate] = ()
    ) -> list[DraftProposal]:
        """Apply ``updates`` in order, then draft for ``requests``.

        ``updates`` may hold several rounds of one request (rounds in which it
        drafted nothing here) and requests not in ``requests``.
        """
        began = time.perf_counter()
        try:
            return self._propose(requests, updates)
        finally:
            self._propose_s += time.perf_counter() - began
            self._propose_calls += 1

    def _propose(
        self, requests: Sequence[DraftRequest], updates: Sequence[DraftUpdate]
    ) -> list[DraftProposal]:
        self._apply(updates)
        asks = [r for r in requests if r.most > 0]
        if not asks:
            return [DraftProposal([]) for _ in requests]
        by_id = dict(zip([a.request_id for a in asks], self.drafter.propose(asks), strict=True))
        return [by_id.get(r.request_id, DraftProposal([])).clipped(r.most) for r in requests]

    def feed_profile(self, sizes: Sequence[int]) -> list[tuple[int, float]]:
        """Seconds the drafter takes to feed each of ``sizes`` tokens; [] for
        a drafter that keeps no cache (its proposals cost the same whatever
        it fell behind)."""
        if isinstance(self.drafter, CatchesUp):
            return self.drafter.feed_profile(sizes)
        return []

    def _apply(self, updates: Sequence[DraftUpdate]) -> None:
        for update in updates:
            self.drafter.accept(update)

    def finish(self, request_ids: Sequence[str]) -> int:
        """Free every state of these requests; unknown ids are ignored.
        Returns how many were freed."""
        freed = 0
        for request_id in request_ids:
            if request_id in self._requests:
                self.drafter.finish(request_id)
                self._requests.discard(request_id)
                freed += 1
        return freed

    def num_requests(self) -> int:
        return len(self._requests)

    def prefix_pins(self) -> int:
        """Pins the drafter holds on its prefix cache's blocks (leak checks)."""
        return self.drafter.prefix_pins if isinstance(self.drafter, SharesPrefixes) else 0

    def stats(self, reset: bool = False) -> DraftWorkerStats:
        stats = DraftWorkerStats(self._propose_calls, self._propose_s)
        if reset:
            self._propose_calls, self._propose_s = 0, 0.0
        return stats

    def progress(self) -> int:
        """Leaf modules the drafter's models have run: it moves while a long
        proposal (a catch-up of many prompts under load) computes, and stops
        in a hung replica. A drafter without models never moves it: its
        proposals are lookups, held to ``timeout_s`` as before."""
        return self._forwards.count

    def ping(self) -> int:
        """This replica's process id (alive check, and for failure tests)."""
        return os.getpid()
