"""What the front door (gRPC and OpenAI HTTP) needs from whatever generates.

Two implementations are meant to fit :class:`Backend`: the in-process engine
(:mod:`specray.deploy.engine_backend`) and the Ray router, whose streaming
actor method maps onto :meth:`Backend.generate` with a thin adapter (iterate
the ``ObjectRefGenerator``, await each ref, convert it to a :class:`Chunk`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

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
    tensor_parallel_size: int
    vocab_size: int
    max_num_speculative_tokens: int  # the drafting ceiling (γ max)


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

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Backend(Protocol):
    """Streams generations and reports on the model and its own health.

    Contract:

    - ``generate`` admits the request before yielding its first chunk; a
      refusal (overloaded, draining, a request id already in flight) is a
      :class:`~specray.deploy.errors.ServingError` raised from the first
      ``__anext__``. The last chunk has a ``finish_reason``.
    - Closing the iterator early (``aclose`` or cancelling the consuming task)
      frees the request's work, as does :meth:`cancel` from anywhere; a
      consumer of a cancelled request gets
      :class:`~specray.deploy.errors.RequestCancelledError`.
    - Other failures raise any exception; the front door reports INTERNAL.
    """

    # An async generator function: ``async def generate(...)`` with ``yield``.
    def generate(self, request: ValidatedRequest) -> AsyncIterator[Chunk]: ...

    async def cancel(self, request_id: str) -> None:
        """Stop ``request_id`` and free its work; unknown ids are ignored."""
        ...

    def model_info(self) -> ModelInfo: ...

    async def health(self) -> bool:
        """Whether requests can be served now (e.g. the target group is up)."""
        ...

    async def scale(self, drafts: int, targets: int) -> None:
        """Run ``drafts`` drafter and ``targets`` target replicas."""
        ...

    @property
    def draining(self) -> bool:
        """True once :meth:`start_draining` ran: new requests are refused."""
        ...

    def start_draining(self) -> None:
        """Refuse new requests with UNAVAILABLE; in-flight ones finish."""
        ...

    @property
    def num_in_flight(self) -> int:
        """Requests admitted and not yet finished or freed."""
        ...

    async def close(self) -> None:
        """Release the backend; requests still in flight fail as unavailable."""
        ...
