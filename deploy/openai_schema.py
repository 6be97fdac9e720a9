"""Request bodies and response objects of the OpenAI-compatible HTTP API.

Only single-choice, text-only generation is supported (with structured
output: ``response_format``, or vLLM's ``guided_json`` / ``guided_regex`` /
``guided_choice``); parameters OpenAI has and specray does not (``n`` > 1,
``echo``, ``logprobs``, ``best_of``, penalties, ``logit_bias``, non-text
content) are refused rather than ignored, so a client never silently gets
less than it asked for; they are accepted at
their no-op values, which some clients always send. Unknown fields are
refused too, and types are strict: ``"max_tokens": "5"`` or ``true`` is an
error, not 5 or 1 (a number is taken for a float field).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from specray.actors.sampling.grammar import Guide
from specray.deploy.backend import Chunk
from specray.deploy.errors import InvalidRequestError
from specray.deploy.validation import RawRequest

STRICT = ConfigDict(extra="forbid", strict=True)


class StreamOptions(BaseModel):
    """OpenAI's ``stream_options``; usage rides on every event regardless."""

    model_config = STRICT

    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class JsonSchemaFormat(BaseModel):
    """OpenAI's ``response_format.json_schema``."""

    model_config = STRICT

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: plain text, any JSON object, or JSON
    matching a schema."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingBody(BaseModel):
    """The parameters both endpoints share (vLLM's extras included)."""

    model_config = STRICT

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
    # Accepted at their no-op values only (see check_supported).
    user: str | None = None  # the caller's end user, for abuse tracking: nothing to do
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # specray's own: speculation on or off, its per-round ceiling, and
    # whether every round verifies all of it (past the verify budget).
    speculative: bool | None = None
    num_speculative_tokens: int | None = None
    fixed_speculation: bool | None = None
    # Structured output: OpenAI's response_format, or vLLM's guided_* names.
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None

    def check_supported(self) -> None:
        if self.n != 1:
            raise InvalidRequestError(f"`n` must be 1, got {self.n}", "n")
        if self.logprobs not in (None, False):
            raise InvalidRequestError(
                f"`logprobs` is not supported, got {self.logprobs!r}", "logprobs"
            )
        penalties = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0}
        for name, neutral in penalties.items():
            value = getattr(self, name)
            if value is not None and value != neutral:
                raise InvalidRequestError(
                    f"`{name}` is not supported: it must be {neutral:g} or unset, got {value!r}",
                    name,
                )
        if self.logit_bias:
            raise InvalidRequestError(
                f"`logit_bias` is not supported: it must be empty or unset, got "
                f"{len(self.logit_bias)} entries",
                "logit_bias",
            )

    def guide(self) -> tuple[Guide | None, str]:
        """The structured-output guide asked for (at most one) and its field."""
        asked: list[tuple[Guide, str]] = []
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            asked.append((Guide("json_object"), "response_format"))
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise InvalidRequestError(
                    "`response_format.json_schema` is required when its type is json_schema",
                    "response_format",
                )
            asked.append(
                (Guide("json_schema", json.dumps(fmt.json_schema.schema_)), "response_format")
            )
        if self.guided_json is not None:
            given = self.guided_json
            text = given if isinstance(given, str) else json.dumps(given)
            asked.append((Guide("json_schema", text), "guided_json"))
        if self.guided_regex is not None:
            asked.append((Guide("regex", self.guided_regex), "guided_regex"))
        if self.guided_choice is not None:
            asked.append((Guide("choice", json.dumps(self.guided_choice)), "guided_choice"))
        if len(asked) > 1:
            fields = ", ".join(f"`{field}`" for _, field in asked)
            raise InvalidRequestError(f"set at most one of {fields}", asked[1][1])
        return asked[0] if asked else (None, "guided_json")

    def raw(self, **prompt: Any) -> RawRequest:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        guide, guide_field = self.guide()
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
            fixed_speculation=self.fixed_speculation,
            guide=guide,
            guide_field=guide_field,
            **prompt,
        )


class CompletionBody(SamplingBody):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise InvalidRequestError("`echo` is not supported", "echo")
        if self.best_of not in (None, 1):
            raise InvalidRequestError(f"`best_of` must be 1, got {self.best_of}", "best_of")
        if self.suffix:
            raise InvalidRequestError("`suffix` is not supported", "suffix")

    def raw_request(self) -> RawRequest:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise InvalidRequestError(
                    f"`prompt` must be one prompt (batches are not supported), got {len(prompt)}",
                    "prompt",
                )
            prompt = prompt[0]
        fields = {"text_field": "prompt", "token_ids_field": "prompt"}
        if isinstance(prompt, str):
            return self.raw(text=prompt, **fields)
        return self.raw(token_ids=prompt, **fields)


