"""The ``limits`` section reaching the validator."""

from __future__ import annotations

import pytest

from specray.deploy.backend import ModelInfo
from specray.deploy.config import ServeConfig
from specray.deploy.errors import InvalidRequestError
from specray.deploy.limits import LimitsConfig
from specray.deploy.validation import RawRequest, ValidationLimits, Validator

INFO = ModelInfo("t", ("ngram",), 4096, "bfloat16", 2, 151936, 8)


def test_validation_limits_take_the_model_and_the_config() -> None:
    config = ServeConfig.model_validate(
        {"limits": {"max_tokens": 100, "max_stop": 2, "max_prompt_chars": 500}}
    )
    limits = config.validation_limits(INFO)
    assert (limits.max_context, limits.vocab_size, limits.max_num_speculative_tokens) == (
        4096,
        151936,
        8,
    )
    assert limits.request == config.limits
    # The keys left unset keep the one set of defaults.
    assert limits.request.default_max_tokens == LimitsConfig().default_max_tokens
    assert limits.prompt_char_limit == 500


def test_a_configured_limit_is_the_one_the_validator_enforces() -> None:
    config = ServeConfig.model_validate({"limits": {"max_stop": 2, "max_tokens": 100}})
    validator = Validator(config.validation_limits(INFO), tokenizer=None)
    ok = validator.validate(RawRequest(token_ids=[1, 2], stop=["a", "b"], max_tokens=100))
    assert ok.stopping.max_tokens == 100
    with pytest.raises(InvalidRequestError, match="at most 2 strings, got 3"):
        validator.validate(RawRequest(token_ids=[1, 2], stop=["a", "b", "c"]))
    with pytest.raises(InvalidRequestError, match="100"):
        validator.validate(RawRequest(token_ids=[1, 2], max_tokens=101))


def test_unset_limits_are_the_config_defaults() -> None:
    unset = ValidationLimits(max_context=4096, vocab_size=151936, max_num_speculative_tokens=8)
    assert unset.request == LimitsConfig()
    assert unset.prompt_char_limit == 32 * 4096
