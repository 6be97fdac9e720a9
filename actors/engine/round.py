"""One propose → verify → accept → commit round for a batch of requests.

The whole speculative step, in the spirit of gpt-fast's
``speculative_decode``, written once for both transports: the in-process
engine and the router run this same function and differ only in the two
ports they pass in — :class:`Drafting` (the drafters holding the requests'
draft state) and :class:`Verifying` (the target replicas holding their KV
caches). In process the ports call a :class:`DraftWorker` and a
``LocalTarget`` directly; in the router they cross Ray to draft replicas and
tensor-parallel target groups, and deal with their failures themselves.

Rollback rides on the next call in both directions: a request's verdicts
(:class:`DraftUpdate`) go to its drafter with its next proposal, and the
target truncates its cache to ``VerifyInput.start`` before feeding. So a
round costs one message each way per replica.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from specray.actors.drafting.base import DraftProposal, DraftRequest, DraftUpdate
from specray.actors.engine.constraints import constrain_draft, constrain_output
from specray.actors.engine.lifecycle import stream_round
from specray.actors.engine.request import RequestOutput, RunningRequest
from specray.actors.engine.scheduling import GammaScheduler
from specray.actors.engine.target import AcceptedPath, VerifyInput, VerifyOutput
from specray.actors.sampling.logits import SamplingTensors, compute_probs
from specray.actors.sampling.rejection import DraftBatch, RejectionResult, rejection_sample
from specray.actors.sampling.tree_rejection import (
    TreeDraft,
    TreeRejectionResult,
    tree_rejection_sample,
)


class Drafting(Protocol):
    """The drafters a round proposes from, by replica id."""

    # Target layers whose hidden states the drafters read; () for none.
    @property
    def hidden_layers(self) -> tuple[int, ...]: ...

    async def propose(
        self, replica: int, asks: list[DraftRequest], updates: list[DraftUpdate]
    ) -> list[DraftProposal] | None:
        """Apply ``updates`` in order, then one proposal per ask. None when
        the replica failed: the port has dealt with it, and its requests
        decode target-only this round."""
        ...


class Verifying(Protocol):
    """The target replicas a round verifies on, by replica id."""

    async def verify(
        self, replica: int | None, inputs: list[VerifyInput], hidden_layers: tuple[int, ...]
    ) -> list[VerifyOutput] | None:
        """One batched forward of ``inputs`` (one per request). None when the
        replica failed: the port has dealt with it (and with the requests of
        ``inputs``), and they are left out of this round."""
        ...

    @property
    def verifies_trees(self) -> bool:
        """Whether drafts may be token trees; else each tree is cut to its
        main chain before verifying."""
        ...


@dataclass
class RoundTimes:
    """Where one round's wall time went."""

    propose_s: float = 0.0  # waiting for drafters
    verify_s: float = 0.0  # waiting for targets
    local_s: float = 0.0  # γ, the budget's cut, accept, commit, stream: the round's own work
    verified_tokens: int = 0  # tokens the targets computed
    priced_verify_s: float = 0.0  # their price in the verify cost model, before it learned


@dataclass
class RoundResult:
    """The requests a round committed tokens for, each with the chunk it
    streams (a prefill chunk commits none: it only fills the cache)."""

    requests: list[RunningRequest]
    outputs: list[RequestOutput]  # same order as ``requests``
    rejection: RejectionResult | None  # None when no request was verified
    times: RoundTimes
    # Prefix cache lookups this round, in tokens (vLLM's counters): the
    # committed tokens offered, and how many of them the targets had cached.
    prefix_queries: int = 0
    prefix_hits: int = 0


