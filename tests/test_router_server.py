"""The gRPC front door over the Ray router, for real: a Service on 127.0.0.1
with ephemeral ports, a router actor with one target shard and an n-gram
draft replica on a loopback Ray, a tiny model with a real tokenizer."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from router_server_helpers import REPEATING, router_config, router_state, rpc_error
from serving_helpers import (
    ServingThread,
    drafted_without_changing_greedy_output,
    save_served_model,
    unary_and_stream,
    wait_until,
)

from specray.deploy.admin_client import AdminClient
from specray.deploy.cli import build_parser, main
from specray.deploy.client import SpecrayClient
from specray.deploy.config import ServeConfig
from specray.deploy.serve import apply_overrides

PROMPTS: list[str | list[int]] = [REPEATING, "def add(a, b):", [5, 9, 5, 9, 5, 9, 5]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_served_model(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def server(local_ray: None, model_dir: Path) -> Iterator[ServingThread]:
    with ServingThread(router_config(model_dir)) as serving:
        yield serving


def router_is_idle(server: ServingThread) -> bool:
    state = router_state(server)
    targets_free = all(not t.requests and not t.releasing for t in state.targets)
    drafts_free = all(d.tracked == 0 and d.pinned == 0 for d in state.drafts)
    idle = not state.running and not state.waiting and targets_free and drafts_free
    return idle and server.service.gateway.num_in_flight == 0


def test_serve_flags_configure_the_router_section() -> None:
    parser, _ = build_parser()
    args = parser.parse_args(["serve", "--target", "/m/t", "--draft", "ngram", "--port", "0"])
    config = apply_overrides(ServeConfig.model_validate({}), args)
    assert (config.backend, config.router.target, config.port) == ("router", "/m/t", 0)
    assert [d.kind for d in config.router.drafts] == ["ngram"]
    args = parser.parse_args(["serve", "--backend", "engine", "--draft", "none"])
    config = apply_overrides(ServeConfig.model_validate({}), args)
    assert (config.backend, config.draft) == ("engine", "none")
    assert config.router == ServeConfig.model_validate({}).router  # untouched
    with pytest.raises(ValueError, match="needs `backend: router`"):
        ServeConfig.model_validate({"backend": "engine", "address": "10.0.0.1:6379"})


def test_admin_is_on_only_on_loopback_unless_asked() -> None:
    assert ServeConfig.model_validate({}).admin_enabled
    assert not ServeConfig.model_validate({"host": "0.0.0.0"}).admin_enabled
    assert ServeConfig.model_validate({"host": "0.0.0.0", "admin": True}).admin_enabled


def test_reflection_lists_generation_and_admin(server: ServingThread) -> None:
    with grpc.insecure_channel(server.grpc_address) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert {"specray.v1.Generation", "specray.v1.Admin", "grpc.health.v1.Health"} <= set(services)


def test_diagnostics_count_one_requests_rounds_and_start_afresh(
    server: ServingThread, client: SpecrayClient
) -> None:
    """Admin's diagnostics over the router: the rounds one request ran, by
    the tokens each verified, add up to what its response reports; reading
    with a reset starts the count afresh; the cost models and the copy
    estimates requests start from are there."""
    wait_until(lambda: router_is_idle(server))
    with AdminClient(server.grpc_address, timeout_s=60) as admin:
        admin.diagnostics(reset_rounds=True)
        result = client.generate(REPEATING, max_tokens=32, ignore_eos=True, temperature=0.0)
        found = admin.diagnostics(reset_rounds=True)
        after = admin.diagnostics()
    by_size = found["rounds"]["by_verified"]
    verified = sum(int(tokens) * size["rounds"] for tokens, size in by_size.items())
    fed = result.prompt_tokens - result.cached_tokens
    assert result.draft_tokens > 0
    # The first round feeds the prompt; each later one its last token and the drafts.
    assert verified == fed + (result.rounds - 1) + result.draft_tokens
    assert found["rounds"]["request_rounds"] == sum(s["rounds"] for s in by_size.values())
    assert after["rounds"]["rounds"] == 0 and after["rounds"]["by_verified"] == {}
    assert found["verify_costs"] and "overall" in found["copy_estimates"]["pool"]
    assert found["weights"] == {"target": "dense (float32)"}  # an n-gram drafter loads none
    assert found["recovery"] == {"draft_failures": 0, "target_failures": 0}


def test_bench_serve_records_each_arms_rounds(server: ServingThread, tmp_path: Path) -> None:
    """``specray bench serve`` against the router keeps each arm's own
    rounds (counted afresh per arm): a target-only arm verified exactly its
    requests' fed prompts and one token per later round, the speculative
    arm that plus the drafts its responses report."""
    wait_until(lambda: router_is_idle(server))
    out = tmp_path / "arms.json"
    argv = ["bench", "serve", "--server", server.grpc_address, "--dataset", "random"]
    argv += ["--random-input-len", "8", "--random-output-len", "12", "--num-prompts", "3"]
    argv += ["--ab-order", "phases", "--max-concurrency", "2", "--save-result", str(out)]
    assert main(argv) == 0
    (run,) = json.loads(out.read_text())["runs"]
    for arm, speculative in (("spec", True), ("no_spec", False)):
        records = [r for r in run["records"] if r["speculative"] == speculative]
        rounds = run["diagnostics"][arm]["end"]["rounds"]["by_verified"]
        verified = sum(int(tokens) * size["rounds"] for tokens, size in rounds.items())
        fed = sum(r["prompt_tokens"] - r["cached_tokens"] for r in records)
        later = sum(r["rounds"] - 1 for r in records)
        drafts = sum(r["draft_tokens"] for r in records)
        assert verified == fed + later + drafts
        assert "pool" in run["diagnostics"][arm]["start"]["copy_estimates"]


def test_model_info_reports_the_router(client: SpecrayClient, model_dir: Path) -> None:
    info = client.model_info()
    assert info.target == str(model_dir)
    assert list(info.drafts) == ["ngram"]
    assert (info.max_context, info.vocab_size, info.tensor_parallel_size) == (512, 512, 1)


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 0.9, "seed": 7}])
def test_unary_and_streaming_give_identical_tokens(
    client: SpecrayClient, sampling: dict[str, float]
) -> None:
    whole, chunks = unary_and_stream(client, REPEATING, 40, **sampling)
    if "seed" in sampling:
        assert whole.seed == chunks[-1].seed == 7


def test_greedy_speculative_output_matches_target_only(client: SpecrayClient) -> None:
    drafted = drafted_without_changing_greedy_output(client, PROMPTS, 32)
    assert drafted > 0  # the n-gram replica did propose, so the comparison means something


def test_guided_output_through_the_router(client: SpecrayClient) -> None:
    """A regex and a choice constrain the output with n-gram drafting on;
    greedy output equals the same request without speculation."""
    common = {"max_tokens": 16, "temperature": 0.0}
    for guide in ({"guided_regex": "[a-c]{3}-[0-9]"}, {"guided_choice": ["yes", "no"]}):
        speculative = client.generate(REPEATING, **common, **guide)
        target_only = client.generate(REPEATING, speculative=False, **common, **guide)
        assert speculative.token_ids == target_only.token_ids
        assert speculative.finish_reason == "stop"
        if "guided_regex" in guide:
            assert re.fullmatch("[a-c]{3}-[0-9]", speculative.text)
        else:
            assert speculative.text in ("yes", "no")
    error = rpc_error(lambda: client.generate(REPEATING, guided_json='{"type": 5}', **common))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and "`guided_json`" in error.details


def test_cancel_by_the_client_frees_router_state(
    server: ServingThread, client: SpecrayClient
) -> None:
    stream = client.generate_stream(REPEATING, max_tokens=256, ignore_eos=True, temperature=0)
    assert next(stream).finish_reason is None
    state = router_state(server)
    assert state.running == 1 and state.drafts[0].tracked == 1
    stream.close()  # cancels the call
    wait_until(lambda: router_is_idle(server))
    # Every slot is free again: a full house of new requests runs.
    with ThreadPoolExecutor(4) as pool:
        options = {"max_tokens": 8, "ignore_eos": True}
        results = list(pool.map(lambda _: client.generate(REPEATING, **options), range(4)))
    assert all(len(r.token_ids) == 8 for r in results)


def test_cancel_by_the_operator_is_cancelled(server: ServingThread, client: SpecrayClient) -> None:
    options = {"request_id": "op-cancel", "max_tokens": 256, "ignore_eos": True}
    stream = client.generate_stream(REPEATING, **options)
    assert next(stream).finish_reason is None
    server.call(server.router_backend.cancel("op-cancel"))
    error = rpc_error(lambda: list(stream))
    assert error.code == grpc.StatusCode.CANCELLED and "op-cancel" in error.details
    wait_until(lambda: router_is_idle(server))


@pytest.mark.slow
def test_specray_scale_keeps_requests_identical(
    server: ServingThread, client: SpecrayClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """Scale drafts and targets up and back down through the Admin RPC while a
    producer keeps requests in flight: every output equals target-only."""
    common = {"max_tokens": 96, "temperature": 0.0, "ignore_eos": True}
    reference = [client.generate(p, speculative=False, **common).token_ids for p in PROMPTS]
    scaling = threading.Event()
    mismatches: list[int] = []
    done: list[int] = []

    def producer(worker: int) -> None:
        i = worker
        while not scaling.is_set() or i < worker + 3 * len(PROMPTS):
            tokens = client.generate(PROMPTS[i % len(PROMPTS)], **common).token_ids
            (done if tokens == reference[i % len(PROMPTS)] else mismatches).append(i)
            i += 4

    def scale(*flags: str) -> dict[str, Any]:
        address = server.grpc_address
        assert main(["scale", "--server", address, "--timeout", "300", "--json", *flags]) == 0
        result: dict[str, Any] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        return result

    with ThreadPoolExecutor(4) as pool:
        workers = [pool.submit(producer, w) for w in range(4)]
        wait_until(lambda: len(done) + len(mismatches) >= 2 or any(w.done() for w in workers))
        up = scale("--drafts", "2", "--targets", "2")
        down = scale("--drafts", "1", "--targets", "1")
        scaling.set()
        for worker in workers:
            worker.result(300)
    assert (up["drafts"], up["targets"], up["backend"]) == (2, 2, "router")
    assert (down["drafts"], down["targets"]) == (1, 1)
    assert mismatches == [] and len(done) >= 12
    state = router_state(server)
    assert (len(state.targets), len(state.drafts)) == (1, 1)
    wait_until(lambda: router_is_idle(server))
    now = scale()  # no counts: only reports
    assert (now["drafts"], now["targets"], now["running"], now["waiting"]) == (1, 1, 0, 0)


def test_scale_refuses_bad_counts(
    server: ServingThread, capsys: pytest.CaptureFixture[str]
) -> None:
    address = server.grpc_address
    assert main(["scale", "--server", address, "--targets", "0"]) == 2
    assert "`targets` must be >= 1 and <= 256, got 0" in capsys.readouterr().err


@pytest.mark.slow
def test_specray_serve_on_the_router_prints_ready_scales_and_drains(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command itself: its own embedded Ray on loopback, the ready line,
    `specray scale` against it, and SIGTERM draining to exit 0."""
    config = tmp_path / "serve.yaml"
    settings = router_config(model_dir, ray_num_cpus=4).model_dump(mode="json", exclude_none=True)
    config.write_text(yaml.safe_dump(settings))
    command = [sys.executable, "-m", "specray.deploy.cli", "serve", "--config", str(config)]
    command += ["--http-port", "0"]  # the file has none: the default would be 8000
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        assert "ready" in ready and "draft=ngram" in ready, ready
        found = re.search(r"grpc=(127\.0\.0\.1:\d+)", ready)
        assert found is not None and re.search(r"http=127\.0\.0\.1:\d+", ready)
        address = found.group(1)
        assert main(["scale", "--server", address, "--drafts", "2", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["drafts"] == 2
        with SpecrayClient(address, timeout_s=120) as client:
            stream = client.generate_stream(REPEATING, max_tokens=200, ignore_eos=True)
            assert next(stream).finish_reason is None
            proc.send_signal(signal.SIGTERM)  # drains: the request in flight finishes
            assert list(stream)[-1].finish_reason == "length"
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
