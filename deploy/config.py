"""The ``specray serve`` configuration: a YAML or JSON file, every key optional.

target: qwen2.5-coder-0.5b-instruct
draft: ngram            # none | ngram | a draft model's name or path
dtype: bfloat16
k: 4                    # draft tokens per round (its ceiling when adaptive)
max_batch: 8
max_len: 4096
host: 127.0.0.1         # binding elsewhere is an explicit choice
port: 50051             # gRPC; 0 picks a free port
http_port: 8000         # OpenAI-compatible HTTP; null turns it off
limits:
  max_tokens: 2048
  max_queued_requests: 64
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from specray.actors.engine.factory import EngineSpec
from specray.deploy.backend import ModelInfo
from specray.deploy.validation import ValidationLimits


class LimitsConfig(BaseModel):
    """What one request may ask for, and how many may wait."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(2048, ge=1, description="cap on a request's max_tokens")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when unset")
    default_temperature: float = Field(1.0, ge=0, description="temperature when unset")
    max_stop: int = Field(8, ge=0, description="stop strings per request")
    max_stop_length: int = Field(256, ge=1, description="characters per stop string")
    max_stop_token_ids: int = Field(32, ge=0)
    max_request_id_length: int = Field(128, ge=1)
    max_queued_requests: int = Field(
        64, ge=0, description="requests waiting beyond max_batch; more get RESOURCE_EXHAUSTED"
    )
    retry_after_s: float = Field(1.0, gt=0, description="retry hint sent when overloaded")


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # The engine (see specray.actors.engine.factory.EngineSpec).
    target: str = "qwen2.5-coder-0.5b-instruct"
    draft: str = "ngram"
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    k: int = Field(4, ge=0, description="draft tokens per round, or its ceiling")
    adaptive: bool = True
    max_batch: int = Field(8, ge=1)
    max_len: int = Field(4096, ge=2, description="KV cache length: prompt + output")
    home: Path | None = Field(None, description="model store (default $SPECRAY_HOME)")
    threads: int | None = Field(None, ge=1, description="torch threads (default: all cores)")

    # The servers.
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    http_port: int | None = Field(8000, ge=0, le=65535)
    address: str | None = Field(None, description="a Ray cluster to join (router backend)")
    drain_timeout_s: float = Field(30.0, ge=0, description="wait this long for in-flight work")

    limits: LimitsConfig = Field(default_factory=lambda: LimitsConfig.model_validate({}))

    def engine_spec(self) -> EngineSpec:
        return EngineSpec(
            target=self.target,
            draft=self.draft,
            dtype=self.dtype,
            num_speculative_tokens=self.k,
            adaptive=self.adaptive,
            max_batch=self.max_batch,
            max_len=self.max_len,
            home=self.home,
        )

    def validation_limits(self, info: ModelInfo) -> ValidationLimits:
        limits = self.limits
        return ValidationLimits(
            max_context=info.max_context,
            vocab_size=info.vocab_size,
            max_num_speculative_tokens=info.max_num_speculative_tokens,
            max_tokens=limits.max_tokens,
            default_max_tokens=limits.default_max_tokens,
            default_temperature=limits.default_temperature,
            max_stop=limits.max_stop,
            max_stop_length=limits.max_stop_length,
            max_stop_token_ids=limits.max_stop_token_ids,
            max_request_id_length=limits.max_request_id_length,
        )


def load_config(path: Path | None) -> ServeConfig:
    """The file's settings over the defaults (JSON is read as YAML)."""
    if path is None:
        return ServeConfig.model_validate({})
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return ServeConfig.model_validate(data)
