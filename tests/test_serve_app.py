"""The Ray Serve application: how it is composed and configured (fast, no
Ray), and for real on a loopback Ray (slow): deployed from a Serve config as
``serve deploy`` does, both front doors on 127.0.0.1, and a user_config
change that rescales the drafts in place, keeping the target group and the
ingress replica."""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema
from serving_helpers import save_served_model, wait_until

from specray.deploy.admin_client import AdminClient
from specray.deploy.client import SpecrayClient
from specray.deploy.config import ServeConfig
from specray.deploy.serve_app import (
    INGRESS_DEPLOYMENT,
    ROUTER_DEPLOYMENT,
    ReplicaCounts,
    app_builder,
)

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
APP_NAME = "specray"


def serve_schema(path: Path) -> ServeDeploySchema:
    return ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))


def kuberay_manifests() -> dict[str, Any]:
    text = (DEPLOY / "kuberay" / "rayservice.yaml").read_text()
    return {doc["kind"]: doc for doc in yaml.safe_load_all(text)}


def kuberay_serve_config() -> dict[str, Any]:
    serve_config: dict[str, Any] = yaml.safe_load(
        kuberay_manifests()["RayService"]["spec"]["serveConfigV2"]
    )
    return serve_config


def deployments(app: Any) -> dict[str, Any]:
    """The bound deployments of an application, by name (ingress first)."""
    ingress = app._bound_deployment
    holder = ingress.init_args[1]._bound_deployment
    return {ingress.name: ingress, holder.name: holder}


@pytest.mark.parametrize("source", ["serve_config.yaml", "rayservice.yaml"])
def test_configs_keep_the_front_doors_on_loopback(source: str) -> None:
    if source == "serve_config.yaml":
        schema = serve_schema(DEPLOY / source)
    else:
        schema = ServeDeploySchema.model_validate(kuberay_serve_config())
    assert schema.http_options.host == "127.0.0.1"  # Serve's proxy: the OpenAI API
    assert schema.grpc_options.grpc_servicer_functions == []  # Serve's gRPC proxy stays off
    (app,) = schema.applications
    assert app.import_path == "specray.deploy.serve_app:app_builder"
    config = ServeConfig.model_validate(app.args)
    assert (config.host, config.backend, config.admin_enabled) == ("127.0.0.1", "router", True)
    # The two scaling knobs are the router holder's user_config.
    knobs = {d.name: d.user_config for d in app.deployments}
    counts = ReplicaCounts.model_validate(knobs[ROUTER_DEPLOYMENT])
    assert counts.num_targets >= 1 and counts.num_drafts >= 1
    assert list(deployments(app_builder(app.args))) == [INGRESS_DEPLOYMENT, ROUTER_DEPLOYMENT]