async def speculative_round(
    batch: Sequence[RunningRequest],
    drafting: Drafting | None,
    verifying: Verifying,
    scheduler: GammaScheduler,
) -> RoundResult:
    began = time.perf_counter()
    # 1. What each request feeds the target (prompts prefill in chunks within
    # the round's token budget) and drafts, by each way of drafting.
    scheduler.choose(batch)
    proposing = time.perf_counter()

    # 2. Propose: every drafter at once, each call carrying the verdicts of
    # its requests' earlier rounds. Requests with γ = 0 decode target-only.
    # A structured request's drafts end at the first token its grammar
    # forbids; a target that verifies chains only gets each tree's main chain.
    trees = verifying.verifies_trees
    proposals = await propose(batch, drafting, scheduler)
    proposed_at = time.perf_counter()
    # The budget then cuts copies to what is worth verifying.
    drafts = scheduler.trim(
        batch,
        [
            constrain_draft(r, d if trees else d.main_chain())
            for r, d in zip(batch, proposals, strict=True)
        ],
    )
    verifying_at = time.perf_counter()

    # 3. Verify: one batched forward per target replica, all at once. A
    # request whose prefill has no room this round sits it out, asking only
    # how much of its prompt the target has cached.
    hidden_layers = drafting.hidden_layers if drafting is not None else ()
    groups: dict[int | None, list[int]] = {}
    for i, run in enumerate(batch):
        if run.feed > 0 or run.peeks:
            groups.setdefault(run.target, []).append(i)
    times = RoundTimes()
    verified = await asyncio.gather(
        *(
            verify(
                verifying,
                replica,
                [batch[i] for i in idx],
                [drafts[i] for i in idx],
                hidden_layers,
                scheduler,
                times,
            )
            for replica, idx in groups.items()
        )
    )
    verified_at = time.perf_counter()
    runs: list[RunningRequest] = []
    kept: list[DraftProposal] = []
    outputs: list[VerifyOutput] = []
    queries = hits = 0
    for idx, outs in zip(groups.values(), verified, strict=True):
        for i, out in zip(idx, outs or [], strict=False):
            run = batch[i]
            if run.peeks:
                run.prefix_hint = out.prefix_hit
                continue
            if out.prefix_hit is not None:
                queries, hits = queries + len(run.tokens), hits + out.prefix_hit
                served = min(out.prefix_hit, len(run.request.prompt_ids))
                run.stats.cached_tokens = max(run.stats.cached_tokens, served)
            if run.prefilling:  # a chunk only filled the cache (or found it cached)
                run.cached_len = max(run.cached_len + run.feed, out.prefix_hit or 0)
                continue
            runs.append(run)
            kept.append(drafts[i])
            outputs.append(constrain_output(run, drafts[i], out))
    times.propose_s, times.verify_s = proposed_at - proposing, verified_at - verifying_at
    before_verify = (proposing - began) + (verifying_at - proposed_at)
    if not runs:
        times.local_s = before_verify + (time.perf_counter() - verified_at)
        return RoundResult([], [], None, times, queries, hits)

    # 4. Accept: lossless rejection sampling against the target (over
    # siblings too, where a draft is a tree).
    if any(d.is_tree for d in kept):
        tree_result = accept_tree_drafts(runs, kept, outputs)
        paths = tree_result.accepted_nodes
        rejection = RejectionResult(
            tree_result.output_token_ids, tree_result.num_accepted, tree_result.num_draft_tokens
        )
    else:
        rejection = accept_drafts(runs, kept, outputs)
        paths = [list(range(n)) for n in rejection.num_accepted]

    # 5. Commit; each drafter hears its verdicts with its next proposal, and
    # a structured request's grammar follows its committed tokens.
    updates = commit(runs, kept, outputs, rejection, paths)
    for run, draft, update in zip(runs, kept, updates, strict=True):
        scheduler.record(run, draft, update)
        if run.grammar is not None:
            run.grammar.commit(update.new_token_ids)

    # 6. Stop criteria and the chunk each request streams.
    chunks = [
        stream_round(run, new_ids)
        for run, new_ids in zip(runs, rejection.output_token_ids, strict=True)
    ]
    times.local_s = before_verify + (time.perf_counter() - verified_at)
    return RoundResult(runs, chunks, rejection, times, queries, hits)


