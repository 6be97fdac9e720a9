"""The ``limits`` section reaching the validator."""

from __future__ import annotations

from dataclasses import fields

from specray.deploy.backend import ModelInfo
from specray.deploy.config import LimitsConfig, ServeConfig
from specray.deploy.validation import ValidationLimits

INFO = ModelInfo("t", ("ngram",), 4096, "bfloat16", 2, 151936, 8)
MODEL_LIMITS = {"max_context", "vocab_size", "max_num_speculative_tokens"}


def test_every_request_limit_is_a_config_key() -> None:
    request_limits = {field.name for field in fields(ValidationLimits)} - MODEL_LIMITS
    assert request_limits <= set(LimitsConfig.model_fields)


def test_validation_limits_take_the_model_and_the_config() -> None:
    config = ServeConfig.model_validate(
        {"limits": {"max_tokens": 100, "max_stop": 2, "max_prompt_chars": 500}}
    )
    # The unset keys' defaults are the validator's own.
    assert config.validation_limits(INFO) == ValidationLimits(
        4096, 151936, 8, max_tokens=100, max_stop=2, max_prompt_chars=500
    )
