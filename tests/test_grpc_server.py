"""The gRPC front door, for real: a Service on 127.0.0.1 with ephemeral
ports over the in-process engine on a tiny model with a real tokenizer."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from serving_helpers import (
    ServingThread,
    drafted_without_changing_greedy_output,
    save_served_model,
    serve_config,
    unary_and_stream,
    wait_until,
)

from specray.actors.engine.target import LocalTarget, VerifyInput, VerifyOutput
from specray.actors.model.loader import load_model
from specray.deploy.admin_client import AdminClient
from specray.deploy.backend import Backend
from specray.deploy.cli import main
from specray.deploy.client import SpecrayClient, SpecrayError
from specray.deploy.config import ServeConfig
from specray.deploy.conversion import generation_request
from specray.deploy.engine_backend import EngineSnapshot
from specray.deploy.grpc_server import raw_request
from specray.deploy.serve import build_backend
from specray.deploy.validation import Validator
from specray.protos.messages import build_request
from specray.protos.specray.v1 import generation_pb2 as pb
from specray.protos.specray.v1 import generation_pb2_grpc as pb_grpc

REPEATING = "x = [1, 2, 3]\ny = [1, 2, 3]\nz = [1, 2, 3]\n"


class FaultyTarget(LocalTarget):
    """A local target that fails the rounds of requests whose id starts with "fail-"."""

    def verify(
        self, inputs: Sequence[VerifyInput], hidden_layers: tuple[int, ...] = ()
    ) -> list[VerifyOutput]:
        if any(item.request_id.startswith("fail-") for item in inputs):
            raise RuntimeError("injected fault: secret internals")
        return super().verify(inputs, hidden_layers)


def build_with_faults(config: ServeConfig) -> tuple[Backend, Validator]:
    model = load_model(Path(config.target), config.dtype)
    return build_backend(config, FaultyTarget(model, config.max_batch, config.max_len))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_served_model(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[ServingThread]:
    with ServingThread(serve_config(model_dir), build=build_with_faults) as serving:
        yield serving


def snapshot(server: ServingThread) -> EngineSnapshot:
    return server.call(server.backend.snapshot())


def engine_is_empty(server: ServingThread) -> bool:
    state = snapshot(server)
    idle = server.service.gateway.num_in_flight == 0 and not state.waiting and not state.running
    return idle and state.target_slots == 0


def rpc_error(call: Callable[[], object]) -> SpecrayError:
    with pytest.raises(SpecrayError) as caught:
        call()
    return caught.value


def test_binds_loopback_on_an_ephemeral_port(server: ServingThread) -> None:
    host, port = server.grpc_address.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    assert ServeConfig.model_validate({}).host == "127.0.0.1"


def test_admin_over_the_engine_reports_but_neither_scales_nor_diagnoses(
    server: ServingThread,
) -> None:
    with AdminClient(server.grpc_address, timeout_s=30) as admin:
        assert (admin.state().backend, admin.state().targets) == ("engine", 1)
        for call in (admin.diagnostics, lambda: admin.scale(drafts=2)):
            with pytest.raises(SpecrayError) as refused:
                call()
            assert refused.value.code == grpc.StatusCode.UNIMPLEMENTED


def test_model_info(client: SpecrayClient, model_dir: Path) -> None:
    info = client.model_info()
    assert info.target == str(model_dir)
    assert list(info.drafts) == ["ngram"]
    assert (info.max_context, info.vocab_size, info.tensor_parallel_size) == (512, 512, 1)
    assert info.expert_parallel_size == 1
    assert (info.max_tokens_limit, info.max_num_speculative_tokens) == (256, 4)


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 0.9, "seed": 7}])
def test_unary_and_streaming_give_identical_tokens(
    client: SpecrayClient, sampling: dict[str, float]
) -> None:
    whole, chunks = unary_and_stream(client, REPEATING, 40, **sampling)
    last = chunks[-1]
    assert last.finish_reason == "length"
    assert last.prompt_tokens == whole.prompt_tokens > 0
    if "seed" in sampling:
        assert whole.seed == last.seed == 7


def test_greedy_speculative_output_matches_target_only(client: SpecrayClient) -> None:
    prompts: list[str | list[int]] = [REPEATING, "def add(a, b):", [5, 9, 5, 9, 5, 9, 5]]
    drafted = drafted_without_changing_greedy_output(client, prompts, 24)
    assert drafted > 0  # the n-gram drafter did propose, so the comparison means something


def test_fixed_speculation_travels_to_the_engine_and_keeps_greedy_output(
    server: ServingThread, client: SpecrayClient
) -> None:
    """The wire field reaches the engine's request, and a fixed request's
    greedy tokens are target-only's."""
    validate = server.service.gateway.validator.validate
    for fixed_speculation in (True, None):
        message = build_request(REPEATING, fixed_speculation=fixed_speculation)
        request = generation_request(validate(raw_request(message)))
        assert request.fixed_speculation is bool(fixed_speculation)
    common = {"max_tokens": 24, "temperature": 0.0, "ignore_eos": True}
    fixed = client.generate(REPEATING, fixed_speculation=True, **common)
    assert fixed.token_ids == client.generate(REPEATING, speculative=False, **common).token_ids
    assert fixed.draft_tokens > 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"temperature": math.nan}, "`temperature` must be >= 0 and finite, got nan"),
        ({"max_tokens": 100000}, "`max_tokens` must be <= 256, got 100000"),
        ({"top_p": 0.0}, "`top_p` must be > 0 and <= 1, got 0"),
        ({"max_tokens": 200, "prompt": [1] * 400}, "exceeds the context limit 512"),
        ({"prompt": [1, 600]}, "`token_ids[1]` must be >= 0 and < 512 (the vocabulary size)"),
        ({"prompt": []}, "`token_ids` must not be empty"),
        ({"prompt": ""}, "`text` must not be empty"),
    ],
)
def test_invalid_input_is_invalid_argument_naming_the_field(
    client: SpecrayClient, options: dict[str, Any], message: str
) -> None:
    prompt = options.pop("prompt", REPEATING)
    error = rpc_error(lambda: client.generate(prompt, **options))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details


