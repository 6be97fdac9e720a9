"""Overload, end to end: a real server on 127.0.0.1 (the in-process engine
on a tiny model) with room for ``max_batch`` (2) running plus
``max_queued_requests`` (2) waiting. With the engine held, so that nothing
can finish, the requests past that bound are refused at once through every
door (gRPC unary and streaming: RESOURCE_EXHAUSTED with the retry hint in
trailing metadata; HTTP plain and streaming: 429 with Retry-After). Once the
engine runs again, every admitted request finishes with its undisturbed
greedy output, nothing stays in flight, and the full capacity is free again.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_helpers import ServingThread, save_served_model, serve_config, wait_until

from specray.deploy.client import SpecrayClient, SpecrayError
from specray.deploy.errors import RETRY_PUSHBACK_KEY
from specray.protos.messages import build_request
from specray.protos.specray.v1 import generation_pb2_grpc as pb_grpc

MAX_BATCH, MAX_QUEUED, RETRY_AFTER_S = 2, 2, 2.5
CAPACITY = MAX_BATCH + MAX_QUEUED
PROMPTS = ["def add(a, b):", "for i in range(10):", "class Point:", "x = [1, 2, 3]"]
OPTIONS: dict[str, Any] = {"max_tokens": 12, "temperature": 0, "ignore_eos": True}
# A call that was queued instead of refused would wait for the held engine;
# this deadline turns that into a failure rather than a hang.
REFUSAL_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServingThread]:
    model_dir = save_served_model(tmp_path_factory.mktemp("served"))
    limits = {"max_tokens": 256, "max_queued_requests": MAX_QUEUED, "retry_after_s": RETRY_AFTER_S}
    config = serve_config(model_dir, http_port=0, max_batch=MAX_BATCH, limits=limits)
    with ServingThread(config) as serving:
        yield serving


@pytest.fixture(scope="module")
def expected(server: ServingThread) -> dict[str, str]:
    """Each prompt's greedy text, one request at a time."""
    with SpecrayClient(server.grpc_address, timeout_s=60) as client:
        return {prompt: client.generate(prompt, **OPTIONS).text for prompt in PROMPTS}


def http_completion(server: ServingThread, prompt: str, stream: bool = False) -> requests.Response:
    body = {"prompt": prompt, "stream": stream, **OPTIONS}
    return requests.post(f"{server.http_url}/v1/completions", json=body, timeout=120)


def streamed_text(reply: requests.Response) -> str:
    lines = [line for line in reply.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1])


@contextmanager
def held_engine(
    server: ServingThread,
) -> Iterator[tuple[ThreadPoolExecutor, grpc.Channel, SpecrayClient]]:
    """The engine held, so that nothing can finish, with a pool, a channel and
    a client to fill it and be refused; it runs again on the way out, even
    after a failed check, so that the other tests find it running."""
    server.backend.pause()
    try:
        with (
            ThreadPoolExecutor(CAPACITY) as pool,
            grpc.insecure_channel(server.grpc_address) as channel,
            SpecrayClient(server.grpc_address) as client,
        ):
            yield pool, channel, client
    finally:
        server.backend.resume()


def fill_to_capacity(
    server: ServingThread, channel: grpc.Channel, pool: ThreadPoolExecutor
) -> list[Future[str]]:
    """CAPACITY requests through all four kinds of call, admitted and held;
    each future gives the request's text once the engine runs."""
    stub = pb_grpc.GenerationStub(channel)
    unary = stub.Generate.future(build_request(PROMPTS[0], **OPTIONS), timeout=120)
    stream = stub.GenerateStream(build_request(PROMPTS[1], **OPTIONS), timeout=120)
    futures = [
        pool.submit(lambda: unary.result().text),
        pool.submit(lambda: "".join(chunk.text for chunk in stream)),
        pool.submit(lambda: http_completion(server, PROMPTS[2]).json()["choices"][0]["text"]),
        pool.submit(lambda: streamed_text(http_completion(server, PROMPTS[3], stream=True))),
    ]
    wait_until(lambda: server.service.gateway.num_in_flight == CAPACITY)
    return futures


