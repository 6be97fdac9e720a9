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
from dataclasses import dataclass
from pathlib import Path

import torch

from specray.actors.drafting.base import CatchesUp, Drafter, DraftProposal, DraftRequest
from specray.actors.drafting.draft_model import DraftModelDrafter
from specray.actors.drafting.head.checkpoint import load_head, resolve_head_target
from specray.actors.drafting.head.drafter import HeadDrafter
from specray.actors.drafting.hybrid import HybridDrafter
from specray.actors.drafting.ngram import NgramDrafter
from specray.actors.engine.round import DraftUpdate
from specray.actors.model.loader import load_model
from specray.actors.sampling.params import SamplingParams

DRAFTER_KINDS = ("ngram", "model", "hybrid", "head")


@dataclass(frozen=True)
class DraftWorkerSpec:
    """Which drafter a replica hosts and with what resources."""

    kind: str = "ngram"  # "ngram", "model", or "hybrid" (lookup first, then the model)
    model_dir: str | None = None  # the draft model's directory, for kind="model" | "hybrid"
    dtype: str = "float32"
    num_slots: int = 16  # requests one replica drafts for at once (draft-model KV slots)
    max_len: int = 2048
    num_threads: int = 1  # torch intra-op threads in the replica's process
    max_ngram: int = 5
    min_ngram: int = 1
    target_dir: str | None = None  # kind="head": the target it reads (default: the head's record)

    @property
    def catches_up(self) -> bool:
        """Whether its drafter keeps a cache that must see every committed
        token (all but n-gram lookup, which reads the tokens directly)."""
        return self.kind != "ngram"

    @property
    def looks_up(self) -> bool:
        """Whether its drafter can copy proposals from the context."""
        return self.kind in ("ngram", "hybrid")

    def __post_init__(self) -> None:
        if self.kind not in DRAFTER_KINDS:
            raise ValueError(f"kind must be one of {DRAFTER_KINDS}, got {self.kind!r}")
        if self.kind != "ngram" and not self.model_dir:
            raise ValueError(f"a {self.kind!r} draft replica needs model_dir")
        if self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")


def build_drafter(spec: DraftWorkerSpec) -> Drafter:
    if spec.kind == "ngram":
        return NgramDrafter(spec.max_ngram, spec.min_ngram)
    assert spec.model_dir is not None
    if spec.kind == "head":
        head_dir = Path(spec.model_dir)
        target = (
            Path(spec.target_dir) if spec.target_dir else resolve_head_target(head_dir, spec.dtype)
        )
        return HeadDrafter(load_head(head_dir, target, spec.dtype), spec.num_slots, spec.max_len)
    model = load_model(Path(spec.model_dir), spec.dtype)
    drafter = DraftModelDrafter(model, spec.num_slots, spec.max_len)
    if spec.kind == "hybrid":
        return HybridDrafter(NgramDrafter(spec.max_ngram, spec.min_ngram), drafter)
    return drafter


@dataclass(frozen=True)
class DraftWorkerStats:
    propose_calls: int
    propose_s: float  # time inside propose (updates applied and drafting), this process


class DraftWorker:
    """Hosts one drafter; tracks which requests it drafts for."""

    def __init__(self, spec: DraftWorkerSpec) -> None:
        self.spec = spec
        # The replica owns its process: its thread count is its own to set.
        torch.set_num_threads(spec.num_threads)
        self.drafter = build_drafter(spec)
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
            self.drafter.accept(
                update.request_id, update.num_accepted, update.new_token_ids, update.target_hidden
            )

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

    def stats(self, reset: bool = False) -> DraftWorkerStats:
        stats = DraftWorkerStats(self._propose_calls, self._propose_s)
        if reset:
            self._propose_calls, self._propose_s = 0, 0.0
        return stats

    def ping(self) -> int:
        """This replica's process id (alive check, and for failure tests)."""
        return os.getpid()