def test_empty_input_is_invalid_argument(server: ServingThread) -> None:
    with (
        grpc.insecure_channel(server.grpc_address) as channel,
        pytest.raises(grpc.RpcError) as caught,
    ):
        pb_grpc.GenerationStub(channel).Generate(pb.GenerateRequest(), timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input must not be empty: set `text` or `token_ids`" in str(caught.value.details())


def test_deadline_exceeded_frees_the_request(server: ServingThread, client: SpecrayClient) -> None:
    server.backend.pause()  # nothing can finish: the deadline must pass first
    try:
        error = rpc_error(lambda: client.generate(REPEATING, max_tokens=8, timeout_s=0.5))
    finally:
        server.backend.resume()
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: engine_is_empty(server))


def test_cancel_frees_engine_state(server: ServingThread, client: SpecrayClient) -> None:
    stream = client.generate_stream(REPEATING, max_tokens=256, ignore_eos=True, temperature=0)
    first = next(stream)
    assert first.finish_reason is None
    state = snapshot(server)
    assert len(state.running) == 1 and state.target_slots == 1
    stream.close()  # cancels the call
    wait_until(lambda: engine_is_empty(server))


def test_overload_is_resource_exhausted_with_a_retry_hint(
    server: ServingThread, client: SpecrayClient
) -> None:
    # max_batch 2 + 1 queued: hold the engine so three requests stay in flight.
    server.backend.pause()
    calls = []
    try:
        with grpc.insecure_channel(server.grpc_address) as channel:
            stub = pb_grpc.GenerationStub(channel)
            for _ in range(3):
                calls.append(stub.GenerateStream(build_request(REPEATING, max_tokens=8)))
            wait_until(lambda: server.service.gateway.num_in_flight == 3)
            error = rpc_error(lambda: client.generate(REPEATING, max_tokens=8))
            for call in calls:
                call.cancel()
    finally:
        server.backend.resume()
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "overloaded" in error.details
    assert error.retry_after_s == 1.0
    wait_until(lambda: engine_is_empty(server))


