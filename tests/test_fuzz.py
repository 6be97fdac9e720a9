"""Bad input, fuzzed: over 1,000 malformed or out-of-range requests through
gRPC (typed, and raw bytes on the wire) and the OpenAI HTTP API (typed JSON,
and raw bodies) against one real server on 127.0.0.1 (the in-process engine
on a tiny model with a real tokenizer). Every one must be refused with
INVALID_ARGUMENT / HTTP 4xx and a message that names the field; after each
class the server is still SERVING, holds no request, and a valid request
gives the same greedy output as before the fuzzing.

Each class of bad input (tests/fuzz_strategies.py) runs its own quota of
examples and asserts it ran them all; the quotas add up to at least 1,000.
``SPECRAY_FUZZ_REPORT=fuzz.md`` writes what each class got as a Markdown
table (the figures in docs/reliability.md).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import requests
from fuzz_http_strategies import body_classes, http_value_classes
from fuzz_strategies import (
    PROBE,
    Case,
    HttpCase,
    Strategy,
    Wire,
    grpc_request,
    grpc_value_classes,
    wire_classes,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from serving_helpers import ServingThread, save_served_model, serve_config

from specray.deploy.strict_decoding import Undecodable, strict_decoder
from specray.protos.messages import build_request
from specray.protos.specray.v1 import generation_pb2 as pb
from specray.protos.specray.v1 import generation_pb2_grpc as pb_grpc

GRPC_VALUES = grpc_value_classes()
WIRE = wire_classes()
HTTP_VALUES = http_value_classes()
BODIES = body_classes()
# Examples per class, by family: together at least 1,000 requests.
QUOTA = {"grpc": 20, "wire": 45, "http": 16, "body": 25}
TOTAL = (
    QUOTA["grpc"] * len(GRPC_VALUES)
    + QUOTA["wire"] * len(WIRE)
    + QUOTA["http"] * len(HTTP_VALUES)
    + QUOTA["body"] * len(BODIES)
)
assert TOTAL >= 1000, TOTAL
ANY_FIELD = re.compile(r"`[a-z_]+(\[\d+\]|\.\w+)*`")


def quota(family: str) -> settings:
    return settings(
        max_examples=QUOTA[family],
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def names(field: str) -> re.Pattern[str]:
    """A message naming ``field`` (``stop`` also as ``stop[3]``, ``token_ids.ids``)."""
    return re.compile(rf"`{re.escape(field)}(\[\d+\]|\.\w+)*`")


@dataclass
class Tally:
    """What each class of bad input got: written as a Markdown table to
    $SPECRAY_FUZZ_REPORT when it is set."""

    outcomes: dict[tuple[str, str], Counter[str]] = field(default_factory=dict)

    def record(self, door: str, kind: str, outcome: str, times: int = 1) -> None:
        self.outcomes.setdefault((door, kind), Counter())[outcome] += times

    def markdown(self) -> str:
        lines = ["| door | bad input | requests | outcome |", "|---|---|---:|---|"]
        for (door, kind), counts in sorted(self.outcomes.items()):
            outcome = ", ".join(f"{name} ({n})" for name, n in counts.most_common())
            lines.append(f"| {door} | {kind} | {sum(counts.values())} | {outcome} |")
        total = sum(sum(counts.values()) for counts in self.outcomes.values())
        return "\n".join([*lines, f"| | **total** | **{total}** | |"]) + "\n"


@dataclass(frozen=True)
class Target:
    server: ServingThread
    channel: grpc.Channel
    http: requests.Session
    baseline: tuple[list[int], str]  # the probe's greedy output before any fuzzing
    tally: Tally


def probe(channel: grpc.Channel) -> tuple[list[int], str]:
    request = build_request(PROBE, max_tokens=8, temperature=0, ignore_eos=True)
    response = pb_grpc.GenerationStub(channel).Generate(request, timeout=60)
    return list(response.token_ids), response.text


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    model_dir = save_served_model(tmp_path_factory.mktemp("served"))
    tally = Tally()
    with (
        ServingThread(serve_config(model_dir, http_port=0)) as server,
        grpc.insecure_channel(server.grpc_address) as channel,
        requests.Session() as http,
    ):
        yield Target(server, channel, http, probe(channel), tally)
    report = os.environ.get("SPECRAY_FUZZ_REPORT")
    if report:
        Path(report).write_text(tally.markdown())


def assert_still_serving(target: Target) -> None:
    """Health SERVING on both doors, nothing in flight, and the probe's
    greedy output unchanged on both."""
    health = health_pb2_grpc.HealthStub(target.channel)
    check = health.Check(health_pb2.HealthCheckRequest(service="specray.v1.Generation"), timeout=30)
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    assert target.http.get(f"{target.server.http_url}/health", timeout=30).status_code == 200
    assert target.server.service.gateway.num_in_flight == 0
    assert probe(target.channel) == target.baseline
    body = {"prompt": PROBE, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    reply = target.http.post(f"{target.server.http_url}/v1/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["text"] == target.baseline[1]


def grpc_refusal(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def code_name(error: grpc.RpcError) -> str:
    code = error.code()
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


def run_examples(family: str, strategy: Strategy, check: Callable[[object, bool], bool]) -> int:
    """Run ``check`` on ``QUOTA[family]`` examples (with streaming on or
    off); ``check`` returns False for an example that is not bad input after
    all. Returns how many ran."""
    ran = 0

    @quota(family)
    @given(sample=strategy, stream=st.booleans())
    def examples(sample: object, stream: bool) -> None:
        nonlocal ran
        ran += check(sample, stream)

    examples()
    return ran


@pytest.mark.parametrize("kind", sorted(GRPC_VALUES))
def test_grpc_refuses_out_of_range_values_naming_the_field(target: Target, kind: str) -> None:
    stub = pb_grpc.GenerationStub(target.channel)

    def check(case: object, stream: bool) -> bool:
        assert isinstance(case, Case)
        request = grpc_request(case.fields)
        if stream:
            error = grpc_refusal(lambda: list(stub.GenerateStream(request, timeout=30)))
        else:
            error = grpc_refusal(lambda: stub.Generate(request, timeout=30))
        target.tally.record("gRPC", kind, code_name(error))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, error.details())
        assert names(case.field).search(error.details() or ""), (case, error.details())
        return True

    assert run_examples("grpc", GRPC_VALUES[kind], check) == QUOTA["grpc"]
    assert_still_serving(target)


@pytest.mark.parametrize("kind", sorted(WIRE))
def test_grpc_refuses_malformed_wire_bytes_naming_the_field(target: Target, kind: str) -> None:
    """Raw bytes through a generic call (identity serializers)."""
    generate = target.channel.unary_unary("/specray.v1.Generation/Generate")
    generate_stream = target.channel.unary_stream("/specray.v1.Generation/GenerateStream")
    decode = strict_decoder(pb.GenerateRequest)

    def check(sample: object, stream: bool) -> bool:
        assert isinstance(sample, Wire)
        local = decode(sample.data)
        # Random bytes can swallow the NaN suffix into a field of their own
        # and decode to a valid request; those are not bad input.
        if not (isinstance(local, Undecodable) or math.isnan(local.temperature)):
            assume(False)
        if stream:
            error = grpc_refusal(lambda: list(generate_stream(sample.data, timeout=30)))
        else:
            error = grpc_refusal(lambda: generate(sample.data, timeout=30))
        target.tally.record("gRPC wire", kind, code_name(error))
        details = error.details() or ""
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (sample, details)
        if isinstance(local, Undecodable):  # the server says what the strict decoder says
            assert details == local.reason, (sample, details)
            assert details.startswith("malformed specray.v1.GenerateRequest: ")
        else:  # decoded, then refused by validation, which names a field
            assert ANY_FIELD.search(details), (sample, details)
        assert sample.named in details, (sample, details)
        return True

    assert run_examples("wire", WIRE[kind], check) == QUOTA["wire"]
    assert_still_serving(target)


def assert_refused(reply: requests.Response, field: str) -> None:
    assert 400 <= reply.status_code < 500, (field, reply.status_code, reply.text)
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == reply.status_code
    if field:
        assert names(field).search(error["message"]), (field, error)
        assert error["param"] == field, (field, error)


@pytest.mark.parametrize("kind", sorted(HTTP_VALUES))
def test_http_refuses_bad_json_values_naming_the_field(target: Target, kind: str) -> None:
    url = target.server.http_url

    def check(sample: object, stream: bool) -> bool:
        assert isinstance(sample, HttpCase)
        fields = sample.case.fields
        fields = fields if "stream" in fields else fields | {"stream": stream}
        # NaN, Infinity and lone surrogates are what Python's json sends.
        body = json.dumps(fields, allow_nan=True).encode()
        headers = {"content-type": "application/json"}
        reply = target.http.post(f"{url}{sample.path}", data=body, headers=headers, timeout=30)
        target.tally.record("HTTP", kind, f"HTTP {reply.status_code}")
        assert_refused(reply, sample.case.field)
        return True

    assert run_examples("http", HTTP_VALUES[kind], check) == QUOTA["http"]
    assert_still_serving(target)


@pytest.mark.parametrize("kind", sorted(BODIES))
def test_http_refuses_malformed_bodies(target: Target, kind: str) -> None:
    url = target.server.http_url

    def check(sample: object, chat: bool) -> bool:
        assert isinstance(sample, Wire)
        path = "/v1/chat/completions" if chat else "/v1/completions"
        named = "messages" if sample.named and chat else sample.named
        headers = {"content-type": "application/json"}
        reply = target.http.post(f"{url}{path}", data=sample.data, headers=headers, timeout=30)
        target.tally.record("HTTP", kind, f"HTTP {reply.status_code}")
        assert_refused(reply, named)
        return True

    assert run_examples("body", BODIES[kind], check) == QUOTA["body"]
    assert_still_serving(target)


def test_http_body_over_the_limit_is_413(target: Target) -> None:
    url = f"{target.server.http_url}/v1/completions"
    limit = target.server.service.config.limits.max_request_bytes
    body = json.dumps({"prompt": "a" * limit}).encode()
    headers = {"content-type": "application/json"}
    reply = target.http.post(url, data=body, headers=headers)
    assert reply.status_code == 413
    assert f"at most {limit:,} bytes, got {len(body):,}" in reply.json()["error"]["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: cut off once past the limit
        yield body

    reply = target.http.post(url, data=chunks(), headers=headers)
    assert reply.status_code == 413 and reply.json()["error"]["code"] == 413
    target.tally.record("HTTP", "body over max_request_bytes", "HTTP 413", 2)
    assert_still_serving(target)


def test_grpc_message_over_the_limit_is_resource_exhausted(target: Target) -> None:
    limit = target.server.service.config.limits.max_request_bytes
    request = build_request([300] * (limit // 2 + 1), max_tokens=1)  # 2 bytes per id
    error = grpc_refusal(lambda: pb_grpc.GenerationStub(target.channel).Generate(request))
    target.tally.record("gRPC", "message over max_request_bytes", code_name(error))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_still_serving(target)