def assert_grpc_refused(error: SpecrayError) -> None:
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"at most {MAX_BATCH} running and {MAX_QUEUED} queued" in error.details
    assert error.retry_after_s == RETRY_AFTER_S  # from the trailing metadata


def assert_http_refused(reply: requests.Response) -> None:
    assert reply.status_code == 429, reply.text
    assert reply.headers["Retry-After"] == str(math.ceil(RETRY_AFTER_S))
    error = reply.json()["error"]
    assert (error["type"], error["code"]) == ("overloaded_error", 429)
    assert f"at most {MAX_BATCH} running and {MAX_QUEUED} queued" in error["message"]


def refuse_through_every_door(server: ServingThread, client: SpecrayClient) -> None:
    with pytest.raises(SpecrayError) as unary:
        client.generate(PROMPTS[0], timeout_s=REFUSAL_TIMEOUT_S, **OPTIONS)
    assert_grpc_refused(unary.value)
    with pytest.raises(SpecrayError) as stream:
        list(client.generate_stream(PROMPTS[1], timeout_s=REFUSAL_TIMEOUT_S, **OPTIONS))
    assert_grpc_refused(stream.value)
    assert_http_refused(http_completion(server, PROMPTS[2]))
    assert_http_refused(http_completion(server, PROMPTS[3], stream=True))


def assert_idle_and_serving(server: ServingThread) -> None:
    wait_until(lambda: server.service.gateway.num_in_flight == 0)
    state = server.call(server.backend.snapshot())
    assert not state.running and not state.waiting and state.target_slots == 0
    with grpc.insecure_channel(server.grpc_address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="specray.v1.Generation"), timeout=30
        )
    assert check.status == health_pb2.HealthCheckResponse.SERVING


def test_requests_past_the_bound_are_refused_at_once_and_the_rest_finish(
    server: ServingThread, expected: dict[str, str]
) -> None:
    # Held, nothing can finish: a refusal cannot wait for room.
    with held_engine(server) as (pool, channel, client):
        admitted = fill_to_capacity(server, channel, pool)
        refuse_through_every_door(server, client)
        assert server.service.gateway.num_in_flight == CAPACITY  # refusals took no room
        server.backend.resume()
        texts = [future.result(timeout=120) for future in admitted]
    assert texts == [expected[prompt] for prompt in PROMPTS]  # greedy output undisturbed
    assert_idle_and_serving(server)


def test_refusals_leak_no_capacity(server: ServingThread, expected: dict[str, str]) -> None:
    """Many refusals in a row, then the whole capacity is admitted again, and
    a caller that waits out the hint gets its answer."""
    with held_engine(server) as (pool, channel, client):
        first = fill_to_capacity(server, channel, pool)
        for _ in range(25):
            refuse_through_every_door(server, client)
        server.backend.resume()
        assert [future.result(timeout=120) for future in first] == list(expected.values())
        wait_until(lambda: server.service.gateway.num_in_flight == 0)
        server.backend.pause()
        second = fill_to_capacity(server, channel, pool)  # the same capacity, all of it
        refuse_through_every_door(server, client)
        server.backend.resume()
        assert [future.result(timeout=120) for future in second] == list(expected.values())
        # The refused caller, retrying after the hint, is served.
        assert client.generate(PROMPTS[0], **OPTIONS).text == expected[PROMPTS[0]]
    assert_idle_and_serving(server)


def test_retry_hint_is_grpc_trailing_metadata(server: ServingThread) -> None:
    """The raw wire form of the hint, as gRPC's own retry policy reads it."""
    with held_engine(server) as (pool, channel, _):
        admitted = fill_to_capacity(server, channel, pool)
        stub = pb_grpc.GenerationStub(channel)
        request = build_request(PROMPTS[0], **OPTIONS)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(request, timeout=REFUSAL_TIMEOUT_S)
        server.backend.resume()
        for future in admitted:
            future.result(timeout=120)
    error = caught.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailing = dict(error.trailing_metadata() or ())
    assert trailing[RETRY_PUSHBACK_KEY] == str(round(RETRY_AFTER_S * 1000))
    assert_idle_and_serving(server)
