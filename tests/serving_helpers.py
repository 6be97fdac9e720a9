"""A tiny served model with a real (tiny, trained-here) tokenizer and chat
template, and a real `specray serve` Service running on its own event-loop
thread, for the gRPC and OpenAI HTTP tests."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from specray.actors.store.chat_tokenizer import save_chat_tokenizer
from specray.actors.store.random_qwen2 import write_random_qwen2
from specray.deploy.client import GenerationResult, SpecrayClient
from specray.deploy.config import ServeConfig
from specray.deploy.engine_backend import EngineBackend
from specray.deploy.router_backend import RouterBackend
from specray.deploy.serve import BuildBackend, Service

T = TypeVar("T")

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i)\n",
    "The quick brown fox jumps over the lazy dog.",
    "x = [1, 2, 3]\ny = [1, 2, 3]\nz = [1, 2, 3]\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "Hello, world! Speculative decoding drafts tokens and the target verifies them.",
]
MODEL_VOCAB = 512  # padded past the tokenizer's ~400 ids, as Qwen pads its vocabulary


def save_tokenizer(directory: Path) -> int:
    """A tiny byte-level BPE tokenizer with a chat template (ids below
    :data:`MODEL_VOCAB`), saved to ``directory``; returns its EOS id."""
    return save_chat_tokenizer(directory, CORPUS)


def save_served_model(directory: Path, seed: int = 0) -> Path:
    """A random-weight Qwen2 (hidden 64, 2 layers) with a tokenizer and chat template."""
    eos = save_tokenizer(directory)
    return write_random_qwen2(
        directory,
        seed,
        vocab_size=MODEL_VOCAB,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        # Wider than the default 0.02 so greedy output varies: runs that
        # n-gram drafts get accepted, and changes where they get rejected.
        initializer_range=0.1,
        eos_token_id=eos,
        bos_token_id=eos,
    )


def serve_config(model_dir: Path, **overrides: Any) -> ServeConfig:
    settings: dict[str, Any] = {
        "backend": "engine",
        "target": str(model_dir),
        "draft": "ngram",
        "dtype": "float32",
        "k": 4,
        "adaptive": False,
        "max_batch": 2,
        "max_len": 512,
        "port": 0,
        "http_port": None,
        "drain_timeout_s": 60,
        "limits": {"max_tokens": 256, "max_queued_requests": 1},
    }
    return ServeConfig.model_validate(settings | overrides)


class ServingThread:
    """A :class:`Service` on a private event loop in a background thread."""

    def __init__(
        self, config: ServeConfig, load: bool = True, build: BuildBackend | None = None
    ) -> None:
        self.service = Service(config, build)
        self._load = load
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> ServingThread:
        self._thread.start()
        self.call(self.service.start())
        if self._load:
            self.load()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.call(self.service.shutdown(), timeout_s=120)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def call(self, work: Coroutine[Any, Any, T], timeout_s: float = 120) -> T:
        """Run ``work`` on the server's loop and wait for its result."""
        return self.submit(work).result(timeout_s)

    def submit(self, work: Coroutine[Any, Any, T]) -> Future[T]:
        """Start ``work`` on the server's loop; return its future."""
        return asyncio.run_coroutine_threadsafe(work, self._loop)

    def load(self) -> None:
        self.call(self.service.load())

    @property
    def backend(self) -> EngineBackend:
        backend = self.service.backend
        assert isinstance(backend, EngineBackend)
        return backend

    @property
    def router_backend(self) -> RouterBackend:
        backend = self.service.backend
        assert isinstance(backend, RouterBackend)
        return backend

    @property
    def grpc_address(self) -> str:
        return self.service.grpc.address

    @property
    def http_url(self) -> str:
        assert self.service.http is not None
        return f"http://127.0.0.1:{self.service.http.port}"


def unary_and_stream(
    client: SpecrayClient, prompt: str, max_tokens: int, **sampling: Any
) -> tuple[GenerationResult, list[GenerationResult]]:
    """The same request, ignoring EOS, as one unary call and as a stream,
    checked to agree: the chunks carry the unary call's tokens and text,
    only the last one finishes, and it counts the tokens and rounds."""
    options = {"max_tokens": max_tokens, "ignore_eos": True, **sampling}
    whole = client.generate(prompt, **options)
    chunks = list(client.generate_stream(prompt, **options))
    assert [t for c in chunks for t in c.token_ids] == whole.token_ids
    assert "".join(c.text for c in chunks) == whole.text
    assert len(whole.token_ids) == max_tokens and whole.finish_reason == "length"
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert (chunks[-1].completion_tokens, chunks[-1].rounds) == (max_tokens, whole.rounds)
    return whole, chunks


def drafted_without_changing_greedy_output(
    client: SpecrayClient, prompts: list[str | list[int]], max_tokens: int
) -> int:
    """How many tokens the drafter proposed over ``prompts``, each decoded
    greedily with and without speculation, checked to give the same tokens
    (the target alone takes a round per token)."""
    drafted = 0
    for prompt in prompts:
        common = {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
        speculative = client.generate(prompt, **common)
        target_only = client.generate(prompt, speculative=False, **common)
        assert speculative.token_ids == target_only.token_ids, prompt
        assert target_only.draft_tokens == 0 and target_only.rounds == max_tokens
        drafted += speculative.draft_tokens
    return drafted


def wait_until(condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
    """Poll ``condition`` (a bound, not a timing assertion: it only stops a hang)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)
