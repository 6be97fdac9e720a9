"""A single-process speculative decoding engine with continuous batching.

Requests join and leave between rounds. Each :meth:`SpecEngine.step` admits
waiting requests while KV slots are free, runs one speculative round over
every running request (one batched target forward), applies stop criteria
and returns what each request streamed this round.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, replace

from transformers import PreTrainedTokenizerBase

from specray.actors.drafting.base import Drafter
from specray.actors.engine.detokenizer import IncrementalDetokenizer
from specray.actors.engine.gamma import AcceptanceEstimate, GammaPolicy
from specray.actors.engine.request import (
    GenerationRequest,
    RequestOutput,
    RunningRequest,
)
from specray.actors.engine.round import speculative_round
from specray.actors.engine.stopping import StopChecker
from specray.actors.engine.target import Target
from specray.actors.sampling.logits import make_generator, resolve_seed


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 8  # running requests per round; ≤ the target's KV slots
    num_speculative_tokens: int = 4  # γ, or its ceiling when adaptive
    adaptive: bool = True


class SpecEngine:
    """Continuous batching over a target and an optional drafter."""

    def __init__(
        self,
        target: Target,
        drafter: Drafter | None,
        tokenizer: PreTrainedTokenizerBase | None,
        eos_token_ids: tuple[int, ...],
        config: EngineConfig | None = None,
        gamma_policy: GammaPolicy | None = None,
    ) -> None:
        self.target = target
        self.drafter = drafter
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.config = config or EngineConfig()
        self.policy = gamma_policy or GammaPolicy(
            self.config.num_speculative_tokens, self.config.adaptive
        )
        self.waiting: deque[GenerationRequest] = deque()
        self.running: dict[str, RunningRequest] = {}

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add_request(self, request: GenerationRequest) -> None:
        known = {r.request_id for r in self.waiting} | set(self.running)
        if request.request_id in known:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if not request.prompt_ids:
            raise ValueError("prompt_ids must not be empty")
        self.waiting.append(request)

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is and free its state everywhere."""
        for queued in list(self.waiting):
            if queued.request_id == request_id:
                self.waiting.remove(queued)
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
        for r in batch:
            r.gamma = self.policy.choose(r.acceptance, gamma_limit(r)) if self.drafter else 0
        result = speculative_round(batch, self.drafter, self.target)

        outputs = []
        for r, new_ids in zip(batch, result.new_token_ids, strict=True):
            output = stream_round(r, new_ids)
            if output.finished:
                del self.running[r.request_id]
                self._release(r)
            outputs.append(output)
        return outputs

    def generate(self, requests: list[GenerationRequest]) -> Iterator[RequestOutput]:
        """Run ``requests`` to completion, yielding chunks as they stream."""
        for request in requests:
            self.add_request(request)
        while self.has_work:
            yield from self.step()

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.config.max_batch:
            request = self.waiting.popleft()
            running = start_request(
                request, self.eos_token_ids, self.tokenizer, self.config.num_speculative_tokens
            )
            if self.drafter is not None:
                self.drafter.start(request.request_id, request.prompt_ids, running.sampling)
            self.running[request.request_id] = running

    def _release(self, running: RunningRequest) -> None:
        self.target.release(running.request_id)
        if self.drafter is not None:
            self.drafter.finish(running.request_id)


# -- per-request steps, shared with the distributed router -------------------


def start_request(
    request: GenerationRequest,
    eos_token_ids: tuple[int, ...],
    tokenizer: PreTrainedTokenizerBase | None,
    max_gamma: int,
    acceptance: AcceptanceEstimate | None = None,
) -> RunningRequest:
    """A request's running state: its seed resolved, the default EOS filled in
    and its stop checker and detokenizer ready."""
    seed = resolve_seed(request.sampling.seed)
    sampling = replace(request.sampling, seed=seed)
    stopping = request.stopping
    if not stopping.eos_token_ids:
        stopping = replace(stopping, eos_token_ids=eos_token_ids)
    decoder = (
        IncrementalDetokenizer(tokenizer, request.prompt_ids) if tokenizer is not None else None
    )
    return RunningRequest(
        request=replace(request, sampling=sampling, stopping=stopping),
        seed=seed,
        generator=make_generator(seed),
        stop=StopChecker(stopping, decoder),
        acceptance=acceptance if acceptance is not None else AcceptanceEstimate(),
        max_gamma=max_gamma,
        tokens=list(request.prompt_ids),
    )


def gamma_limit(running: RunningRequest) -> int:
    """The most drafts worth asking for: the request's own k and the engine's
    ceiling, and never past ``max_tokens`` (those drafts would be wasted)."""
    own = running.request.num_speculative_tokens
    limit = running.max_gamma if own is None else min(own, running.max_gamma)
    return min(limit, running.remaining_tokens - 1)


def stream_round(running: RunningRequest, new_token_ids: list[int]) -> RequestOutput:
    """Apply stop criteria to one round's committed tokens; the chunk to stream."""
    delta = running.stop.update(new_token_ids)
    running.output_ids.extend(delta.token_ids)
    running.stats.num_output_tokens = len(running.output_ids)
    now = time.perf_counter()
    if running.stats.first_token_at is None and delta.token_ids:
        running.stats.first_token_at = now
    if delta.finished:
        running.stats.finished_at = now
    return RequestOutput(
        running.request_id,
        delta.token_ids,
        delta.text,
        delta.finish_reason,
        running.stats,
        running.seed,
    )
