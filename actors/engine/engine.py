"""A single-process speculative decoding engine with continuous batching.

Requests join and leave between rounds. Each :meth:`SpecEngine.step` admits
waiting requests while KV slots are free, runs one speculative round over
every running request (one batched target forward) and returns what each
request streamed this round. The round is :func:`speculative_round`, the
same function the router runs; here its ports call a :class:`DraftWorker`
and the target in this process.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from specray.actors.drafting.base import (
    Drafter,
    DraftPaths,
    DraftProposal,
    DraftRequest,
    DraftUpdate,
)
from specray.actors.engine.costs import RoundCostModel
from specray.actors.engine.errors import DuplicateRequestError
from specray.actors.engine.lifecycle import grammar_for, start_request
from specray.actors.engine.request import GenerationRequest, RequestOutput, RunningRequest
from specray.actors.engine.round import speculative_round
from specray.actors.engine.scheduling import GammaScheduler
from specray.actors.engine.target import Target, VerifyInput, VerifyOutput
from specray.actors.engine.verify_budget import DEFAULT_FLOOR, BudgetSizing
from specray.actors.sampling.grammar import GrammarCompiler, GrammarMatcher
from specray.actors.workers.draft_worker import DraftWorker

_LOCAL = 0  # the one draft replica of the in-process engine


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 8  # running requests per round; ≤ the target's KV slots
    num_speculative_tokens: int = 4  # γ, or its ceiling when adaptive
    adaptive: bool = True
    # Tokens the target feeds per round; longer prompts prefill in chunks
    # beside the decoding requests. None: every prompt in one round.
    max_batched_tokens: int | None = None
    # How the verify budget sizes a batch: "fresh" or "stale" (verify_budget.py).
    budget_sizing: BudgetSizing = "fresh"
    # The least share of its rate without speculation the verify budget
    # leaves any request of a batch; 0: off (verify_budget.py).
    budget_floor: float = DEFAULT_FLOOR


class LocalDrafting:
    """The round's drafting port in process: one :class:`DraftWorker`."""

    def __init__(self, worker: DraftWorker) -> None:
        self.worker = worker

    @property
    def hidden_layers(self) -> tuple[int, ...]:
        return self.worker.hidden_layers()

    async def propose(
        self, replica: int, asks: list[DraftRequest], updates: list[DraftUpdate]
    ) -> list[DraftProposal] | None:
        return self.worker.propose(asks, updates)


class LocalVerifying:
    """The round's verifying port in process: one target."""

    def __init__(self, target: Target) -> None:
        self.target = target

    @property
    def verifies_trees(self) -> bool:
        return self.target.verifies_trees

    async def verify(
        self, replica: int | None, inputs: list[VerifyInput], hidden_layers: tuple[int, ...]
    ) -> list[VerifyOutput] | None:
        return self.target.verify(inputs, hidden_layers)


class SpecEngine:
    """Continuous batching over a target and an optional drafter."""

    def __init__(
        self,
        target: Target,
        drafter: Drafter | None,
        tokenizer: PreTrainedTokenizerBase | None,
        eos_token_ids: tuple[int, ...],
        config: EngineConfig | None = None,
        costs: RoundCostModel | None = None,
        paths: DraftPaths | None = None,
        grammars: GrammarCompiler | None = None,
    ) -> None:
        """``costs``: measured (profiled) round costs for the adaptive γ,
        learned from the rounds when not given. ``paths``: how ``drafter``
        drafts, by default read from the drafter itself. ``grammars``: for
        structured output (requests with a guide)."""
        self.target = target
        self.drafter = drafter
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.config = config or EngineConfig()
        self.grammars = grammars
        worker = DraftWorker(drafter) if drafter is not None else None
        self._drafting = LocalDrafting(worker) if worker is not None else None
        self._verifying = LocalVerifying(target)
        if drafter is not None and paths is None:
            paths = drafter.paths
        self.scheduler = GammaScheduler(
            paths,
            self.config.adaptive,
            costs,
            self.config.max_batched_tokens,
            self.config.budget_sizing,
            self.config.budget_floor,
        )
        # Prefix cache lookups so far, in tokens: offered, and found cached.
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.waiting: deque[GenerationRequest] = deque()
        self._grammar_of: dict[str, GrammarMatcher] = {}  # of waiting requests
        self.running: dict[str, RunningRequest] = {}
        # The round is a coroutine (the router awaits replicas in it); here
        # every port answers at once, so each step runs it to completion.
        self._loop = asyncio.new_event_loop()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add_request(self, request: GenerationRequest) -> None:
        known = {r.request_id for r in self.waiting} | set(self.running)
        if request.request_id in known:
            raise DuplicateRequestError(request.request_id)
        grammar = grammar_for(request, self.grammars)  # a bad guide is refused here
        if grammar is not None:
            self._grammar_of[request.request_id] = grammar
        self.waiting.append(request)

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is and free its state everywhere."""
        for queued in list(self.waiting):
            if queued.request_id == request_id:
                self.waiting.remove(queued)
                self._grammar_of.pop(request_id, None)
                return True
        running = self.running.pop(request_id, None)
        if running is None:
            return False
        self._release(running)
        return True

    def step(self) -> list[RequestOutput]:
        """Run one round; return each running request's chunk."""
        self._admit()
        if not self.running:
            return []
        batch = list(self.running.values())
        result = self._loop.run_until_complete(
            speculative_round(batch, self._drafting, self._verifying, self.scheduler)
        )
        self.prefix_queries += result.prefix_queries
        self.prefix_hits += result.prefix_hits
        for run, output in zip(result.requests, result.outputs, strict=True):
            if output.finished:
                del self.running[run.request_id]
                self._release(run)
        return result.outputs

    def generate(self, requests: list[GenerationRequest]) -> Iterator[RequestOutput]:
        """Run ``requests`` to completion, yielding chunks as they stream."""
        for request in requests:
            self.add_request(request)
        while self.has_work:
            yield from self.step()

    def close(self) -> None:
        self._loop.close()

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.config.max_batch:
            request = self.waiting.popleft()
            running = start_request(
                request,
                self.eos_token_ids,
                self.tokenizer,
                self.config.num_speculative_tokens,
                self.scheduler.new_draft_state(),
                self._grammar_of.pop(request.request_id, None),
            )
            if self._drafting is not None and running.wants_draft:
                self._drafting.worker.start(request.request_id, running.tokens, running.sampling)
                running.draft.attach(_LOCAL, self.scheduler.start_backlog(len(running.tokens)))
            self.running[request.request_id] = running

    def _release(self, running: RunningRequest) -> None:
        self.target.release(running.request_id)
        if self._drafting is not None and running.draft.replica is not None:
            self._drafting.worker.finish([running.request_id])
