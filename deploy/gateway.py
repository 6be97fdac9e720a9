"""The serving state the gRPC and OpenAI HTTP front ends share: one backend
(absent while the model loads), one validator, and admission — the one
place that refuses requests while loading or draining and beyond the
bounded queue — plus the request loop that enforces deadlines and frees the
work of a stream its caller abandons."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Coroutine
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from specray.deploy.backend import Backend, Chunk, ModelInfo
from specray.deploy.errors import (
    DeadlineExceededError,
    OverloadedError,
    UnavailableError,
)
from specray.deploy.validation import RawRequest, ValidatedRequest, Validator

log = logging.getLogger(__name__)
T = TypeVar("T")

State = Literal["loading", "serving", "draining"]


@dataclass(frozen=True)
class QueueLimits:
    """How many requests may wait beyond what the backend runs at once."""

    max_queued: int = 64
    retry_after_s: float = 1.0  # the hint an overloaded caller gets


class Gateway:
    """Admission for both front ends: ``loading`` → ``serving`` → ``draining``."""

    def __init__(self) -> None:
        self._backend: Backend | None = None
        self._validator: Validator | None = None
        self._queue = QueueLimits()
        self._draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._cleanups: set[asyncio.Task[None]] = set()

    def attach(
        self, backend: Backend, validator: Validator, queue: QueueLimits | None = None
    ) -> None:
        """The model is loaded: start serving."""
        self._backend = backend
        self._validator = validator
        self._queue = queue or QueueLimits()

    @property
    def state(self) -> State:
        if self._draining:
            return "draining"
        return "loading" if self._backend is None else "serving"

    @property
    def num_in_flight(self) -> int:
        return self._in_flight

    @property
    def backend(self) -> Backend:
        """The backend, for operator calls (scaling), which draining does not stop."""
        return _loaded(self._backend)

    @property
    def validator(self) -> Validator:
        return _loaded(self._validator)

    async def healthy(self) -> bool:
        if self._backend is None or self.state != "serving":
            return False
        return await self._backend.health()

    def model_info(self) -> ModelInfo:
        return self.backend.model_info()

    def validate(self, raw: RawRequest) -> ValidatedRequest:
        self._ready_backend()
        return self.validator.validate(raw)

    def start_draining(self) -> None:
        """Refuse new requests; those in flight go on."""
        self._draining = True

    async def wait_idle(self, timeout_s: float | None) -> bool:
        """Wait until no request is in flight; False if ``timeout_s`` ran out first."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def generate(
        self, request: ValidatedRequest, timeout_s: float | None = None
    ) -> AsyncGenerator[Chunk, None]:
        """Stream ``request`` from the backend, within ``timeout_s`` if given.

        Consumers must close this iterator (``contextlib.aclosing``) so that a
        request they abandon is cancelled and its work freed at once.
        """
        backend = self._ready_backend()
        self._check_room(backend)
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        chunks = backend.generate(request)
        self._in_flight += 1
        self._idle.clear()
        # The backend frees the work itself when it raises (and a refused
        # duplicate id must not cancel the request that holds it); anything
        # else that ends the stream early (a deadline, the caller going away)
        # cancels it here, the one place that does.
        must_cancel = True
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        chunk = await anext(chunks)
                except TimeoutError as error:
                    raise DeadlineExceededError(
                        f"the deadline ({timeout_s:.3g} s) passed before request "
                        f"{request.request_id!r} finished"
                    ) from error
                except Exception:
                    must_cancel = False
                    raise
                yield chunk
                if chunk.finished:
                    must_cancel = False
                    return
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
            if must_cancel:
                # First, and a task of its own: this one may be cancelled
                # again while it closes the stream below (anyio cancellation
                # is level-triggered), and the cleanup must still run.
                self._spawn(backend.cancel(request.request_id))
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    def _ready_backend(self) -> Backend:
        backend = self.backend
        if self.state == "draining":
            raise UnavailableError("the server is draining and takes no new requests")
        return backend

    def _check_room(self, backend: Backend) -> None:
        running, queued = backend.capacity(), self._queue.max_queued
        if self._in_flight >= running + queued:
            raise OverloadedError(
                f"the server is overloaded: {self._in_flight} requests in flight, at most "
                f"{running} running and {queued} queued; retry later",
                self._queue.retry_after_s,
            )

    def _spawn(self, cleanup: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(cleanup)
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)


def _loaded(part: T | None) -> T:
    """``part`` of the model (absent until it is loaded), or UNAVAILABLE."""
    if part is None:
        raise UnavailableError("the model is still loading; retry shortly")
    return part
