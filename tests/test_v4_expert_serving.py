"""A DeepSeek-V4 target split by expert parallelism over two nodes, served
end to end from ``specray plan``'s output: a checkpoint written by ``specray
models tiny-v4``, planned for two one-GPU nodes too small to hold it alone
(the planner picks EP2, the shipped example config's layout), served by
``specray serve``'s Service (gRPC and OpenAI HTTP) over the router on a fake
two-node Ray cluster on 127.0.0.1; MTP draft replicas scaled with ``specray
scale``, a draft replica killed (fallback) and an expert shard killed
mid-stream (gang restart): every greedy output equals the no-cache loop.

Every test runs twice: on the planned layout (tp 1 x ep 2, one shard per
node) and on the same plan with ``tp: 2`` (tp 2 x ep 2: four shards, two per
node), the layout the shipped config's comment offers."""

from __future__ import annotations

import json
import os
import signal
import threading
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from cluster_helpers import loopback_cluster
from ray.cluster_utils import Cluster
from references import greedy_reference
from serving_helpers import ServingThread, wait_until

from specray.cluster.local_ray import start_ray
from specray.cluster.router_state import RouterState
from specray.deploy.cli import main
from specray.deploy.client import GenerationResult, SpecrayClient
from specray.deploy.config import ServeConfig

SHIPPED = Path(__file__).parent.parent / "deploy" / "configs" / "tiny_v4.yaml"
PROMPTS = [[5, 9, 14, 5, 9, 14, 5, 9], [300, 12, 77, 41, 3]]
MAX_TOKENS = 16
LONG = 40  # tokens of the streams a replica is killed under
pytestmark = pytest.mark.usefixtures("one_torch_thread")
# Two nodes of one "GPU" of 350 KB (141 GB less a 140.99965 GB reserve):
# the tiny V4's 393k fp8 weights need both.
PLAN_FLAGS = ["--gpu", "h200", "--nodes", "2", "--gpus-per-node", "1", "--memory-utilization"]
PLAN_FLAGS += ["1", "--reserve-gb", "140.99965", "--requests", "2", "--context", "64"]
PLAN_FLAGS += ["--min-request-context", "64", "--draft", "mtp"]


@pytest.fixture(scope="module")
def v4_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tinyv4") / "model"
    assert main(["models", "tiny-v4", str(directory), "--seed", "4"]) == 0
    return directory


@pytest.fixture(scope="module")
def planned(v4_dir: Path) -> dict[str, Any]:
    """``specray serve`` args of the Serve config ``specray plan`` emits."""
    out = v4_dir.parent / "serve.yaml"
    flags = [*PLAN_FLAGS, "--target", str(v4_dir), "--emit-serve-config", str(out)]
    assert main(["plan", "--model", str(v4_dir), *flags]) == 0
    args: dict[str, Any] = yaml.safe_load(out.read_text())["applications"][0]["args"]
    return args


def test_the_shipped_config_has_the_planned_layout(planned: dict[str, Any]) -> None:
    shipped = ServeConfig.model_validate(yaml.safe_load(SHIPPED.read_text())).router
    plan = ServeConfig.model_validate(planned).router
    assert (plan.tp, plan.ep, plan.num_targets) == (shipped.tp, shipped.ep, shipped.num_targets)
    assert (shipped.tp, shipped.ep) == (1, 2)
    assert plan.drafter is not None and shipped.drafter is not None
    assert plan.drafter.kind == shipped.drafter.kind == "mtp"


# (tp, ep) of each served layout, and how its shards spread over the two nodes.
LAYOUTS = {"ep2": (1, 2), "tp2-ep2": (2, 2)}


def cpu_config(planned: dict[str, Any], layout: tuple[int, int]) -> ServeConfig:
    """The plan on CPU nodes: fp32 shards without GPUs, one thread each,
    spread over both nodes (one per node as on the planned one-GPU nodes when
    there are two) with two of each node's three Ray CPUs; ephemeral ports.
    A fixed γ: every round calls the draft replica, so a killed one is found
    by the round that needs it (the adaptive budget may stop drafting a
    random MTP block, and a request that never drafts never notices)."""
    data = json.loads(json.dumps(planned)) | {"port": 0, "http_port": 0, "drain_timeout_s": 60}
    router = data["router"]
    tp, ep = layout
    shards = tp * ep
    strategy = "STRICT_SPREAD" if shards == 2 else "SPREAD"
    router.update(tp=tp, ep=ep, dtype="float32", gpus_per_shard=0, threads_per_shard=1)
    router.update(strategy=strategy, cpus_per_shard=4 / shards)
    router.update(profile=False, timeout_s=60, start_timeout_s=180, target_restart_timeout_s=300)
    router.update(adaptive=False)
    for drafter in router["drafts"]:
        drafter.update(cpus=1, threads=1)
    return ServeConfig.model_validate(data)


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[Cluster]:
    """A head without CPUs and two 3-CPU nodes: two CPUs of shards each, a
    draft beside (two while scaled up)."""
    with loopback_cluster("srv4", [{"num_cpus": 3}] * 2) as cluster:
        start_ray(address=cluster.address)
        yield cluster


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request: pytest.FixtureRequest) -> tuple[int, int]:
    return LAYOUTS[request.param]