def test_unexpected_failure_is_internal_without_internals(
    server: ServingThread, client: SpecrayClient
) -> None:
    error = rpc_error(lambda: client.generate(REPEATING, request_id="fail-7", max_tokens=8))
    assert error.code == grpc.StatusCode.INTERNAL
    assert "'fail-7'" in error.details and "secret" not in error.details
    wait_until(lambda: engine_is_empty(server))
    assert client.generate(REPEATING, max_tokens=4).finish_reason is not None  # still serving


def test_reflection_lists_the_service(server: ServingThread) -> None:
    with grpc.insecure_channel(server.grpc_address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = database.get_services()
        assert "specray.v1.Generation" in services
        assert "grpc.health.v1.Health" in services
        found = database.FindFileContainingSymbol("specray.v1.Generation")
        assert found.name == "specray/v1/generation.proto"


def health_status(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
        return int(response.status)


def test_health_goes_not_serving_serving_not_serving_on_drain(model_dir: Path) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    with (
        ServingThread(serve_config(model_dir), load=False) as server,
        SpecrayClient(server.grpc_address, timeout_s=60) as client,
        ThreadPoolExecutor(1) as pool,
    ):
        address = server.grpc_address
        assert health_status(address) == not_serving
        error = rpc_error(lambda: client.generate(REPEATING))
        assert error.code == grpc.StatusCode.UNAVAILABLE and "loading" in error.details

        server.load()
        assert health_status(address) == serving
        assert health_status(address, "specray.v1.Generation") == serving

        server.backend.pause()  # keep one request in flight through the drain
        options = {"max_tokens": 12, "ignore_eos": True}
        in_flight = pool.submit(lambda: list(client.generate_stream(REPEATING, **options)))
        wait_until(lambda: server.service.gateway.num_in_flight == 1)
        drained = server.submit(server.service.grpc.drain(60))
        wait_until(lambda: health_status(address) == not_serving)
        error = rpc_error(lambda: client.generate(REPEATING))
        assert error.code == grpc.StatusCode.UNAVAILABLE and "draining" in error.details
        server.backend.resume()
        assert in_flight.result(60)[-1].finish_reason == "length"  # in flight work finishes
        assert drained.result(60) is True


def test_client_cli_json_shape(
    server: ServingThread, client: SpecrayClient, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ["--max-tokens", "16", "--ignore-eos", "--token-ids", "5,9,5,9,5", "--json"]
    assert main(["client", "generate", "--server", server.grpc_address, *flags]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) >= {"token_ids", "text", "finish_reason", "stats", "seed"}
    assert set(result["stats"]) >= {
        "draft_tokens",
        "accepted_tokens",
        "rounds",
        "tokens_per_s",
        "elapsed_s",
    }
    expected = client.generate([5, 9, 5, 9, 5], max_tokens=16, ignore_eos=True, temperature=0)
    assert result["token_ids"] == expected.token_ids
    assert result["finish_reason"] == "length"


def test_client_cli_reports_invalid_argument(
    server: ServingThread, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["client", "generate", "--server", server.grpc_address, "--prompt", "x", "--top-p", "2"]
    )
    assert code == 2
    assert "INVALID_ARGUMENT: `top_p` must be > 0 and <= 1, got 2" in capsys.readouterr().err


@pytest.mark.slow
def test_specray_serve_prints_ready_and_drains_on_sigterm(model_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    settings = serve_config(model_dir).model_dump(mode="json", exclude_none=True)
    config.write_text(yaml.safe_dump(settings))
    command = [sys.executable, "-m", "specray.deploy.cli", "serve", "--config", str(config)]
    command += ["--port", "0", "--http-port", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        assert "ready" in ready, ready
        address = re.search(r"grpc=(\S+)", ready)
        assert address is not None and address.group(1).startswith("127.0.0.1:")
        assert re.search(r"http=127\.0\.0\.1:\d+", ready)
        with SpecrayClient(address.group(1), timeout_s=60) as client:
            result = client.generate(REPEATING, max_tokens=8, ignore_eos=True)
        assert len(result.token_ids) == 8
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
