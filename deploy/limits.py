"""The ``limits`` section of the serve configuration: what one request may
ask for (the validator checks it), how many may wait and how large a
message may be (the front doors check those)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


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
    max_prompt_chars: int | None = Field(
        None, ge=1, description="characters of text input; default 32 per token of context"
    )
    max_request_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="a gRPC message or HTTP body; larger are refused"
    )