@pytest.fixture(scope="module")
def reference(v4_dir: Path) -> dict[int, list[int]]:
    """The no-cache greedy loop, LONG tokens per prompt (shorter runs are prefixes)."""
    prompts = {i: p for i, p in enumerate(PROMPTS)}
    return greedy_reference(v4_dir, prompts, LONG)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Served:
    """One layout served, a client of it, and what its greedy outputs must be."""

    server: ServingThread
    client: SpecrayClient
    reference: dict[int, list[int]]
    layout: tuple[int, int]

    @property
    def shards(self) -> int:
        return self.layout[0] * self.layout[1]

    def router_state(self) -> RouterState:
        router = self.server.router_backend.router
        state: RouterState = ray.get(router.state.remote(), timeout=60)
        return state

    def greedy(self, i: int) -> GenerationResult:
        """MAX_TOKENS greedy tokens after prompt ``i``."""
        return self.client.generate(
            PROMPTS[i], max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True
        )

    def greedy_stream(self, i: int) -> Iterator[GenerationResult]:
        """LONG greedy tokens after prompt ``i``, as they come."""
        return self.client.generate_stream(
            PROMPTS[i], max_tokens=LONG, temperature=0.0, ignore_eos=True
        )


@pytest.fixture(scope="module")
def served(
    two_nodes: Cluster,
    planned: dict[str, Any],
    layout: tuple[int, int],
    reference: dict[int, list[int]],
) -> Iterator[Served]:
    with (
        ServingThread(cpu_config(planned, layout)) as server,
        SpecrayClient(server.grpc_address, timeout_s=300) as client,
    ):
        yield Served(server, client, reference, layout)


def shard_nodes(shards: int) -> list[list[str]]:
    """The nodes of each placed target group's shards, sorted."""
    groups = ray.util.placement_group_table().values()
    placed = [g for g in groups if g["state"] == "CREATED" and len(g["bundles"]) == shards]
    return [sorted(g["bundles_to_node_id"].values()) for g in placed]


def spread_evenly(nodes: list[str], shards: int) -> bool:
    """Both nodes hold half of the group's shards."""
    return len(set(nodes)) == 2 and nodes.count(nodes[0]) == shards // 2


@pytest.mark.slow
def test_grpc_and_http_give_the_reference(served: Served) -> None:
    (target,) = served.router_state().targets
    assert len(target.shard_pids) == served.shards  # one replica of tp x ep shards
    info = served.client.model_info()
    assert (info.tensor_parallel_size, info.expert_parallel_size) == served.layout
    (nodes,) = shard_nodes(served.shards)
    assert spread_evenly(nodes, served.shards)
    drafted = 0
    for i in range(len(PROMPTS)):
        result = served.greedy(i)
        assert result.token_ids == served.reference[i][:MAX_TOKENS]
        plain = served.client.generate(
            PROMPTS[i], max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, speculative=False
        )
        assert plain.token_ids == result.token_ids
        drafted += result.draft_tokens
        body = {"prompt": PROMPTS[i], "max_tokens": MAX_TOKENS, "temperature": 0}
        body["ignore_eos"] = True
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        url = f"{served.server.http_url}/v1/completions"
        with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=300) as r:
            completion = json.loads(r.read())
        assert completion["choices"][0]["text"] == result.text
        assert completion["usage"]["completion_tokens"] == MAX_TOKENS
    assert drafted > 0  # the MTP replica proposed


@pytest.mark.slow
def test_specray_scale_drafts_keeps_the_output(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    scaling = threading.Event()
    outcomes: list[bool] = []

    def producer() -> None:
        i = 0
        while not scaling.is_set() or i < 2:
            expected = served.reference[i % 2][:MAX_TOKENS]
            outcomes.append(served.greedy(i % 2).token_ids == expected)
            i += 1

    def scale(drafts: int) -> int:
        flags = ["--timeout", "300", "--json", "--drafts", str(drafts)]
        assert main(["scale", "--server", served.server.grpc_address, *flags]) == 0
        result: dict[str, Any] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        layout = (result["tensor_parallel_size"], result["expert_parallel_size"])
        assert layout == served.layout
        return int(result["drafts"])

    with ThreadPoolExecutor(1) as pool:
        worker = pool.submit(producer)
        wait_until(lambda: len(outcomes) >= 1, timeout_s=300)
        up = scale(2)
        assert len(served.router_state().drafts) == 2
        down = scale(1)
        scaling.set()
        worker.result(600)
    assert (up, down) == (2, 1)
    assert all(outcomes) and len(outcomes) >= 3


@pytest.mark.slow
def test_killed_draft_replica_falls_back(served: Served) -> None:
    before = served.router_state()
    stream = served.greedy_stream(0)
    chunks = [next(stream)]
    os.kill(before.drafts[0].pid, signal.SIGKILL)
    chunks += list(stream)
    assert [t for c in chunks for t in c.token_ids] == served.reference[0]
    assert chunks[-1].fallback
    wait_until(
        lambda: served.router_state().recovery.draft_restarts > before.recovery.draft_restarts,
        timeout_s=300,
    )


@pytest.mark.slow
def test_killed_expert_shard_restarts_the_group_and_loses_nothing(served: Served) -> None:
    """One shard of the only target group dies mid-stream: the whole group is
    replaced, the requests replay their committed tokens on it, none fails."""
    before = served.router_state()
    (target,) = before.targets
    streams = [served.greedy_stream(i) for i in range(len(PROMPTS))]
    with ThreadPoolExecutor(len(streams)) as pool:
        firsts = list(pool.map(next, streams))
        os.kill(target.shard_pids[1], signal.SIGKILL)
        rests = list(pool.map(list, streams))
    for i, (first, rest) in enumerate(zip(firsts, rests, strict=True)):
        tokens = [t for c in [first, *rest] for t in c.token_ids]
        assert tokens == served.reference[i], i
    after = served.router_state()
    assert after.recovery.target_restarts == before.recovery.target_restarts + 1
    (restarted,) = after.targets
    assert set(restarted.shard_pids).isdisjoint(target.shard_pids)
    (nodes,) = shard_nodes(served.shards)
    assert len(set(nodes)) == 2  # SPREAD is best effort: even only when both nodes are free
