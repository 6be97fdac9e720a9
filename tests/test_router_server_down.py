"""The gRPC front door when the router's target group is down: UNAVAILABLE
with nothing internal leaked, health NOT_SERVING, and serving again once a
restart can finish."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import ray
from grpc_health.v1 import health_pb2
from router_server_helpers import REPEATING, health_status, router_config, router_state, rpc_error
from serving_helpers import ServingThread, save_served_model, wait_until

from specray.actors.engine.request import GenerationRequest, RequestOutput
from specray.cluster.errors import TargetGroupError
from specray.cluster.router_state import RouterHealth, RouterState
from specray.deploy.backend import ModelInfo
from specray.deploy.client import SpecrayClient
from specray.deploy.config import ServeConfig
from specray.deploy.router_backend import RouterAttachment, RouterBackend, attach


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_served_model(tmp_path_factory.mktemp("served"))


def down_router() -> Any:
    """A router stand-in whose target group is gone: every request fails the
    way the router fails it, with a TargetGroupError raised in its actor.
    (Made here so Ray ships the class by value: workers cannot import tests.)"""

    class DownRouter:
        async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
            raise TargetGroupError("verify: shard 1 died: secret internals", "died", (1,))
            yield  # an async generator, like the router's

        async def cancel(self, request_id: str) -> bool:
            return False

        async def health(self) -> RouterHealth:
            return RouterHealth(targets_up=0, targets_starting=0, drafts_up=0, outage_s=9.0)

        async def state(self) -> RouterState:
            return RouterState(
                waiting=0,
                running=0,
                targets=(),  # none up
                drafts=(),
                target_moves=0,
                draft_moves=0,
                draft_failures=0,
                metrics_port=None,
                verify_costs={},
                draft_costs={},
            )

    actor: Any = ray.remote(DownRouter)
    return actor.options(num_cpus=0).remote()


def test_target_group_error_is_unavailable(local_ray: None, model_dir: Path) -> None:
    info = ModelInfo(str(model_dir), (), 512, "float32", 1, 512, 4)
    router = down_router()
    attachment = RouterAttachment(router, info, None, num_slots=4, num_targets=1)
    config = router_config(model_dir)

    def build(config: ServeConfig) -> tuple[RouterBackend, Any]:
        return attach(config, attachment, owns_router=False)

    try:
        with (
            ServingThread(config, build=build) as server,
            SpecrayClient(server.grpc_address, timeout_s=60) as client,
        ):
            error = rpc_error(lambda: client.generate([5, 9, 5], max_tokens=4))
            assert error.code == grpc.StatusCode.UNAVAILABLE
            assert "target group is down" in error.details and "secret" not in error.details
            # No live target replica: health says so too.
            assert health_status(server.grpc_address) == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        ray.kill(router)


@pytest.mark.slow
def test_target_restart_past_its_bound_is_unavailable_then_serves_again(
    local_ray: None, model_dir: Path, tmp_path: Path
) -> None:
    """The only target shard dies and its restart cannot finish (its weights
    are moved away): health turns NOT_SERVING, and past the restart bound the
    request in flight and new ones get UNAVAILABLE. Once the weights are
    back, the retried restart finishes and the server serves again. (A
    restart within the bound is a delay, not an error: tests/test_router.py.)"""
    served = tmp_path / "served"
    shutil.copytree(model_dir, served)
    weights, away = served / "model.safetensors", served / "model.away"
    config = router_config(
        served, drafts=[], num_drafts=0, timeout_s=20, target_restart_timeout_s=1
    )
    with (
        ServingThread(config) as server,
        SpecrayClient(server.grpc_address, timeout_s=120) as client,
    ):
        stream = client.generate_stream(REPEATING, max_tokens=256, ignore_eos=True)
        assert next(stream).finish_reason is None
        (pid,) = router_state(server).targets[0].shard_pids
        weights.rename(away)
        os.kill(pid, signal.SIGKILL)
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        wait_until(lambda: health_status(server.grpc_address) == not_serving)
        error = rpc_error(lambda: list(stream))
        assert error.code == grpc.StatusCode.UNAVAILABLE, error
        error = rpc_error(lambda: client.generate(REPEATING, max_tokens=4))
        assert error.code == grpc.StatusCode.UNAVAILABLE, error
        away.rename(weights)
        serving = health_pb2.HealthCheckResponse.SERVING
        wait_until(lambda: health_status(server.grpc_address) == serving)
        assert len(client.generate(REPEATING, max_tokens=4, ignore_eos=True).token_ids) == 4
        assert router_state(server).recovery.target_restarts == 1