async def propose(
    batch: Sequence[RunningRequest], drafting: Drafting | None, scheduler: GammaScheduler
) -> list[DraftProposal]:
    """One proposal per request (empty where none was asked or its drafter
    failed), from one call per drafter replica."""
    drafts = [DraftProposal([]) for _ in batch]
    by_replica: dict[int, list[int]] = {}
    for i, run in enumerate(batch):
        if run.draft.replica is not None and run.draft.most > 0:
            by_replica.setdefault(run.draft.replica, []).append(i)
    if drafting is None or not by_replica:
        return drafts

    async def one(replica: int, idx: list[int]) -> list[DraftProposal] | None:
        asks = [
            DraftRequest(
                batch[i].request_id,
                batch[i].draft.gamma,
                batch[i].draft.lookup_gamma,
                scheduler.max_batched_tokens,
                batch[i].draft.stop,
            )
            for i in idx
        ]
        updates: list[DraftUpdate] = []
        for run in batch:  # also the verdicts of requests not drafting this round
            if run.draft.replica == replica:
                updates += run.draft.updates
                run.draft.updates = []
        return await drafting.propose(replica, asks, updates)

    began = time.perf_counter()
    results = await asyncio.gather(*(one(r, idx) for r, idx in by_replica.items()))
    elapsed = time.perf_counter() - began
    for idx, result in zip(by_replica.values(), results, strict=True):
        for i, proposal in zip(idx, result or [], strict=False):
            drafts[i] = proposal.clipped(batch[i].draft.most)
    if all(result is not None for result in results):
        scheduler.observe_propose(batch, drafts, elapsed)
    return drafts


async def verify(
    verifying: Verifying,
    replica: int | None,
    group: list[RunningRequest],
    drafts: list[DraftProposal],
    hidden_layers: tuple[int, ...],
    scheduler: GammaScheduler,
    times: RoundTimes,
) -> list[VerifyOutput] | None:
    """One target replica's share of the round, its tokens and price in ``times``."""
    inputs = verify_inputs(group, drafts)
    began = time.perf_counter()
    outputs = await verifying.verify(replica, inputs, hidden_layers)
    if outputs is not None:
        num_tokens = sum(map(computed_tokens, inputs, outputs))
        if num_tokens:
            times.verified_tokens += num_tokens
            times.priced_verify_s += scheduler.costs.verify.seconds(num_tokens)
            logits = sum(item.num_logits for item in inputs)
            scheduler.observe_verify(num_tokens, time.perf_counter() - began, logits)
    return outputs


def computed_tokens(item: VerifyInput, out: VerifyOutput) -> int:
    """Tokens of ``item`` the target fed: those its prefix cache served were not."""
    served = min(max((out.prefix_hit or 0) - item.start, 0), len(item.token_ids))
    return len(item.token_ids) - served


def verify_inputs(
    running: Sequence[RunningRequest], drafts: Sequence[DraftProposal]
) -> list[VerifyInput]:
    """Per request: where its target cache is valid, the uncached committed
    tokens it feeds this round and the drafts, and logits for every draft
    plus one (none for a prefill chunk, which only fills the cache). A
    request the target holds nothing of offers its committed tokens to the
    target's prefix cache."""
    inputs = []
    for r, d in zip(running, drafts, strict=True):
        if r.peeks:
            inputs.append(
                VerifyInput(r.request_id, 0, [], 0, lookup_ids=tuple(r.tokens), peek=True)
            )
            continue
        path, r.tree_path = r.tree_path, None
        if path is not None and path.first + len(path.nodes) != r.cached_len:
            path = None  # the cache was dropped since (a move): nothing to keep
        inputs.append(
            VerifyInput(
                r.request_id,
                r.cached_len,
                r.tokens[r.cached_len : r.cached_len + r.feed] + d.token_ids,
                0 if r.prefilling else len(d) + 1,
                # A grammar masks the logits first: the argmax alone would not do.
                argmax_only=r.sampling.greedy and r.grammar is None,
                parents=tuple(d.parents) if d.is_tree and d.parents is not None else None,
                accepted=path,
                lookup_ids=tuple(r.tokens) if r.cached_len == 0 else None,
            )
        )
    return inputs


