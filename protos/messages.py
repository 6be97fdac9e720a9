"""Building and reading ``specray.v1`` messages, shared by every client
(the Python client, the serving benchmark): nothing but the generated stubs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from specray.protos.specray.v1 import generation_pb2 as pb

FINISH_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}


def build_request(
    prompt: str | Sequence[int],
    *,
    request_id: str = "",
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    seed: int | None = None,
    speculative: bool | None = None,
    num_speculative_tokens: int | None = None,
    fixed_speculation: bool | None = None,
    guided_json: str | None = None,
    guided_json_object: bool | None = None,
    guided_regex: str | None = None,
    guided_choice: Sequence[str] | None = None,
) -> pb.GenerateRequest:
    """A GenerateRequest; None leaves a field unset (the server's default).
    At most one ``guided_*`` constrains the output (structured output)."""
    optional = {
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "min_p": min_p,
        "seed": seed,
        "speculative": speculative,
        "num_speculative_tokens": num_speculative_tokens,
        "fixed_speculation": fixed_speculation,
        "guided_json": guided_json,
        "guided_json_object": guided_json_object,
        "guided_regex": guided_regex,
    }
    fields: dict[str, Any] = {k: v for k, v in optional.items() if v is not None}
    if isinstance(prompt, str):
        fields["text"] = prompt
    else:
        fields["token_ids"] = pb.TokenIds(ids=list(prompt))
    if guided_choice is not None:
        fields["guided_choice"] = pb.GuidedChoice(choices=list(guided_choice))
    return pb.GenerateRequest(
        request_id=request_id,
        stop=list(stop),
        stop_token_ids=list(stop_token_ids),
        ignore_eos=ignore_eos,
        **fields,
    )
