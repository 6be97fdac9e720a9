"""Validation at the edge: a caller's request becomes a typed, checked
:class:`ValidatedRequest` or an :class:`InvalidRequestError` whose message
names the field, the limit and the value given (as TGI's validation does).

Both front ends (gRPC and OpenAI HTTP) translate their wire format into a
neutral :class:`RawRequest` first, so the rules live in one place.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from specray.actors.sampling.grammar import GrammarError, Guide
from specray.actors.sampling.params import SamplingParams, StoppingCriteria
from specray.deploy.errors import InvalidRequestError
from specray.deploy.limits import LimitsConfig

MAX_SEED = 2**64 - 1
# Text longer than this many characters per token of context cannot fit, so
# it is refused before tokenizing (which costs time in proportion to it).
CHARS_PER_TOKEN_BOUND = 32


@dataclass(frozen=True)
class RawRequest:
    """A request as the caller sent it; None means "not set"."""

    request_id: str = ""
    text: str | None = None
    token_ids: Sequence[int] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    max_tokens: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    seed: int | None = None
    speculative: bool | None = None
    num_speculative_tokens: int | None = None
    fixed_speculation: bool | None = None
    # The wire names of the prompt fields, for messages ("prompt" over HTTP).
    text_field: str = "text"
    token_ids_field: str = "token_ids"
    # Structured output, and the wire field it came from (for messages).
    guide: Guide | None = None
    guide_field: str = "guided_json"


@dataclass(frozen=True)
class ValidationLimits:
    """What a request may ask for: the model's limits, and the configured
    ones (``request``: the serve config's ``limits`` section, its defaults
    when not given)."""

    max_context: int  # prompt + max_tokens must fit
    vocab_size: int  # token ids must be below it
    max_num_speculative_tokens: int
    request: LimitsConfig = field(default_factory=lambda: LimitsConfig.model_validate({}))

    @property
    def prompt_char_limit(self) -> int:
        """Characters of text input; unset, CHARS_PER_TOKEN_BOUND per token of context."""
        if self.request.max_prompt_chars is not None:
            return self.request.max_prompt_chars
        return CHARS_PER_TOKEN_BOUND * self.max_context


@dataclass(frozen=True)
class ValidatedRequest:
    """A checked request, ready for a backend."""

    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    stopping: StoppingCriteria
    speculative: bool
    num_speculative_tokens: int | None  # None: the backend's own setting
    guide: Guide | None = None  # structured output
    fixed_speculation: bool = False  # verify the whole k every round, past the budget

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


class Validator:
    """Checks requests against ``limits``; tokenizes text with ``tokenizer``."""

    def __init__(self, limits: ValidationLimits, tokenizer: PreTrainedTokenizerBase | None) -> None:
        self.limits = limits
        self.tokenizer = tokenizer

    def encode(self, text: str, add_special_tokens: bool = True, field: str = "text") -> list[int]:
        """``text`` (the wire field ``field``) as token ids."""
        if self.tokenizer is None:
            raise InvalidRequestError(
                "text input needs a tokenizer and the served model has none; send token ids",
                field,
            )
        limit = self.limits.prompt_char_limit
        if len(text) > limit:
            raise InvalidRequestError(
                f"`{field}` must be at most {limit:,} characters (it could not fit the context "
                f"limit {self.limits.max_context:,} tokens), got {len(text):,}",
                field,
            )
        _check_unicode(field, text)
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def validate(self, raw: RawRequest) -> ValidatedRequest:
        limits = self.limits
        request_id = _request_id(raw.request_id, limits.request.max_request_id_length)
        prompt_ids = self._prompt(raw)
        room = limits.max_context - len(prompt_ids)
        if raw.max_tokens is None:
            if room < 1:
                raise InvalidRequestError(
                    f"prompt ({len(prompt_ids):,} tokens) leaves no room to generate within "
                    f"the context limit {limits.max_context:,}",
                    raw.text_field if raw.text is not None else raw.token_ids_field,
                )
            max_tokens = min(limits.request.default_max_tokens, room)
        else:
            max_tokens = _int_in("max_tokens", raw.max_tokens, 1, limits.request.max_tokens)
            if max_tokens > room:
                raise InvalidRequestError(
                    f"prompt ({len(prompt_ids):,} tokens) + `max_tokens` ({max_tokens:,}) = "
                    f"{len(prompt_ids) + max_tokens:,} exceeds the context limit "
                    f"{limits.max_context:,}",
                    "max_tokens",
                )
        sampling = SamplingParams(
            temperature=_temperature(raw.temperature, limits.request.default_temperature),
            top_k=0 if raw.top_k is None else _int_in("top_k", raw.top_k, 0, limits.vocab_size),
            top_p=1.0 if raw.top_p is None else _top_p(raw.top_p),
            min_p=0.0 if raw.min_p is None else _unit_interval("min_p", raw.min_p),
            seed=None if raw.seed is None else _int_in("seed", raw.seed, 0, MAX_SEED),
        )
        stopping = StoppingCriteria(
            max_tokens=max_tokens,
            stop=_stop_strings(raw.stop, limits),
            stop_token_ids=_token_ids(
                "stop_token_ids",
                raw.stop_token_ids,
                limits.vocab_size,
                limits.request.max_stop_token_ids,
            ),
            ignore_eos=raw.ignore_eos,
        )
        speculative = True if raw.speculative is None else raw.speculative
        if raw.guide is not None:
            self._check_guide(raw.guide, raw.guide_field)
        return ValidatedRequest(
            request_id=request_id,
            prompt_ids=prompt_ids,
            sampling=sampling,
            stopping=stopping,
            speculative=speculative,
            num_speculative_tokens=_num_speculative(
                raw.num_speculative_tokens, speculative, limits
            ),
            guide=raw.guide,
            fixed_speculation=_fixed_speculation(raw.fixed_speculation, speculative),
        )

    def _check_guide(self, guide: Guide, field: str) -> None:
        if self.tokenizer is None:
            raise InvalidRequestError(
                f"`{field}` needs the model's tokenizer and the served model has none", field
            )
        try:
            guide.check()
        except GrammarError as error:
            raise InvalidRequestError(f"`{field}` is not a valid {error}", field) from None

    def _prompt(self, raw: RawRequest) -> tuple[int, ...]:
        if raw.text is not None and raw.token_ids is not None:
            raise InvalidRequestError(
                f"set one of `{raw.text_field}` and `{raw.token_ids_field}`, not both",
                raw.text_field,
            )
        if raw.text is None and raw.token_ids is None:
            raise InvalidRequestError(
                f"input must not be empty: set `{raw.text_field}` or `{raw.token_ids_field}`",
                raw.text_field,
            )
        if raw.text is not None:
            field = raw.text_field
            if not raw.text:
                raise InvalidRequestError(f"`{field}` must not be empty", field)
            ids = tuple(self.encode(raw.text, field=field))
            if not ids:
                raise InvalidRequestError(f"`{field}` tokenizes to no tokens", field)
        else:
            assert raw.token_ids is not None
            field = raw.token_ids_field
            if not raw.token_ids:
                raise InvalidRequestError(f"`{field}` must not be empty", field)
            ids = _token_ids(field, raw.token_ids, self.limits.vocab_size, None)
        if len(ids) >= self.limits.max_context:
            raise InvalidRequestError(
                f"`{field}` ({len(ids):,} tokens) leaves no room to generate within the "
                f"context limit {self.limits.max_context:,}",
                field,
            )
        return ids


def _request_id(request_id: str, max_length: int) -> str:
    if not request_id:
        return uuid.uuid4().hex
    if len(request_id) > max_length:
        raise InvalidRequestError(
            f"`request_id` must be at most {max_length} characters, got {len(request_id)}",
            "request_id",
        )
    if not request_id.isprintable() or request_id.strip() != request_id:
        raise InvalidRequestError(
            f"`request_id` must be printable with no surrounding spaces, got {request_id!r}",
            "request_id",
        )
    return request_id


def _int_in(name: str, value: int, low: int, high: int) -> int:
    if value < low:
        raise InvalidRequestError(f"`{name}` must be >= {low}, got {value}", name)
    if value > high:
        raise InvalidRequestError(f"`{name}` must be <= {high}, got {value}", name)
    return int(value)


def _temperature(value: float | None, default: float) -> float:
    if value is None:
        return default
    if not (math.isfinite(value) and value >= 0):
        raise InvalidRequestError(
            f"`temperature` must be >= 0 and finite, got {value:g}", "temperature"
        )
    return float(value)


def _top_p(value: float) -> float:
    if not (math.isfinite(value) and 0 < value <= 1):
        raise InvalidRequestError(f"`top_p` must be > 0 and <= 1, got {value:g}", "top_p")
    return float(value)


def _unit_interval(name: str, value: float) -> float:
    if not (math.isfinite(value) and 0 <= value <= 1):
        raise InvalidRequestError(f"`{name}` must be >= 0 and <= 1, got {value:g}", name)
    return float(value)


def _token_ids(
    name: str, ids: Sequence[int], vocab_size: int, max_count: int | None
) -> tuple[int, ...]:
    if max_count is not None and len(ids) > max_count:
        raise InvalidRequestError(
            f"`{name}` must have at most {max_count} ids, got {len(ids)}", name
        )
    for index, token_id in enumerate(ids):
        if not 0 <= token_id < vocab_size:
            raise InvalidRequestError(
                f"`{name}[{index}]` must be >= 0 and < {vocab_size} (the vocabulary size), "
                f"got {token_id}",
                name,
            )
    return tuple(int(i) for i in ids)


def _stop_strings(stop: Sequence[str], limits: ValidationLimits) -> tuple[str, ...]:
    if len(stop) > limits.request.max_stop:
        raise InvalidRequestError(
            f"`stop` must have at most {limits.request.max_stop} strings, got {len(stop)}", "stop"
        )
    for index, text in enumerate(stop):
        if not text:
            raise InvalidRequestError(f"`stop[{index}]` must not be empty", "stop")
        if len(text) > limits.request.max_stop_length:
            raise InvalidRequestError(
                f"`stop[{index}]` must be at most {limits.request.max_stop_length} characters, "
                f"got {len(text)}",
                "stop",
            )
        _check_unicode(f"stop[{index}]", text, "stop")
    return tuple(stop)


def _fixed_speculation(value: bool | None, speculative: bool) -> bool:
    if value and not speculative:
        raise InvalidRequestError(
            "`fixed_speculation` must be unset or false when `speculative` is false, got true",
            "fixed_speculation",
        )
    return bool(value)


def _num_speculative(value: int | None, speculative: bool, limits: ValidationLimits) -> int | None:
    if value is None:
        return None
    if not speculative:
        raise InvalidRequestError(
            f"`num_speculative_tokens` must be unset when `speculative` is false, got {value}",
            "num_speculative_tokens",
        )
    if value < 1:
        raise InvalidRequestError(
            f"`num_speculative_tokens` must be >= 1 (set `speculative` to false for "
            f"target-only decoding), got {value}",
            "num_speculative_tokens",
        )
    return _int_in("num_speculative_tokens", value, 1, limits.max_num_speculative_tokens)


def _check_unicode(name: str, text: str, param: str | None = None) -> None:
    # JSON can carry lone surrogates ("\ud800"), which no tokenizer can encode.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidRequestError(
            f"`{name}` must be valid Unicode, got a lone surrogate "
            f"{text[error.start]!r} at character {error.start}",
            param or name,
        ) from None
