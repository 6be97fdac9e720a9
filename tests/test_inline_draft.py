"""Lookup drafters placed in the router's process: the same pool, pinning and
failure handling as a replica in its own actor, with no Ray call a round.
These run the pool on a plain event loop (no Ray: an inline replica needs
none); the routers of tests/test_router.py run n-gram this way, and
tests/test_recovery.py kills an n-gram replica placed in an actor."""

from __future__ import annotations

import asyncio
import os

import pytest
from pydantic import ValidationError

from specray.actors.drafting.base import DraftProposal, DraftRequest, DraftUpdate
from specray.actors.drafting.spec import DrafterSpec
from specray.actors.sampling.params import SamplingParams
from specray.actors.workers.draft_worker import DraftWorker, DraftWorkerSpec
from specray.cluster.draft_pool import DraftPool, DraftPoolConfig, DraftReplicaError
from specray.cluster.inline_draft import InlineDraftHandle
from specray.deploy.config import DrafterConfig

REPEAT = [5, 6, 7, 8, 9, 10, 11, 5, 6, 7]  # "5 6 7" seen before: copy what followed


def _inline_pool(kind: str = "ngram") -> DraftPool:
    spec = DraftWorkerSpec(drafter=DrafterSpec(kind, max_ngram=3), num_slots=4)
    return DraftPool(DraftPoolConfig(spec, placement="router"))


def test_an_inline_replica_drafts_what_the_worker_itself_drafts() -> None:
    """Starts, verdicts and proposals reach the worker in call order, as an
    actor runs its caller's calls; the replica reports the router's pid."""
    spec = DraftWorkerSpec(drafter=DrafterSpec("ngram", max_ngram=3), num_slots=4)
    direct = DraftWorker(spec.build())
    direct.start("a", REPEAT, SamplingParams())
    update = DraftUpdate("a", 2, [8, 9, 10])
    asks = [DraftRequest("a", 4, 4)]
    first_direct = direct.propose(asks)
    second_direct = direct.propose(asks, [update])

    async def scenario() -> tuple[list[DraftProposal], list[DraftProposal], int]:
        pool = _inline_pool()
        [replica_id] = await pool.add(1)
        replica = pool.replicas[replica_id]
        pool.attach(replica, "a", REPEAT, SamplingParams())
        first = await pool.propose(replica_id, asks, [])
        second = await pool.propose(replica_id, asks, [update])
        state = await pool.describe()
        assert [(d.placement, d.tracked) for d in state] == [("router", 1)]
        pool.detach(replica_id, ["a"])
        assert (await pool.num_requests()) == {replica_id: 0}
        return first, second, state[0].pid

    first, second, pid = asyncio.run(scenario())
    assert first[0].token_ids == first_direct[0].token_ids == [8, 9, 10, 11]
    assert second[0].token_ids == second_direct[0].token_ids
    assert pid == os.getpid()


def test_a_drafter_that_raises_fails_its_replica_not_the_router() -> None:
    """The pool drops the replica and the round hears a DraftReplicaError
    ("failed"), as for an actor whose task raised; the caller re-attaches
    its requests elsewhere."""

    def broken(asks: object) -> list[DraftProposal]:
        raise IndexError("a lookup bug")

    async def scenario() -> DraftReplicaError:
        pool = _inline_pool("suffix")
        [replica_id] = await pool.add(1)
        handle = pool.replicas[replica_id].handle
        assert isinstance(handle, InlineDraftHandle)
        pool.attach(pool.replicas[replica_id], "a", REPEAT, SamplingParams())
        handle.worker.drafter.propose = broken  # type: ignore[method-assign]
        with pytest.raises(DraftReplicaError) as caught:
            await pool.propose(replica_id, [DraftRequest("a", 4, 4)], [])
        assert replica_id not in pool.replicas
        [again] = await pool.add(1)  # a replacement, where the request re-attaches
        pool.attach(pool.replicas[again], "a", REPEAT, SamplingParams())
        [proposal] = await pool.propose(again, [DraftRequest("a", 4, 4)], [])
        assert proposal.main_chain().token_ids[:2] == [8, 9]
        return caught.value

    error = asyncio.run(scenario())
    assert error.reason == "failed" and "IndexError: a lookup bug" in str(error)


def test_only_lookup_drafters_are_placed_with_the_router() -> None:
    assert DrafterConfig(kind="ngram").placed == "router"
    assert DrafterConfig(kind="suffix").placed == "router"
    assert DrafterConfig(kind="suffix", placement="actor").placed == "actor"
    assert DrafterConfig(kind="hybrid", model="m").placed == "actor"
    assert DrafterConfig(kind="model", model="m").placed == "actor"
    with pytest.raises(ValidationError, match="placement 'router' is for drafters that only"):
        DrafterConfig(kind="model", model="m", placement="router")
    spec = DraftWorkerSpec(drafter=DrafterSpec("hybrid", "m"))
    with pytest.raises(ValueError, match="kind 'hybrid' runs a model"):
        DraftPoolConfig(spec, placement="router")
    with pytest.raises(ValueError, match="placement must be one of"):
        DraftPoolConfig(spec, placement="elsewhere")  # type: ignore[arg-type]
