"""Telling a shard that computes from one that is hung, by progress.

A fixed deadline per call cannot do both: a long prefill on a slow machine
outlasts any deadline short enough to catch a hang quickly, and the router
then gang-restarts a healthy group and replays the same prefill. Instead,
while a call's answers are pending, every ``probe_interval_s`` each pending
shard is asked how many model modules it has run (a probe that Ray serves
beside the call, not behind it). A shard is hung when it answers no probe
within the interval (a stopped or wedged process), or when its count has not
moved for ``stall_s`` (stuck, e.g. in a collective with a peer that is gone).
A shard whose count moves is computing, however long the call takes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayError


@dataclass(frozen=True)
class Hang:
    """Why pending shards count as hung."""

    ranks: tuple[int, ...]
    detail: str


@dataclass
class ProgressWatch:
    """Decides, probe by probe, whether a call's pending shards still count
    as alive. ``probe(rank)`` returns the ObjectRef of a shard's progress
    counter."""

    probe: Callable[[int], Any]
    stall_s: float  # no progress for this long: hung
    probe_interval_s: float
    # How long a probe may take to answer: a loaded machine delays even a
    # probe that runs beside the call, and a short deadline must not turn
    # that into a false hang.
    answer_s: float = 2.0
    _seen: dict[int, int] = field(default_factory=dict)
    _moved_at: dict[int, float] = field(default_factory=dict)

    @classmethod
    def for_deadline(cls, probe: Callable[[int], Any], timeout_s: float) -> ProgressWatch:
        """A watch that catches a hang about as fast as a ``timeout_s``
        deadline did: probes twice per window, at most every 10 s."""
        return cls(probe, stall_s=timeout_s, probe_interval_s=min(timeout_s / 2, 10.0))

    def check(self, pending: Sequence[int], began: float) -> Hang | None:
        """Probe the ``pending`` ranks once; a :class:`Hang` if any is hung.
        ``began`` is when the call was sent (progress counts from then)."""
        refs = {rank: self.probe(rank) for rank in pending}
        wait_s = max(self.probe_interval_s, self.answer_s)
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=wait_s)
        silent = tuple(sorted(rank for rank, ref in refs.items() if ref not in ready))
        if silent:
            return Hang(silent, f"answered no probe within {wait_s:g} s")
        now = time.monotonic()
        stalled = []
        for rank, ref in refs.items():
            try:
                count = int(ray.get(ref))
            except RayError as err:
                return Hang((rank,), f"failed its probe: {err}")
            if self._seen.get(rank) != count:
                self._seen[rank] = count
                # The first answer only sets the baseline: the call may have
                # waited behind an earlier one that made the count move.
                self._moved_at[rank] = now if rank in self._moved_at else began
            if now - self._moved_at[rank] >= self.stall_s:
                stalled.append(rank)
        if stalled:
            return Hang(tuple(stalled), f"made no progress for {self.stall_s:g} s")
        return None