def test_kuberay_manifest_has_gpu_targets_and_cpu_drafts() -> None:
    manifests = kuberay_manifests()
    cluster = manifests["RayService"]["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    gpu = groups["gpu-targets"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    cpu = groups["cpu-drafts"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == 2 and "nvidia.com/gpu" not in cpu
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    app = kuberay_serve_config()["applications"][0]
    router = ServeConfig.model_validate(app["args"]).router
    # A GPU pod's CPUs fit exactly one target replica, so drafts land on the CPU group.
    gpu_cpus = int(groups["gpu-targets"]["rayStartParams"]["num-cpus"])
    assert router.gpus_per_shard == 1 and router.tp * (router.cpus_per_shard or 0) == gpu_cpus
    assert app["runtime_env"]["pip"] and "NetworkPolicy" in manifests


def test_the_default_config_is_a_tp2_coder_with_ngram_and_a_draft_model() -> None:
    router = ServeConfig.model_validate({}).router
    assert (router.target, router.tp, router.dtype) == (
        "qwen2.5-coder-1.5b-instruct",
        2,
        "bfloat16",
    )
    drafter = router.drafter
    assert drafter is not None and (drafter.kind, drafter.model) == (
        "hybrid",
        "qwen2.5-coder-0.5b-instruct",
    )
    assert drafter.spec.name == "ngram+qwen2.5-coder-0.5b-instruct"  # what GetModelInfo reports
    config = serve_schema(DEPLOY / "serve_config.yaml").applications[0].args
    assert ServeConfig.model_validate(config).router == router


def test_build_app_composes_ingress_and_router_holder() -> None:
    args = {"router": {"target": "/models/t", "drafts": [{"kind": "ngram"}], "num_drafts": 3}}
    bound = deployments(app_builder(args))
    assert list(bound) == [INGRESS_DEPLOYMENT, ROUTER_DEPLOYMENT]
    ingress, holder = bound[INGRESS_DEPLOYMENT], bound[ROUTER_DEPLOYMENT]
    assert holder.user_config == {"num_targets": 1, "num_drafts": 3}
    assert ingress.num_replicas == holder.num_replicas == 1
    assert ingress.ray_actor_options["num_cpus"] == holder.ray_actor_options["num_cpus"] == 0
    # Both get the same validated settings; the holder is bound into the ingress.
    settings = ServeConfig.model_validate(ingress.init_args[0])
    assert settings.router.target == "/models/t" and settings.router.drafter is not None
    assert ingress.init_args[0] == holder.init_args[0]


def test_build_app_refuses_the_engine_backend_and_unknown_keys() -> None:
    with pytest.raises(ValueError, match="backend: router"):
        app_builder({"backend": "engine"})
    with pytest.raises(ValueError, match="extra"):
        app_builder({"router": {"num_replica": 2}})
    with pytest.raises(ValueError):
        ReplicaCounts.model_validate({"num_targets": 0, "num_drafts": 1})


# -- for real ------------------------------------------------------------------------


def outward_address() -> str | None:
    """This machine's address on its default route, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))  # UDP: sends nothing
        except OSError:
            return None
        address: str = probe.getsockname()[0]
    return None if address.startswith("127.") else address


def reachable(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(5)
        return sock.connect_ex((host, port)) == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def post(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return response.status, json.loads(response.read())


@pytest.mark.slow
def test_serve_deploy_on_loopback_rescales_drafts_in_place(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    import ray
    from ray import serve

    from specray.cluster.local_ray import start_ray

    model_dir = save_served_model(tmp_path_factory.mktemp("served"))
    http_port = free_port()
    router = {
        "target": str(model_dir),
        "tp": 1,
        "dtype": "float32",
        "drafts": [{"kind": "ngram", "max_ngram": 3}],
        "adaptive": False,
        "num_slots": 4,
        "max_len": 512,
        "threads_per_shard": 1,
        "profile": False,
    }

    def config(num_drafts: int) -> ServeDeploySchema:
        app = {
            "name": APP_NAME,
            "route_prefix": "/",
            "import_path": "specray.deploy.serve_app:app_builder",
            "args": {"router": router, "port": 0, "http_port": None},
            "deployments": [
                {
                    "name": ROUTER_DEPLOYMENT,
                    "user_config": {"num_targets": 1, "num_drafts": num_drafts},
                }
            ],
        }
        return ServeDeploySchema.model_validate(
            {
                "proxy_location": "HeadOnly",
                "http_options": {"host": "127.0.0.1", "port": http_port},
                "applications": [app],
            }
        )

    info = start_ray(num_cpus=8)
    try:
        serve.start(
            proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": http_port}
        )
        controller = serve.context._get_global_client()  # what `serve deploy` calls via REST
        assert controller is not None
        # Not _blocking: its 60 s wait is too short for Serve on 2 busy cores.
        controller.deploy_apps(config(num_drafts=1), _blocking=False)
        wait_until(lambda: serve.status().applications[APP_NAME].status == "RUNNING", timeout_s=300)
        address = serve.get_app_handle(APP_NAME).grpc_address.remote().result(timeout_s=120)
        assert address.startswith("127.0.0.1:")
        outward = outward_address()
        if outward is not None:  # neither front door answers on the outward interface
            port = int(address.rsplit(":", 1)[1])
            assert not reachable(outward, port) and not reachable(outward, http_port)

        holder = serve.get_deployment_handle(ROUTER_DEPLOYMENT, APP_NAME)
        attachment = holder.attachment.remote().result(timeout_s=120)
        before = ray.get(attachment.router.state.remote())

        prompt = "x = [1, 2, 3]\ny = [1, 2, 3]\nz = [1, 2, 3]\n"
        common = {"max_tokens": 24, "temperature": 0.0, "ignore_eos": True}
        with SpecrayClient(address, timeout_s=120) as client:
            reference = client.generate(prompt, speculative=False, **common).token_ids
            assert client.generate(prompt, **common).token_ids == reference
        status, body = post(
            f"http://127.0.0.1:{http_port}/v1/completions", {"prompt": prompt, **common}
        )
        assert status == 200 and body["usage"]["completion_tokens"] == 24

        controller.deploy_apps(config(num_drafts=2), _blocking=False)
        with AdminClient(address, timeout_s=60) as admin:
            wait_until(lambda: admin.state().drafts == 2, timeout_s=120)
        after = ray.get(attachment.router.state.remote())
        # The same router and target shards, the same ingress (same gRPC port).
        assert [t.shard_pids for t in after.targets] == [t.shard_pids for t in before.targets]
        assert len(after.drafts) == 2
        with SpecrayClient(address, timeout_s=120) as client:
            assert client.generate(prompt, **common).token_ids == reference
    finally:
        serve.shutdown()
        if info.started_here:
            ray.shutdown()
