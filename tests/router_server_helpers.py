"""What the router-backed gRPC tests share: the serve config they start
from, the router's state, and the client-side view of an error and of
health."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_helpers import ServingThread

from specray.cluster.router_state import RouterState
from specray.deploy.client import SpecrayError
from specray.deploy.config import ServeConfig

REPEATING = "x = [1, 2, 3]\ny = [1, 2, 3]\nz = [1, 2, 3]\n"


def router_config(model_dir: Path, **router: Any) -> ServeConfig:
    settings = {
        "target": str(model_dir),
        "tp": 1,
        "dtype": "float32",
        "drafts": [{"kind": "ngram", "max_ngram": 3}],
        "k": 4,
        "adaptive": False,
        "num_slots": 4,
        "max_len": 512,
        "threads_per_shard": 1,
        "profile": False,
        "timeout_s": 60,
        "start_timeout_s": 120,
    }
    return ServeConfig.model_validate(
        {
            "backend": "router",
            "router": settings | router,
            "port": 0,
            "http_port": None,
            "drain_timeout_s": 60,
            "limits": {"max_tokens": 256, "max_queued_requests": 8},
        }
    )


def router_state(server: ServingThread) -> RouterState:
    state: RouterState = ray.get(server.router_backend.router.state.remote(), timeout=60)
    return state


def rpc_error(call: Callable[[], object]) -> SpecrayError:
    with pytest.raises(SpecrayError) as caught:
        call()
    return caught.value


def health_status(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(), timeout=30).status)
