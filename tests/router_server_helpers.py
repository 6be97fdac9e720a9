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


def router_serve_config(
    model_dir: Path, router: dict[str, Any], limits: dict[str, int], **serve: Any
) -> ServeConfig:
    """``specray serve`` over the router: one fp32 target shard of
    ``model_dir`` on one thread, n-gram drafts with k = 4, gRPC on an
    ephemeral port and no HTTP. ``router`` adds to or overrides the router
    section, ``serve`` the top level."""
    settings = {
        "target": str(model_dir),
        "tp": 1,
        "dtype": "float32",
        "drafts": [{"kind": "ngram", "max_ngram": 3}],
        "k": 4,
        "threads_per_shard": 1,
        "profile": False,
    }
    top = {"port": 0, "http_port": None, "limits": limits} | serve
    return ServeConfig.model_validate({"backend": "router", "router": settings | router, **top})


def router_config(model_dir: Path, **router: Any) -> ServeConfig:
    """The router server most tests share: a fixed γ, four slots of 512
    tokens, and deadlines with slack for a loaded machine."""
    settings = {
        "adaptive": False,
        "num_slots": 4,
        "max_len": 512,
        "timeout_s": 60,
        "start_timeout_s": 120,
    }
    limits = {"max_tokens": 256, "max_queued_requests": 8}
    return router_serve_config(model_dir, settings | router, limits, drain_timeout_s=60)


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
