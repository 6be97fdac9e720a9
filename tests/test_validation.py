"""Validation at the edge: typed requests out, and TGI-style messages that
name the field, the limit and the value given."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from specray.deploy.errors import InvalidRequestError
from specray.deploy.limits import LimitsConfig
from specray.deploy.validation import RawRequest, ValidatedRequest, ValidationLimits, Validator

LIMITS = ValidationLimits(max_context=4096, vocab_size=151936, max_num_speculative_tokens=8)


def validate(limits: ValidationLimits = LIMITS, **fields: Any) -> ValidatedRequest:
    raw = RawRequest(**({"token_ids": [1, 2, 3]} | fields))
    return Validator(limits, tokenizer=None).validate(raw)


def message_of(limits: ValidationLimits = LIMITS, **fields: Any) -> str:
    with pytest.raises(InvalidRequestError) as caught:
        validate(limits, **fields)
    return str(caught.value)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"temperature": math.nan}, "`temperature` must be >= 0 and finite, got nan"),
        ({"temperature": -0.5}, "`temperature` must be >= 0 and finite, got -0.5"),
        ({"temperature": math.inf}, "`temperature` must be >= 0 and finite, got inf"),
        ({"max_tokens": 100000}, "`max_tokens` must be <= 2048, got 100000"),
        ({"max_tokens": 0}, "`max_tokens` must be >= 1, got 0"),
        ({"top_p": 0.0}, "`top_p` must be > 0 and <= 1, got 0"),
        ({"top_p": 1.5}, "`top_p` must be > 0 and <= 1, got 1.5"),
        ({"top_k": 200000}, "`top_k` must be <= 151936, got 200000"),
        ({"top_k": -1}, "`top_k` must be >= 0, got -1"),
        ({"min_p": 1.5}, "`min_p` must be >= 0 and <= 1, got 1.5"),
        ({"seed": -1}, "`seed` must be >= 0, got -1"),
        ({"seed": 2**64}, f"`seed` must be <= {2**64 - 1}, got {2**64}"),
        ({"token_ids": []}, "`token_ids` must not be empty"),
        ({"token_ids": None}, "input must not be empty: set `text` or `token_ids`"),
        ({"text": "", "token_ids": None}, "`text` must not be empty"),
        ({"text": "hi"}, "set one of `text` and `token_ids`, not both"),
        (
            {"token_ids": [5, 200000]},
            "`token_ids[1]` must be >= 0 and < 151936 (the vocabulary size), got 200000",
        ),
        (
            {"stop_token_ids": [-3]},
            "`stop_token_ids[0]` must be >= 0 and < 151936 (the vocabulary size), got -3",
        ),
        ({"stop": ["a"] * 9}, "`stop` must have at most 8 strings, got 9"),
        ({"stop": ["ok", ""]}, "`stop[1]` must not be empty"),
        ({"stop": ["x" * 300]}, "`stop[0]` must be at most 256 characters, got 300"),
        ({"num_speculative_tokens": 9}, "`num_speculative_tokens` must be <= 8, got 9"),
        (
            {"num_speculative_tokens": 0},
            "`num_speculative_tokens` must be >= 1 (set `speculative` to false for "
            "target-only decoding), got 0",
        ),
        (
            {"speculative": False, "num_speculative_tokens": 4},
            "`num_speculative_tokens` must be unset when `speculative` is false, got 4",
        ),
        (
            {"speculative": False, "fixed_speculation": True},
            "`fixed_speculation` must be unset or false when `speculative` is false, got true",
        ),
        ({"request_id": "r" * 129}, "`request_id` must be at most 128 characters, got 129"),
        ({"request_id": " id"}, "`request_id` must be printable with no surrounding spaces"),
    ],
)
def test_messages_name_the_field_the_limit_and_the_value(
    fields: dict[str, Any], message: str
) -> None:
    assert message in message_of(**fields)


def test_prompt_plus_max_tokens_over_the_context_limit() -> None:
    limits = ValidationLimits(
        max_context=4096,
        vocab_size=151936,
        max_num_speculative_tokens=8,
        request=LimitsConfig(max_tokens=8192),
    )
    message = message_of(limits, token_ids=[7] * 1000, max_tokens=4000)
    assert message == (
        "prompt (1,000 tokens) + `max_tokens` (4,000) = 5,000 exceeds the context limit 4,096"
    )
    # A prompt that alone fills the context leaves no room even for the default.
    assert "leaves no room to generate within the context limit 4,096" in message_of(
        limits, token_ids=[7] * 4096
    )


def test_defaults_and_zero_are_different() -> None:
    unset = validate()
    greedy = validate(temperature=0.0, top_k=0, seed=0)
    assert unset.sampling.temperature == 1.0
    assert greedy.sampling.temperature == 0.0 and greedy.sampling.greedy
    assert unset.sampling.seed is None and greedy.sampling.seed == 0
    assert unset.stopping.max_tokens == 256
    assert unset.speculative and unset.num_speculative_tokens is None
    assert not unset.fixed_speculation and validate(fixed_speculation=True).fixed_speculation


def test_default_max_tokens_shrinks_to_fit_the_context() -> None:
    request = validate(token_ids=[1] * 4000)
    assert request.stopping.max_tokens == 96


def test_request_ids_are_kept_or_made_up() -> None:
    assert validate(request_id="trace-42").request_id == "trace-42"
    made_up = {validate().request_id for _ in range(3)}
    assert len(made_up) == 3


def test_text_needs_a_tokenizer() -> None:
    message = message_of(token_ids=None, text="hello")
    assert "needs a tokenizer" in message


def test_wire_names_of_the_prompt_appear_in_messages() -> None:
    raw = RawRequest(token_ids=[], text_field="prompt", token_ids_field="prompt")
    with pytest.raises(InvalidRequestError, match="`prompt` must not be empty"):
        Validator(LIMITS, None).validate(raw)


@given(
    prompt=st.lists(st.integers(0, LIMITS.vocab_size - 1), min_size=1, max_size=64),
    max_tokens=st.integers(1, LIMITS.request.max_tokens),
    temperature=st.floats(0, 5),
    top_p=st.floats(0, 1, exclude_min=True),
    top_k=st.integers(0, LIMITS.vocab_size),
    seed=st.integers(0, 2**64 - 1),
    speculative=st.booleans(),
)
def test_valid_requests_pass_through_unchanged(
    prompt: list[int],
    max_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int,
    speculative: bool,
) -> None:
    request = Validator(LIMITS, None).validate(
        RawRequest(
            token_ids=prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            speculative=speculative,
            stop=["\n\n"],
            stop_token_ids=[2],
            ignore_eos=True,
        )
    )
    assert request.prompt_ids == tuple(prompt)
    assert request.prompt_tokens == len(prompt)
    sampling, stopping = request.sampling, request.stopping
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.seed) == (
        temperature,
        top_p,
        top_k,
        seed,
    )
    assert (stopping.max_tokens, stopping.stop, stopping.stop_token_ids) == (
        max_tokens,
        ("\n\n",),
        (2,),
    )
    assert stopping.ignore_eos and request.speculative == speculative
