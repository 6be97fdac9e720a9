"""A DeepSeek-V4 target split by expert parallelism, served end to end from
the shipped example config: a checkpoint written by ``specray models tiny-v4``,
``specray serve``'s Service (gRPC and OpenAI HTTP) over the router on a
loopback Ray, MTP draft replicas scaled with ``specray scale``, a draft
replica killed (fallback) and an expert shard killed mid-stream (gang
restart): every greedy output equals the no-cache loop over the model."""

from __future__ import annotations

import json
import os
import signal
import threading
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from references import greedy_reference
from serving_helpers import ServingThread, wait_until

from specray.cluster.local_ray import start_ray
from specray.cluster.router_state import RouterState
from specray.deploy.cli import main
from specray.deploy.client import GenerationResult, SpecrayClient
from specray.deploy.config import ServeConfig

SHIPPED = Path(__file__).parent.parent / "deploy" / "configs" / "tiny_v4.yaml"
PROMPTS = [[5, 9, 14, 5, 9, 14, 5, 9], [300, 12, 77, 41, 3], list(range(40, 60))]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def v4_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tinyv4") / "model"
    assert main(["models", "tiny-v4", str(directory), "--seed", "4"]) == 0
    return directory


def shipped_config(v4_dir: Path) -> ServeConfig:
    """The example config, on ephemeral ports, with this test's checkpoint."""
    data: dict[str, Any] = yaml.safe_load(SHIPPED.read_text())
    data.update(port=0, http_port=0, drain_timeout_s=60)
    data["router"].update(target=str(v4_dir), profile=False, timeout_s=60, start_timeout_s=180)
    data["router"].update(target_restart_timeout_s=300)
    return ServeConfig.model_validate(data)


def test_the_shipped_config_is_expert_parallel_with_mtp_drafts() -> None:
    config = ServeConfig.model_validate(yaml.safe_load(SHIPPED.read_text()))
    router = config.router
    assert (config.backend, router.tp, router.ep) == ("router", 1, 2)
    assert router.drafter is not None and router.drafter.kind == "mtp"


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    info = start_ray(num_cpus=12)
    yield
    if info.started_here:
        ray.shutdown()


@pytest.fixture(scope="module")
def server(local_ray: None, v4_dir: Path) -> Iterator[ServingThread]:
    with ServingThread(shipped_config(v4_dir)) as serving:
        yield serving


@pytest.fixture(scope="module")
def client(server: ServingThread) -> Iterator[SpecrayClient]:
    with SpecrayClient(server.grpc_address, timeout_s=300) as specray:
        yield specray


@pytest.fixture(scope="module")
def reference(v4_dir: Path) -> dict[int, list[int]]:
    """The no-cache greedy loop, 200 tokens per prompt (shorter runs are prefixes)."""
    prompts = {i: p for i, p in enumerate(PROMPTS)}
    return greedy_reference(v4_dir, prompts, 200)  # type: ignore[arg-type]


def router_state(server: ServingThread) -> RouterState:
    state: RouterState = ray.get(server.router_backend.router.state.remote(), timeout=60)
    return state


def greedy(client: SpecrayClient, i: int, max_tokens: int = MAX_TOKENS) -> GenerationResult:
    return client.generate(PROMPTS[i], max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


@pytest.mark.slow
def test_grpc_and_http_give_the_reference(
    server: ServingThread, client: SpecrayClient, reference: dict[int, list[int]]
) -> None:
    (target,) = router_state(server).targets
    assert len(target.shard_pids) == 2  # one replica: two expert-parallel shards
    drafted = 0
    for i in range(len(PROMPTS)):
        result = greedy(client, i)
        assert result.token_ids == reference[i][:MAX_TOKENS]
        plain = client.generate(
            PROMPTS[i], max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, speculative=False
        )
        assert plain.token_ids == result.token_ids
        drafted += result.draft_tokens
        body = {"prompt": PROMPTS[i], "max_tokens": MAX_TOKENS, "temperature": 0}
        body["ignore_eos"] = True
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        url = f"{server.http_url}/v1/completions"
        with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=300) as r:
            completion = json.loads(r.read())
        assert completion["choices"][0]["text"] == result.text
        assert completion["usage"]["completion_tokens"] == MAX_TOKENS
    assert drafted > 0  # the MTP replica proposed


@pytest.mark.slow
def test_specray_scale_drafts_and_targets_keeps_the_output(
    server: ServingThread,
    client: SpecrayClient,
    reference: dict[int, list[int]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    scaling = threading.Event()
    outcomes: list[bool] = []

    def producer(worker: int) -> None:
        i = worker
        while not scaling.is_set() or i < worker + 2 * len(PROMPTS):
            outcomes.append(greedy(client, i % 3).token_ids == reference[i % 3][:MAX_TOKENS])
            i += 2

    def scale(*flags: str) -> dict[str, Any]:
        address = server.grpc_address
        assert main(["scale", "--server", address, "--timeout", "300", "--json", *flags]) == 0
        result: dict[str, Any] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        return result

    with ThreadPoolExecutor(2) as pool:
        workers = [pool.submit(producer, w) for w in range(2)]
        wait_until(lambda: len(outcomes) >= 1, timeout_s=300)
        up = scale("--drafts", "2", "--targets", "2")
        state = router_state(server)
        assert [len(t.shard_pids) for t in state.targets] == [2, 2]
        down = scale("--drafts", "1", "--targets", "1")
        scaling.set()
        for worker in workers:
            worker.result(600)
    assert (up["drafts"], up["targets"], down["drafts"], down["targets"]) == (2, 2, 1, 1)
    assert all(outcomes) and len(outcomes) >= 6


@pytest.mark.slow
def test_killed_draft_replica_falls_back(
    server: ServingThread, client: SpecrayClient, reference: dict[int, list[int]]
) -> None:
    before = router_state(server)
    stream = client.generate_stream(PROMPTS[0], max_tokens=120, temperature=0.0, ignore_eos=True)
    chunks = [next(stream)]
    os.kill(before.drafts[0].pid, signal.SIGKILL)
    chunks += list(stream)
    assert [t for c in chunks for t in c.token_ids] == reference[0][:120]
    assert chunks[-1].fallback
    wait_until(
        lambda: router_state(server).recovery.draft_restarts > before.recovery.draft_restarts,
        timeout_s=300,
    )


@pytest.mark.slow
def test_killed_expert_shard_restarts_the_group_and_loses_nothing(
    server: ServingThread, client: SpecrayClient, reference: dict[int, list[int]]
) -> None:
    """One shard of the only target group dies mid-stream: the whole group is
    replaced, the requests replay their committed tokens on it, none fails."""
    before = router_state(server)
    (target,) = before.targets
    streams = [
        client.generate_stream(PROMPTS[i], max_tokens=200, temperature=0.0, ignore_eos=True)
        for i in range(len(PROMPTS))
    ]
    with ThreadPoolExecutor(len(streams)) as pool:
        firsts = list(pool.map(next, streams))
        os.kill(target.shard_pids[1], signal.SIGKILL)
        rests = list(pool.map(list, streams))
    for i, (first, rest) in enumerate(zip(firsts, rests, strict=True)):
        tokens = [t for c in [first, *rest] for t in c.token_ids]
        assert tokens == reference[i], i
    after = router_state(server)
    assert after.recovery.target_restarts == before.recovery.target_restarts + 1
    (restarted,) = after.targets
    assert set(restarted.shard_pids).isdisjoint(target.shard_pids)
