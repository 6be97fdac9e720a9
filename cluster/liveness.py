"""Telling a worker that computes from one that is hung, by progress.

A fixed deadline per call cannot do both: a long prefill on a slow machine
outlasts any deadline short enough to catch a hang quickly, and the router
then gang-restarts a healthy group and replays the same prefill. Instead,
while a call's answers are pending, every ``probe_interval_s`` each pending
shard is asked how many model modules it has run (a probe that Ray serves
beside the call, not behind it). A shard is hung when it answers no probe
within the interval (a stopped or wedged process), or when its count has not
moved for ``stall_s`` (stuck, e.g. in a collective with a peer that is gone).
A shard whose count moves is computing, however long the call takes.

Draft replicas are watched the same way (:func:`await_progressing`, on the
router's event loop): a draft model's proposal that first feeds the prompts
of many new requests can take longer on two busy cores than any deadline
that still catches a hang, and a replica dropped for it restarts, loads its
model on the same cores and is sent the same catch-up again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import ray
from ray.exceptions import RayError

T = TypeVar("T")


@dataclass(frozen=True)
class Hang:
    """Why pending shards count as hung."""

    ranks: tuple[int, ...]
    detail: str


def probe_interval(stall_s: float) -> float:
    """How often a pending call's worker is probed: twice per ``stall_s``
    window (a hang is caught about as fast as a deadline caught it), at
    most every 10 s."""
    return min(stall_s / 2, 10.0)


@dataclass
class StallClock:
    """When one worker's progress count last moved."""

    stall_s: float  # no progress for this long: hung
    _seen: int | None = None
    _moved_at: float | None = None

    def stalled(self, count: int, now: float, began: float) -> bool:
        """Whether ``count``, read at ``now``, has not moved for ``stall_s``
        (``began``: when the call was sent)."""
        if self._seen != count:
            self._seen = count
            # The first answer only sets the baseline: the call may have
            # waited behind an earlier one that made the count move.
            self._moved_at = began if self._moved_at is None else now
        assert self._moved_at is not None
        return now - self._moved_at >= self.stall_s


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
    _clocks: dict[int, StallClock] = field(default_factory=dict)

    @classmethod
    def for_deadline(cls, probe: Callable[[int], Any], timeout_s: float) -> ProgressWatch:
        """A watch that catches a hang about as fast as a ``timeout_s``
        deadline did (:func:`probe_interval`)."""
        return cls(probe, stall_s=timeout_s, probe_interval_s=probe_interval(timeout_s))

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
            clock = self._clocks.setdefault(rank, StallClock(self.stall_s))
            if clock.stalled(count, now, began):
                stalled.append(rank)
        if stalled:
            return Hang(tuple(stalled), f"made no progress for {self.stall_s:g} s")
        return None


async def await_progressing(
    answer: Awaitable[T],
    probe: Callable[[], Awaitable[int]],
    stall_s: float,
    answer_s: float = 2.0,
) -> T:
    """``answer``'s result, waited for as long as ``probe()`` (the worker's
    progress count, answered beside the call) keeps moving. Raises
    :class:`StalledError` once the count has not moved for ``stall_s``, or a
    probe goes unanswered for ``answer_s`` or the interval
    (:func:`probe_interval`), as :meth:`ProgressWatch.check` judges a shard."""
    task = asyncio.ensure_future(answer)
    interval = probe_interval(stall_s)
    clock = StallClock(stall_s)
    began = time.monotonic()
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=interval)
            if done:
                return task.result()
            wait_s = max(interval, answer_s)
            try:
                count = await asyncio.wait_for(probe(), wait_s)
            except TimeoutError:
                raise StalledError(f"answered no probe within {wait_s:g} s") from None
            if clock.stalled(int(count), time.monotonic(), began):
                raise StalledError(f"made no progress for {stall_s:g} s")
    finally:
        task.cancel()


class StalledError(RuntimeError):
    """A watched call's worker stopped showing progress."""
