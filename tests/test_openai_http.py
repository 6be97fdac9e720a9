"""The OpenAI-compatible HTTP layer, with a plain HTTP client (urllib)
against a real server on 127.0.0.1 over the in-process engine."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from typing import Any
from urllib.error import HTTPError

import grpc
import pytest
from serving_helpers import ServingThread, save_served_model, serve_config, wait_until
from transformers import AutoTokenizer

from specray.deploy.client import SpecrayClient
from specray.protos.messages import build_request
from specray.protos.specray.v1 import generation_pb2_grpc as pb_grpc

PROMPT = "x = [1, 2, 3]\ny = [1, 2, 3]\n"
MESSAGES = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "def add(a, b):"},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_served_model(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[ServingThread]:
    with ServingThread(serve_config(model_dir, http_port=0)) as serving:
        yield serving


def request(url: str, body: dict[str, Any] | None = None) -> tuple[int, Any, Message]:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=60) as r:
            raw = r.read().decode()
            return (
                r.status,
                raw if "text/plain" in r.headers["content-type"] else json.loads(raw),
                r.headers,
            )
    except HTTPError as error:
        return error.code, json.loads(error.read()), error.headers


def events(url: str, body: dict[str, Any]) -> list[str]:
    """The ``data:`` payloads of an SSE response, in order."""
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=60) as r:
        assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = r.read().decode().splitlines()
    return [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


def test_completions_match_the_grpc_api(server: ServingThread) -> None:
    body = {"prompt": PROMPT, "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    status, result, _ = request(f"{server.http_url}/v1/completions", body)
    assert status == 200
    assert result["object"] == "text_completion" and result["id"].startswith("cmpl-")
    choice = result["choices"][0]
    assert choice["finish_reason"] == "length"
    with SpecrayClient(server.grpc_address, timeout_s=60) as client:
        expected = client.generate(PROMPT, max_tokens=20, temperature=0, ignore_eos=True)
    assert choice["text"] == expected.text
    assert result["usage"] == {
        "prompt_tokens": expected.prompt_tokens,
        "completion_tokens": 20,
        "total_tokens": expected.prompt_tokens + 20,
    }


def test_completions_stream_ends_with_done(server: ServingThread) -> None:
    body = {"prompt": PROMPT, "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    _, whole, _ = request(f"{server.http_url}/v1/completions", body)
    payloads = events(f"{server.http_url}/v1/completions", body | {"stream": True})
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert len(chunks) >= 2
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert all("usage" in c for c in chunks)
    assert chunks[-1]["usage"] == whole["usage"]


def test_completions_take_token_ids(server: ServingThread) -> None:
    body = {"prompt": [5, 9, 5, 9], "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    status, result, _ = request(f"{server.http_url}/v1/completions", body)
    assert status == 200 and result["usage"]["prompt_tokens"] == 4


def test_chat_completions_apply_the_chat_template(server: ServingThread, model_dir: Path) -> None:
    body = {"messages": MESSAGES, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    status, result, _ = request(f"{server.http_url}/v1/chat/completions", body)
    assert status == 200 and result["object"] == "chat.completion"
    message = result["choices"][0]["message"]
    assert message["role"] == "assistant"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    with SpecrayClient(server.grpc_address, timeout_s=60) as client:
        expected = client.generate(prompt_ids, max_tokens=12, temperature=0, ignore_eos=True)
    assert message["content"] == expected.text
    assert result["usage"]["prompt_tokens"] == len(prompt_ids)
    assert result["choices"][0]["finish_reason"] == "length"

    payloads = events(f"{server.http_url}/v1/chat/completions", body | {"stream": True})
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == expected.text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_models_health_and_metrics(server: ServingThread, model_dir: Path) -> None:
    status, models, _ = request(f"{server.http_url}/v1/models")
    assert status == 200 and models["object"] == "list"
    assert models["data"][0]["id"] == str(model_dir)
    assert models["data"][0]["max_model_len"] == 512
    assert request(f"{server.http_url}/health")[:2] == (200, {"status": "serving"})
    status, metrics, headers = request(f"{server.http_url}/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert "specray_http_requests_total" in metrics
    assert "specray_requests_in_flight" in metrics


@pytest.mark.parametrize(
    ("body", "status", "error_type", "message"),
    [
        ({"temperature": -1}, 400, "invalid_request_error", "`temperature` must be >= 0"),
        ({"temperature": "hot"}, 400, "invalid_request_error", "`temperature`"),
        ({"max_tokens": 100000}, 400, "invalid_request_error", "`max_tokens` must be <= 256"),
        ({"prompt": ""}, 400, "invalid_request_error", "`prompt` must not be empty"),
        ({"n": 2}, 400, "invalid_request_error", "`n` must be 1, got 2"),
        ({"model": "gpt-4"}, 404, "model_not_found", "'gpt-4' is not served here"),
        ({"guided_regex": "[0-9"}, 400, "invalid_request_error", "`guided_regex` is not a valid"),
        (
            {"guided_regex": "a", "guided_choice": ["b"]},
            400,
            "invalid_request_error",
            "set at most one of",
        ),
    ],
)
def test_errors_are_json_with_http_codes(
    server: ServingThread, body: dict[str, Any], status: int, error_type: str, message: str
) -> None:
    got, result, _ = request(f"{server.http_url}/v1/completions", {"prompt": PROMPT} | body)
    assert got == status
    assert result["error"]["type"] == error_type and result["error"]["code"] == status
    assert message in result["error"]["message"]


def test_response_format_json_schema_constrains_the_chat_answer(server: ServingThread) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
        "x-guidance": {"whitespace_flexible": False},
    }
    body = {
        "messages": MESSAGES,
        "max_tokens": 32,
        "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}},
    }
    status, result, _ = request(f"{server.http_url}/v1/chat/completions", body)
    assert status == 200
    answer = result["choices"][0]
    assert answer["finish_reason"] == "stop"
    assert set(json.loads(answer["message"]["content"])) == {"ok"}


@pytest.mark.parametrize("stream", [False, True])
def test_overload_is_429_with_retry_after(server: ServingThread, stream: bool) -> None:
    server.backend.pause()  # max_batch 2 + 1 queued stay in flight
    try:
        with grpc.insecure_channel(server.grpc_address) as channel:
            stub = pb_grpc.GenerationStub(channel)
            calls = [stub.GenerateStream(build_request(PROMPT, max_tokens=4)) for _ in range(3)]
            wait_until(lambda: server.service.gateway.num_in_flight == 3)
            body = {"prompt": PROMPT, "max_tokens": 4, "stream": stream}
            status, result, headers = request(f"{server.http_url}/v1/completions", body)
            for call in calls:
                call.cancel()
    finally:
        server.backend.resume()
    assert status == 429 and result["error"]["type"] == "overloaded_error"
    assert headers["Retry-After"] == "1"
    wait_until(lambda: server.service.gateway.num_in_flight == 0)


def test_client_disconnect_frees_the_request(server: ServingThread) -> None:
    body = {"prompt": PROMPT, "max_tokens": 256, "ignore_eos": True, "stream": True}
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    response = urllib.request.urlopen(
        urllib.request.Request(f"{server.http_url}/v1/completions", data, headers), timeout=60
    )
    assert response.readline().startswith(b"data: ")
    server.backend.pause()  # so it is surely still running when the client goes
    try:
        assert server.service.gateway.num_in_flight == 1
        response.close()
        wait_until(lambda: server.service.gateway.num_in_flight == 0)
    finally:
        server.backend.resume()
    state = server.call(server.backend.snapshot())
    assert not state.running and not state.waiting and state.target_slots == 0


def test_loading_is_503(model_dir: Path) -> None:
    with ServingThread(serve_config(model_dir, http_port=0), load=False) as server:
        assert request(f"{server.http_url}/health")[:2] == (503, {"status": "loading"})
        status, result, _ = request(f"{server.http_url}/v1/completions", {"prompt": PROMPT})
        assert status == 503 and "loading" in result["error"]["message"]
        assert request(f"{server.http_url}/v1/models")[0] == 503
