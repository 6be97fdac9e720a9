"""A :class:`~specray.deploy.backend.Backend` over the single-process engine.

The engine is not thread-safe and its ``step`` is long, blocking torch work,
so one thread owns it: it applies queued commands (add, abort, snapshot)
between rounds, steps while there is work and sleeps when there is none.
Each request has an ``asyncio.Queue`` on its caller's event loop; the engine
thread hands chunks over with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TypeAlias

from specray.actors.engine.engine import SpecEngine
from specray.actors.engine.errors import (
    DuplicateRequestError,
    RequestCancelledError,
    RequestRejectedError,
)
from specray.actors.engine.request import GenerationRequest
from specray.actors.engine.target import LocalTarget
from specray.deploy.backend import Chunk, ModelInfo
from specray.deploy.conversion import chunk_from_output, generation_request
from specray.deploy.errors import UnavailableError, UnsupportedError
from specray.deploy.replicas import ReplicaState
from specray.deploy.validation import ValidatedRequest

log = logging.getLogger(__name__)

Item: TypeAlias = Chunk | BaseException


@dataclass
class _Stream:
    """The consumer side of one request."""

    loop: asyncio.AbstractEventLoop
    prompt_tokens: int
    queue: asyncio.Queue[Item] = field(default_factory=asyncio.Queue)
    finished: bool = False

    def put(self, item: Item) -> None:
        # A closed loop means nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's request bookkeeping, read on its own thread."""

    waiting: tuple[str, ...]
    running: tuple[str, ...]
    target_slots: int | None  # KV slots held (a local target only)


class EngineBackend:
    """Serves a :class:`SpecEngine` in this process; it runs ``max_batch``
    requests at once."""

    def __init__(self, engine: SpecEngine, info: ModelInfo) -> None:
        self._engine = engine
        self._info = info
        self._wake = threading.Condition()
        self._commands: list[Callable[[], object]] = []  # run on the engine thread, in order
        self._streams: dict[str, _Stream] = {}  # guarded by _wake
        self._stopping = False
        self._paused = False
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="specray-engine", daemon=True)
        self._thread.start()

    # -- Backend -------------------------------------------------------------

    async def generate(self, request: ValidatedRequest) -> AsyncIterator[Chunk]:
        stream = self._admit(request)
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    stream.finished = True  # the engine thread already dropped it
                    raise item
                # Marked before the yield: a consumer that got the last chunk
                # closes this generator without resuming it.
                stream.finished = item.finished
                yield item
                if stream.finished:
                    return
        finally:
            if stream.finished:  # an abandoned one stays until the gateway cancels it
                self._forget(request.request_id, stream)

    async def cancel(self, request_id: str) -> None:
        with self._wake:
            stream = self._streams.pop(request_id, None)
        if stream is not None:
            self._post(lambda: self._engine.abort(request_id))
            stream.put(RequestCancelledError(f"request {request_id!r} was cancelled"))

    def model_info(self) -> ModelInfo:
        return self._info

    async def health(self) -> bool:
        return self._failure is None and self._thread.is_alive()

    async def scale(self, drafts: int, targets: int) -> None:
        current = (len(self._info.drafts), 1)
        if (drafts, targets) != current:
            raise UnsupportedError(
                f"the in-process engine runs {current[0]} drafter(s) and 1 target; scaling to "
                f"{drafts} and {targets} needs the Ray router"
            )

    async def replicas(self) -> ReplicaState:
        state = await self.snapshot()
        return ReplicaState(
            backend="engine",
            drafts=len(self._info.drafts),
            targets=1,
            tensor_parallel_size=self._info.tensor_parallel_size,
            running=len(state.running),
            waiting=len(state.waiting),
        )

    def capacity(self) -> int:
        return self._engine.config.max_batch

    # -- lifecycle and introspection ----------------------------------------

    async def snapshot(self) -> EngineSnapshot:
        """What the engine holds right now, read between rounds."""
        done: Future[EngineSnapshot] = Future()

        def read() -> None:
            target = self._engine.target
            slots = target.num_active if isinstance(target, LocalTarget) else None
            waiting = tuple(r.request_id for r in self._engine.waiting)
            done.set_result(EngineSnapshot(waiting, tuple(self._engine.running), slots))

        self._post(read)
        return await asyncio.wrap_future(done)

    async def close(self) -> None:
        """Stop the engine thread; requests still in flight fail as unavailable."""
        with self._wake:
            self._stopping = True
            self._paused = False
            self._wake.notify()
        await asyncio.to_thread(self._thread.join)
        self._fail_all(UnavailableError("the server is shutting down"))

    def pause(self) -> None:
        """Hold the engine between rounds; requests are still admitted and queue up."""
        with self._wake:
            self._paused = True

    def resume(self) -> None:
        with self._wake:
            self._paused = False
            self._wake.notify()

    # -- consumer side -------------------------------------------------------

    def _admit(self, request: ValidatedRequest) -> _Stream:
        if self._failure is not None or self._stopping:
            raise UnavailableError("the engine has stopped; see the server log")
        stream = _Stream(asyncio.get_running_loop(), request.prompt_tokens)
        generation = generation_request(request)
        with self._wake:
            # Chunks find their stream by id: the engine's table and this
            # map refuse a duplicate alike.
            if request.request_id in self._streams:
                raise DuplicateRequestError(request.request_id)
            self._streams[request.request_id] = stream
            self._commands.append(lambda: self._add(generation, stream))
            self._wake.notify()
        return stream

    def _forget(self, request_id: str, stream: _Stream) -> None:
        """Unregister a finished stream; not registered any more means
        cancel() already took it, and the id may belong to a newer request."""
        with self._wake:
            if self._streams.get(request_id) is stream:
                del self._streams[request_id]

    def _post(self, command: Callable[[], object]) -> None:
        with self._wake:
            self._commands.append(command)
            self._wake.notify()

    # -- engine thread -------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._stopping and (
                        self._paused or not (self._commands or self._engine.has_work)
                    ):
                        self._wake.wait()
                    if self._stopping:
                        return
                    commands, self._commands = self._commands, []
                for command in commands:
                    try:
                        command()
                    except Exception:
                        log.exception("an engine command failed")
                if self._engine.has_work:
                    self._step()
        except BaseException as error:
            log.exception("the engine thread failed")
            self._failure = error
            self._fail_all(UnavailableError("the engine has stopped; see the server log"))

    def _add(self, request: GenerationRequest, stream: _Stream) -> None:
        with self._wake:
            if self._streams.get(request.request_id) is not stream:
                return  # cancelled or abandoned before it reached the engine
        try:
            self._engine.add_request(request)
        except RequestRejectedError as error:
            stream.put(error)

    def _step(self) -> None:
        try:
            outputs = self._engine.step()
        except Exception as error:
            # The round's state is unknown: drop every request that was in it.
            log.exception(
                "an engine round failed; failing its %d requests", len(self._engine.running)
            )
            for request_id in list(self._engine.running):
                self._drop(request_id, error)
            return
        for output in outputs:
            with self._wake:
                stream = self._streams.get(output.request_id)
            if stream is not None:
                stream.put(chunk_from_output(output, stream.prompt_tokens))

    def _drop(self, request_id: str, error: BaseException) -> None:
        try:
            self._engine.abort(request_id)
        except Exception:
            log.exception("freeing request %r failed", request_id)
            self._engine.running.pop(request_id, None)
        with self._wake:
            stream = self._streams.get(request_id)
        if stream is not None:
            stream.put(error)

    def _fail_all(self, error: BaseException) -> None:
        with self._wake:
            streams = list(self._streams.values())
        for stream in streams:
            stream.put(error)
