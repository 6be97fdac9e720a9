"""What the front door (gRPC and OpenAI HTTP) needs from whatever generates.

Two implementations fit :class:`Backend`: the in-process engine
(:mod:`specray.deploy.engine_backend`) and the Ray router
(:mod:`specray.deploy.router_backend`, a thin adapter over its streaming
actor method).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from specray.actors.drafting.spec import DrafterSpec
from specray.actors.model.config import ModelConfig

if TYPE_CHECKING:
    from specray.deploy.validation import ValidatedRequest

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class ModelInfo:
    """The served model, as GetModelInfo and /v1/models report it."""

    target: str  # registered name or path
    drafts: tuple[str, ...]  # e.g. ("ngram",); empty when target-only
    max_context: int  # prompt + max_tokens must fit in it
    dtype: str
    tensor_parallel_size: int  # per row of experts when expert_parallel_size > 1
    vocab_size: int
    max_num_speculative_tokens: int  # the drafting ceiling (γ max)
    expert_parallel_size: int = 1  # a target replica has tp x ep shards


@dataclass(frozen=True)
class ChunkStats:
    """Speculation counters of a request so far (cumulative)."""

    draft_tokens: int = 0
    accepted_tokens: int = 0
    rounds: int = 0
    fallback: bool = False  # the drafter failed; the request went on target-only
    elapsed_s: float = 0.0  # since the backend accepted the request


@dataclass(frozen=True)
class Chunk:
    """What one step added to a request's output."""

    request_id: str
    token_ids: tuple[int, ...]  # this chunk's tokens
    text: str  # this chunk's text; never taken back by a later chunk
    finish_reason: FinishReason | None  # None until the last chunk
    prompt_tokens: int
    completion_tokens: int  # cumulative, including this chunk
    stats: ChunkStats
    seed: int  # the seed in use (the request's or one the backend picked)
    cached_tokens: int = 0  # prompt tokens served from the prefix cache

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Backend(Protocol):
    """Streams generations and reports on the model and its own health.

    Admission (loading, draining, the bounded queue) and freeing the work of
    a stream its caller abandons are the :class:`~specray.deploy.gateway.Gateway`'s;
    a backend serves what the gateway lets through.

    Contract:

    - ``generate`` hands the request to the engine or router before yielding
      its first chunk; a refusal there (a request id already in flight) is
      raised from the first ``__anext__``. The last chunk has a
      ``finish_reason``.
    - :meth:`cancel` stops a request from anywhere and frees its work; a
      consumer of a cancelled request gets
      :class:`~specray.actors.engine.errors.RequestCancelledError`.
    - Other failures raise any exception; the error table maps it.
    """

    # An async generator function: ``async def generate(...)`` with ``yield``.
    def generate(self, request: ValidatedRequest) -> AsyncIterator[Chunk]: ...

    async def cancel(self, request_id: str) -> None:
        """Stop ``request_id`` and free its work; unknown ids are ignored."""
        ...

    def model_info(self) -> ModelInfo: ...

    def capacity(self) -> int:
        """Requests it runs at once (beyond them, requests queue)."""
        ...

    async def health(self) -> bool:
        """Whether requests can be served now (e.g. the target group is up)."""
        ...

    async def scale(self, drafts: int, targets: int) -> None:
        """Run ``drafts`` drafter and ``targets`` target replicas."""
        ...

    async def close(self) -> None:
        """Release the backend; requests still in flight fail as unavailable."""
        ...


def model_info(
    target: str,
    drafter: DrafterSpec | None,
    config: ModelConfig,
    max_len: int,
    dtype: str,
    tensor_parallel_size: int,
    max_num_speculative_tokens: int,
    expert_parallel_size: int = 1,
) -> ModelInfo:
    """What GetModelInfo and /v1/models report for a served target."""
    return ModelInfo(
        target=target,
        drafts=() if drafter is None else (drafter.name,),
        max_context=min(max_len, config.max_position_embeddings),
        dtype=dtype,
        tensor_parallel_size=tensor_parallel_size,
        vocab_size=config.vocab_size,
        max_num_speculative_tokens=max_num_speculative_tokens,
        expert_parallel_size=expert_parallel_size,
    )