def accept_drafts(
    running: Sequence[RunningRequest],
    drafts: Sequence[DraftProposal],
    outputs: Sequence[VerifyOutput],
) -> RejectionResult:
    draft_batch = DraftBatch.from_proposals(
        [d.token_ids for d in drafts], [d.draft_probs for d in drafts]
    )
    greedy = [r.sampling.greedy for r in running]
    rows = max(len(d) for d in drafts) + 1
    if all(greedy):
        argmax = torch.zeros(len(running), rows, dtype=torch.int64)
        for i, out in enumerate(outputs):
            argmax[i, : out.num_rows] = out.greedy_ids()
        return rejection_sample(draft_batch, None, greedy, [None] * len(running), argmax)

    counts = [out.num_rows for out in outputs]
    sampling = SamplingTensors.from_params([r.sampling for r in running]).repeat_interleave(counts)
    flat_probs = compute_probs(torch.cat([out.full_logits() for out in outputs]), sampling)
    target_probs = torch.zeros(len(running), rows, flat_probs.shape[-1])
    for i, probs in enumerate(flat_probs.split(counts)):
        target_probs[i, : probs.shape[0]] = probs
    generators = [None if r.sampling.greedy else r.generator for r in running]
    return rejection_sample(draft_batch, target_probs, greedy, generators)


def accept_tree_drafts(
    running: Sequence[RunningRequest],
    drafts: Sequence[DraftProposal],
    outputs: Sequence[VerifyOutput],
) -> TreeRejectionResult:
    """Acceptance when some draft is a tree (a chain is a tree too)."""
    trees = [TreeDraft(d.token_ids, d.node_parents, d.draft_probs) for d in drafts]
    greedy = [r.sampling.greedy for r in running]
    argmax = [out.greedy_ids() if g else None for g, out in zip(greedy, outputs, strict=True)]
    target_probs: list[torch.Tensor | None] = [None] * len(running)
    for i, (r, out) in enumerate(zip(running, outputs, strict=True)):
        if not greedy[i]:
            sampling = SamplingTensors.from_params([r.sampling]).repeat_interleave([out.num_rows])
            target_probs[i] = compute_probs(out.full_logits(), sampling)
    generators = [None if g else r.generator for g, r in zip(greedy, running, strict=True)]
    return tree_rejection_sample(trees, target_probs, greedy, generators, argmax)


def commit(
    running: Sequence[RunningRequest],
    drafts: Sequence[DraftProposal],
    outputs: Sequence[VerifyOutput],
    rejection: RejectionResult,
    paths: Sequence[list[int]],  # per request, the accepted draft indices, root's child first
) -> list[DraftUpdate]:
    """Append the round's tokens. The target's cache now holds every
    committed token except the newest, which the next round feeds (a tree's
    accepted path once the next verify keeps it: ``tree_path``)."""
    updates = []
    for r, draft, out, new_ids, path in zip(
        running, drafts, outputs, rejection.output_token_ids, paths, strict=True
    ):
        accepted = len(path)
        if path != list(range(accepted)):
            r.tree_path = AcceptedPath(len(r.tokens), tuple(path))
        r.cached_len = len(r.tokens) + accepted
        r.tokens.extend(new_ids)
        r.stats.record_round(len(draft), accepted)
        # Only the accepted positions travel on, in their own storage (a view
        # would pickle every row of the verify batch into the draft's message).
        hidden = None
        if out.hidden_states is not None:
            hidden = out.hidden_states[[0, *(1 + n for n in path)]].clone()
        updates.append(DraftUpdate(r.request_id, accepted, new_ids, hidden))
    return updates
