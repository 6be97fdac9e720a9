"""A small Python client for specray's gRPC API.

with SpecrayClient("127.0.0.1:50051") as client:
    result = client.generate("def fib(n):", max_tokens=64, temperature=0)
    for chunk in client.generate_stream(token_ids, max_tokens=64):
        print(chunk.text, end="")

A server with TLS and a token: ``SpecrayClient(address, tls_ca=Path("ca.pem"),
token=os.environ["SPECRAY_AUTH_TOKEN"])``.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from specray.deploy.auth import bearer_metadata
from specray.deploy.errors import RETRY_PUSHBACK_KEY
from specray.protos.messages import FINISH_REASONS, build_request
from specray.protos.specray.v1 import generation_pb2 as pb
from specray.protos.specray.v1 import generation_pb2_grpc as pb_grpc


class SpecrayError(Exception):
    """A call the server refused or failed, with its gRPC status."""

    def __init__(self, code: grpc.StatusCode, details: str, retry_after_s: float | None) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.retry_after_s = retry_after_s  # the server's hint when overloaded

    @classmethod
    def from_rpc(cls, error: grpc.RpcError) -> SpecrayError:
        retry = None
        for key, value in error.trailing_metadata() or ():
            if key == RETRY_PUSHBACK_KEY:
                retry = int(value) / 1000
        return cls(error.code(), error.details() or "", retry)


@dataclass(frozen=True)
class GenerationResult:
    """A whole generation, or one streamed chunk of it (counters so far)."""

    token_ids: list[int]
    text: str
    finish_reason: str | None  # "stop" | "length"; None for a chunk mid-stream
    prompt_tokens: int
    completion_tokens: int
    draft_tokens: int
    accepted_tokens: int
    rounds: int
    fallback: bool
    seed: int

    @classmethod
    def from_response(cls, message: pb.GenerateResponse) -> GenerationResult:
        stats = message.spec_stats
        return cls(
            token_ids=list(message.token_ids),
            text=message.text,
            finish_reason=FINISH_REASONS.get(message.finish_reason),
            prompt_tokens=message.usage.prompt_tokens,
            completion_tokens=message.usage.completion_tokens,
            draft_tokens=stats.draft_tokens,
            accepted_tokens=stats.accepted_tokens,
            rounds=stats.rounds,
            fallback=stats.fallback,
            seed=message.seed,
        )


def open_channel(address: str, tls: bool = False, tls_ca: Path | None = None) -> grpc.Channel:
    """A channel to ``address``: plaintext, or TLS when ``tls`` or ``tls_ca``
    (the CA that signed the server's certificate; default: the system's)."""
    if not tls and tls_ca is None:
        return grpc.insecure_channel(address)
    roots = None if tls_ca is None else tls_ca.read_bytes()
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=roots))


class SpecrayClient:
    """Blocking client over one channel; ``timeout_s`` is each call's deadline.
    ``tls`` / ``tls_ca``: see :func:`open_channel`; ``token``: the server's
    bearer token, sent with every call."""

    def __init__(
        self,
        address: str,
        timeout_s: float | None = None,
        *,
        tls: bool = False,
        tls_ca: Path | None = None,
        token: str | None = None,
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = open_channel(address, tls, tls_ca)
        self._stub = pb_grpc.GenerationStub(self._channel)
        self._metadata = bearer_metadata(token)

    def generate(
        self, prompt: str | Sequence[int], *, timeout_s: float | None = None, **options: Any
    ) -> GenerationResult:
        """The whole generation (the unary Generate call); options as :func:`build_request`."""
        try:
            message = self._stub.Generate(
                build_request(prompt, **options),
                timeout=timeout_s or self.timeout_s,
                metadata=self._metadata,
            )
        except grpc.RpcError as error:
            raise SpecrayError.from_rpc(error) from None
        return GenerationResult.from_response(message)

    def generate_stream(
        self, prompt: str | Sequence[int], *, timeout_s: float | None = None, **options: Any
    ) -> Generator[GenerationResult, None, None]:
        """Chunks as they are generated; stopping early cancels the request."""
        call = self._stub.GenerateStream(
            build_request(prompt, **options),
            timeout=timeout_s or self.timeout_s,
            metadata=self._metadata,
        )
        try:
            for message in call:
                yield GenerationResult.from_response(message)
        except grpc.RpcError as error:
            raise SpecrayError.from_rpc(error) from None
        finally:
            call.cancel()  # a no-op once the call has finished

    def model_info(self, timeout_s: float | None = None) -> pb.GetModelInfoResponse:
        try:
            info: pb.GetModelInfoResponse = self._stub.GetModelInfo(
                pb.GetModelInfoRequest(),
                timeout=timeout_s or self.timeout_s,
                metadata=self._metadata,
            )
        except grpc.RpcError as error:
            raise SpecrayError.from_rpc(error) from None
        return info

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> SpecrayClient:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
