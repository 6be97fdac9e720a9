"""Deadlines and cancellation through a real router-backed gRPC server: a
Service on 127.0.0.1 with an ephemeral port, a router actor with one target
shard and two n-gram draft replicas on a loopback Ray, a tiny model with a
real tokenizer.

What is checked is the per-request state every actor holds, as each actor
reports it (``Router.footprint``): the router's tracked requests, the KV
slots each target shard holds, the requests each draft replica holds. Process
RSS is not asserted: allocator caching and Ray's own buffers move it by more
than one request's state, so it cannot tell a leak from noise.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import ray
from router_server_helpers import router_serve_config
from serving_helpers import ServingThread, save_served_model, wait_until

from specray.cluster.router_state import Footprint
from specray.deploy.client import SpecrayClient, SpecrayError
from specray.deploy.config import ServeConfig

PROMPT = "x = [1, 2, 3]\ny = [1, 2, 3]\nz = [1, 2, 3]\n"
SLOTS = 4
CONTEXT = 32768
# Far more tokens than a request can generate before its deadline (about 800
# tokens/s alone here; at most k + 1 = 5 per round, and a round is at least
# two actor calls), so the deadline, not the length, ends it.
LONG = 30000


def serve_config(model_dir: Path) -> ServeConfig:
    router = {"num_drafts": 2, "num_slots": SLOTS, "max_len": CONTEXT}
    return router_serve_config(model_dir, router, {"max_tokens": LONG, "max_queued_requests": 16})


@pytest.fixture(scope="module")
def server(local_ray: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServingThread]:
    model_dir = save_served_model(tmp_path_factory.mktemp("served"))
    # A longer context than the helper's, so a request can outlast any deadline.
    config_file = model_dir / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "max_position_embeddings": CONTEXT}))
    with ServingThread(serve_config(model_dir)) as serving:
        yield serving


def footprint(server: ServingThread) -> Footprint:
    result: Footprint = ray.get(server.router_backend.router.footprint.remote(), timeout=60)
    return result


def settled(server: ServingThread, baseline: Footprint) -> bool:
    """Every actor holds what it held before, and nothing is in flight."""
    return footprint(server) == baseline and server.service.gateway.num_in_flight == 0


def outcome(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except SpecrayError as error:
        return error.code
    return grpc.StatusCode.OK


@pytest.mark.slow
def test_deadlines_and_cancels_free_every_actor(server: ServingThread) -> None:
    """A burst of requests ends by deadline or cancel at every stage (queued,
    running) and by every hand (the client's deadline, the client going away,
    the operator): afterwards the router, each target shard's KV cache and
    each draft replica hold exactly what they held before, and a full house
    of new requests runs."""
    address = server.grpc_address
    with SpecrayClient(address, timeout_s=300) as warm:
        warm.generate(PROMPT, max_tokens=8)
    wait_until(lambda: footprint(server).total == 0)  # the warm-up's slot release is confirmed
    baseline = footprint(server)
    assert len(baseline.target_slots) == 1 and len(baseline.draft_requests) == 2

    options = {"max_tokens": LONG, "ignore_eos": True, "temperature": 0.0}
    codes: dict[str, list[grpc.StatusCode]] = {}

    def burst(round_: int) -> None:
        with (
            SpecrayClient(address, timeout_s=300) as client,
            ThreadPoolExecutor(SLOTS + 6) as pool,
        ):
            # Two run into their deadline mid-stream, two are dropped by the
            # client mid-stream: together they fill every slot.
            running = [
                client.generate_stream(PROMPT, timeout_s=2, **options),
                client.generate_stream(PROMPT, timeout_s=2, **options),
            ]
            dropped = [client.generate_stream(PROMPT, **options) for _ in range(2)]
            for stream in [*running, *dropped]:
                assert next(stream).finish_reason is None
            # No slot is free: the rest wait in the router's queue, the
            # operator's request until it is cancelled, the others until
            # their deadline passes.
            operator_id = f"operator-{round_}"
            by_operator = client.generate_stream(PROMPT, request_id=operator_id, **options)
            operator = pool.submit(outcome, lambda: list(by_operator))
            wait_until(lambda: footprint(server).router_requests == SLOTS + 1)
            queued = [
                pool.submit(outcome, lambda: client.generate(PROMPT, timeout_s=0.5, **options))
                for _ in range(4)
            ]
            codes.setdefault("queued deadline", []).extend(q.result(300) for q in queued)
            cancel = server.router_backend.cancel(operator_id)
            server.call(cancel)
            codes.setdefault("operator cancel", []).append(operator.result(300))
            for stream in dropped:
                stream.close()  # the client goes away: the server sees CANCELLED
            codes.setdefault("running deadline", []).extend(
                outcome(lambda s=stream: list(s)) for stream in running
            )

    for round_ in range(2):
        burst(round_)
        wait_until(lambda: settled(server, baseline), timeout_s=120)

    deadline, cancelled = grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED
    assert codes == {
        "queued deadline": [deadline] * 8,
        "operator cancel": [cancelled] * 2,
        "running deadline": [deadline] * 4,
    }
    # Every slot is free again: a full house of new requests runs.
    with SpecrayClient(address, timeout_s=300) as client, ThreadPoolExecutor(SLOTS) as pool:
        results: list[Any] = list(
            pool.map(lambda _: client.generate(PROMPT, max_tokens=8, ignore_eos=True), range(4))
        )
    assert all(len(r.token_ids) == 8 for r in results)
    wait_until(lambda: settled(server, baseline), timeout_s=120)
