"""Request bodies and response objects of the OpenAI-compatible HTTP API.

Only single-choice, text-only generation is supported; parameters OpenAI has
and specray does not (``n`` > 1, ``echo``, ``logprobs``, ``best_of``) are
refused rather than ignored, so a client never silently gets less than it
asked for. Unknown extra fields are ignored, as OpenAI's own API does.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from specray.deploy.backend import Chunk
from specray.deploy.errors import InvalidRequestError
from specray.deploy.validation import RawRequest


class SamplingBody(BaseModel):
    """The parameters both endpoints share (vLLM's extras included)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    stream: bool = False
    n: int = 1
    logprobs: Any = None
    # specray's own: speculation on or off, and its per-round ceiling.
    speculative: bool | None = None
    num_speculative_tokens: int | None = None

    def check_supported(self) -> None:
        if self.n != 1:
            raise InvalidRequestError(f"`n` must be 1, got {self.n}")
        if self.logprobs not in (None, False):
            raise InvalidRequestError("`logprobs` is not supported")

    def raw(self, **prompt: Any) -> RawRequest:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return RawRequest(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            max_tokens=self.max_tokens,
            stop=stop,
            stop_token_ids=self.stop_token_ids or [],
            ignore_eos=self.ignore_eos,
            seed=self.seed,
            speculative=self.speculative,
            num_speculative_tokens=self.num_speculative_tokens,
            **prompt,
        )


class CompletionBody(SamplingBody):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise InvalidRequestError("`echo` is not supported")
        if self.best_of not in (None, 1):
            raise InvalidRequestError(f"`best_of` must be 1, got {self.best_of}")

    def raw_request(self) -> RawRequest:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise InvalidRequestError(
                    f"`prompt` must be one prompt (batches are not supported), got {len(prompt)}"
                )
            prompt = prompt[0]
        fields = {"text_field": "prompt", "token_ids_field": "prompt"}
        if isinstance(prompt, str):
            return self.raw(text=prompt, **fields)
        return self.raw(token_ids=prompt, **fields)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None

    def as_template_input(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):  # the parts form: keep the text parts
            content = "".join(str(part.get("text", "")) for part in content)
        return {"role": self.role, "content": content or ""}


class ChatBody(SamplingBody):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(default=None)

    def effective(self) -> ChatBody:
        """``max_completion_tokens`` (OpenAI's newer name) wins over ``max_tokens``."""
        if self.max_completion_tokens is None:
            return self
        return self.model_copy(update={"max_tokens": self.max_completion_tokens})


def usage(chunk: Chunk | None) -> dict[str, int]:
    prompt = chunk.prompt_tokens if chunk else 0
    completion = chunk.completion_tokens if chunk else 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def completion_object(
    kind: Literal["completion", "chat"], response_id: str, model: str, text: str, last: Chunk
) -> dict[str, Any]:
    """A whole (non-streamed) response."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": last.finish_reason}
    if kind == "chat":
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice |= {"text": text, "logprobs": None}
    return {
        "id": response_id,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage(last),
    }


def chunk_object(
    kind: Literal["completion", "chat"],
    response_id: str,
    model: str,
    chunk: Chunk,
    first: bool,
) -> dict[str, Any]:
    """One SSE event; ``usage`` (so far) rides on every event."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": chunk.finish_reason}
    if kind == "chat":
        delta = {"role": "assistant", "content": chunk.text} if first else {"content": chunk.text}
        choice["delta"] = delta
    else:
        choice |= {"text": chunk.text, "logprobs": None}
    return {
        "id": response_id,
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage(chunk),
    }


def error_object(message: str, error_type: str, code: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": None, "code": code}}