class TextPart(BaseModel):
    """One part of a message's content in the parts form; only text is served."""

    model_config = STRICT

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = STRICT

    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None  # a participant's name; the chat templates here ignore it

    def as_template_input(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):  # the parts form
            content = "".join(part.text for part in content)
        return {"role": self.role, "content": content or ""}


class ChatBody(SamplingBody):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(default=None)
    top_logprobs: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs:
            raise InvalidRequestError("`top_logprobs` is not supported", "top_logprobs")

    def effective(self) -> ChatBody:
        """``max_completion_tokens`` (OpenAI's newer name) wins over ``max_tokens``."""
        if self.max_completion_tokens is None:
            return self
        return self.model_copy(update={"max_tokens": self.max_completion_tokens})


def usage(chunk: Chunk | None) -> dict[str, Any]:
    prompt = chunk.prompt_tokens if chunk else 0
    completion = chunk.completion_tokens if chunk else 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": chunk.cached_tokens if chunk else 0},
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
    object_type = "chat.completion" if kind == "chat" else "text_completion"
    return _envelope(object_type, response_id, model, choice, last)


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
    object_type = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return _envelope(object_type, response_id, model, choice, chunk)


def _envelope(
    object_type: str, response_id: str, model: str, choice: dict[str, Any], chunk: Chunk
) -> dict[str, Any]:
    """What a whole response and a stream's event carry around their one
    choice; ``usage`` is the tokens so far."""
    return {
        "id": response_id,
        "object": object_type,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage(chunk),
    }


def error_object(
    message: str, error_type: str, code: int, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


# What pydantic's union-member tags and strict type errors mean, in words.
_KINDS = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "list[int]": "a list of token ids",
    "list[str]": "a list of strings",
    "list[list[int]]": "a list of one list of token ids",
    "list[TextPart]": "a list of text parts",
}
_TYPE_ERRORS = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
}


def describe_body_error(errors: Sequence[Mapping[str, Any]]) -> tuple[str, str | None]:
    """A TGI-style message (field, what it must be, the value given) and the
    top-level field, for pydantic's errors about a request body."""
    first = errors[0]
    kind, parts, given = first["type"], _parts(first["loc"]), _show(first.get("input"))
    if kind == "json_invalid":
        reason = first.get("ctx", {}).get("error", "")
        return f"the request body is not valid JSON: {reason} (at character {parts[0]})", None
    if not parts:
        if kind == "missing":
            return "the request body is missing: send a JSON object", None
        if isinstance(first.get("input"), bytes):  # not sent as JSON
            return "the request body must be JSON, sent with `Content-Type: application/json`", None
        return (
            "the request body must be a JSON object (with `Content-Type: application/json`), "
            f"got {given}",
            None,
        )
    top = str(parts[0])
    tag_at = next((i for i, part in enumerate(parts) if i > 0 and _is_union_tag(part)), None)
    if tag_at is not None:  # every member of a union refused the value
        prefix = parts[:tag_at]
        tags = [
            str(other[tag_at])
            for other in (_parts(e["loc"]) for e in errors)
            if len(other) > tag_at and other[:tag_at] == prefix
        ]
        kinds = " or ".join(dict.fromkeys(_KINDS.get(tag, tag) for tag in tags))
        return f"`{_path(prefix)}` must be {kinds}, got {given}", top
    path = _path(parts)
    if kind == "missing":
        return f"`{path}` is required", top
    if kind == "extra_forbidden":
        return (
            f"unknown field `{path}` (got {given}); this server refuses fields it does not "
            "support rather than ignore them",
            top,
        )
    must = _TYPE_ERRORS.get(kind)
    what = f"must be {must}" if must else str(first["msg"]).replace("Input should", "should")
    return f"`{path}` {what}, got {given}", top


def _parts(loc: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(loc[1:]) if loc[:1] == ("body",) else tuple(loc)


def _is_union_tag(part: Any) -> bool:
    # pydantic names a union member's error after its type, e.g. "list[int]".
    return isinstance(part, str) and (part in _KINDS or not part.isidentifier())


def _path(parts: Sequence[Any]) -> str:
    """``messages[0].content`` from a location's parts."""
    path = ""
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _show(value: Any, limit: int = 60) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."
