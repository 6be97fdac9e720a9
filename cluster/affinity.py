"""Prefix affinity: which target replica most likely holds a request's prefix.

Each target replica keeps its own prefix cache, so a chat's next turn is
cheapest where its previous turns ran. The router cannot see those caches;
it remembers instead, per replica, the chained hashes of the full blocks of
every token sequence it sent there (prompts when admitted, whole
conversations when released), most recent last and bounded to about as
many blocks as the replica's cache holds. A request's affinity to a replica
is how many of its leading blocks that memory has.

The hashes only steer placement: a collision or a block the replica has
since evicted costs a cache miss, never a wrong token (the replica's own
cache compares tokens). Hashing is Python's tuple hash within the router's
process: about a microsecond per block.

Draft replicas are placed the same way: a suffix drafter's global cache
holds the outputs of the requests it drafted for, and a draft model's
prefix cache their prompts, so a conversation's next turn drafts best on
the replica that drafted its previous ones.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol, TypeVar


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """One hash per full block, each chained to every block before it."""
    hashes: list[int] = []
    previous = 0
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        previous = hash((previous, tuple(token_ids[start : start + block_size])))
        hashes.append(previous)
    return hashes


class PrefixAffinity:
    """The block prefixes one replica was sent, least recently sent first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity  # blocks remembered
        self._seen: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def record(self, hashes: Sequence[int]) -> None:
        for key in hashes:
            self._seen[key] = None
            self._seen.move_to_end(key)
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)

    def match(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of ``hashes`` this replica was sent."""
        count = 0
        for key in hashes:
            if key not in self._seen:
                break
            count += 1
        return count


class Placeable(Protocol):
    """A replica as placement sees it."""

    @property
    def replica_id(self) -> int: ...

    @property
    def affinity(self) -> PrefixAffinity: ...

    @property
    def load(self) -> int: ...


ReplicaT = TypeVar("ReplicaT", bound=Placeable)


def place(room: Sequence[ReplicaT], hashes: Sequence[int], slack: int) -> ReplicaT | None:
    """Among the replicas of ``room`` (each with a free slot) at most
    ``slack`` requests above the least loaded, the one that was sent the
    most leading blocks of ``hashes``, else the least loaded. The bound
    keeps a hot shared prefix (a system prompt) from piling every request
    onto one replica. It counts the requests a replica runs, not slots
    still being released: those carry no work, and counting them sent a
    chat's next turn away from its cache whenever it arrived before the
    previous turn's release was confirmed."""
    if not room:
        return None
    near = min(r.load for r in room) + slack

    def rank(r: ReplicaT) -> tuple[int, int, int]:
        matched = r.affinity.match(hashes) if hashes and r.load <= near else 0
        return (-matched, r.load, r.replica_id)

    return min(room, key=rank)
