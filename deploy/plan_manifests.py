"""A plan's best layout as a Ray Serve config and a KubeRay RayService,
in the schema of ``deploy/serve_config.yaml`` and ``deploy/kuberay/rayservice.yaml``.

A replica of the plan is one target group of ``tp × ep`` shards, one GPU
each, with the plan's split as ``tp:`` and ``ep:`` (the planner picks only
layouts the target group runs). Both documents are validated against
``ServeConfig`` before they are written.
"""

from __future__ import annotations

import math
from typing import Any

import yaml

from specray.cluster.planning.planner import Candidate, Plan
from specray.deploy.config import ServeConfig

CPUS_PER_SHARD = 2
SHM_GI = 64  # NCCL's shared-memory transport between the GPUs of a pod


def router_settings(plan: Plan, target: str) -> dict[str, Any]:
    """``router:`` keys (deploy/config.py RouterSettings) for the plan's best layout."""
    best = _best(plan)
    drafts = plan.drafts
    drafter: list[dict[str, Any]] = []
    if drafts is not None:
        entry: dict[str, Any] = {"kind": drafts.kind}
        if drafts.model:
            entry["model"] = drafts.model
        entry.update(
            cpus=drafts.cpus_each,
            threads=max(1, int(drafts.cpus_each)),
            num_slots=drafts.slots_each,
        )
        drafter = [entry]
    # specray's KV cache gives every slot max_len positions up front.
    per_slot = best.memory.kv_tokens_per_replica // best.batch
    return {
        "target": target,
        "tp": best.layout.serve_tp,
        "ep": best.layout.serve_ep,
        "dtype": "bfloat16",
        "gpus_per_shard": 1,
        "cpus_per_shard": CPUS_PER_SHARD,
        "threads_per_shard": CPUS_PER_SHARD,
        "strategy": "STRICT_PACK" if best.layout.gpus <= plan.shape.gpus_per_node else "PACK",
        "num_targets": best.replicas,
        "num_slots": best.batch,
        "max_len": max(2, min(best.memory.max_request_context, per_slot)),
        "k": plan.settings.spec.gamma,
        "adaptive": True,
        "drafts": drafter,
        "num_drafts": drafts.replicas if drafts else 0,
        "timeout_s": 120.0,
        "start_timeout_s": 3600.0,  # placing and loading a terabyte of weights
    }


def serve_app_args(plan: Plan, target: str) -> dict[str, Any]:
    """The application's ``args``: ``specray serve`` config keys, validated."""
    args = {
        "host": "127.0.0.1",
        "port": 50051,
        "http_port": None,
        "drain_timeout_s": 30,
        "router": router_settings(plan, target),
    }
    ServeConfig.model_validate(args)
    return args


def serve_config(plan: Plan, target: str) -> dict[str, Any]:
    """A Ray Serve config like deploy/serve_config.yaml (``serve deploy FILE``)."""
    args = serve_app_args(plan, target)
    router = args["router"]
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": 8000},
        "applications": [
            {
                "name": "specray",
                "route_prefix": "/",
                "import_path": "specray.deploy.serve_app:app_builder",
                "args": args,
                "deployments": [
                    {
                        "name": "SpecrayRouter",
                        "user_config": {
                            "num_targets": router["num_targets"],
                            "num_drafts": router["num_drafts"],
                        },
                    },
                    {"name": "SpecrayIngress", "num_replicas": 1},
                ],
            }
        ],
    }


def rayservice(
    plan: Plan, target: str, image: str = "rayproject/ray:2.60.0-py311"
) -> list[dict[str, Any]]:
    """RayService, PVC and NetworkPolicy, shaped like deploy/kuberay/rayservice.yaml."""
    best = _best(plan)
    gpn = plan.shape.gpus_per_node
    serve = serve_config(plan, target)
    app = serve["applications"][0]
    app["runtime_env"] = {"pip": ["specray==0.1.0"], "env_vars": {"SPECRAY_HOME": "/models"}}
    head_only = {"num_cpus": 0, "resources": {"specray-head": 0.01}}
    for deployment in app["deployments"]:
        deployment["ray_actor_options"] = head_only
    gpu_pods = math.ceil(best.replicas * best.layout.gpus / gpn)
    weights_gi = plan.model.total_params * plan.settings.precision.weight_bytes / 2**30
    # Host memory: a node's share of the weights while they load, plus headroom.
    pod_memory_gi = math.ceil(weights_gi / gpu_pods * 1.25) + 64
    models_volume = {"name": "models", "persistentVolumeClaim": {"claimName": "specray-models"}}
    mounts = [{"name": "models", "mountPath": "/models"}]
    env = [{"name": "SPECRAY_HOME", "value": "/models"}]
    groups = [
        {
            "groupName": "gpu-targets",
            "replicas": gpu_pods,
            "minReplicas": gpu_pods,
            "maxReplicas": gpu_pods,
            "rayStartParams": {"num-cpus": str(gpn * CPUS_PER_SHARD), "num-gpus": str(gpn)},
            "template": _pod(
                f"{image}-gpu",
                {
                    "cpu": str(gpn * CPUS_PER_SHARD),
                    "memory": f"{pod_memory_gi}Gi",
                    "nvidia.com/gpu": gpn,
                },
                env,
                [*mounts, {"name": "shm", "mountPath": "/dev/shm"}],
                [
                    models_volume,
                    {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{SHM_GI}Gi"}},
                ],
            ),
        }
    ]
    drafts = plan.drafts
    if drafts is not None and drafts.replicas:
        cpus = math.ceil(drafts.replicas * drafts.cpus_each)
        groups.append(
            {
                "groupName": "cpu-drafts",
                "replicas": 1,
                "minReplicas": 1,
                "maxReplicas": max(1, math.ceil(cpus / 16)),
                "rayStartParams": {"num-cpus": str(min(cpus, 16))},
                "template": _pod(
                    image,
                    {"cpu": str(min(cpus, 16)), "memory": "32Gi"},
                    env,
                    mounts,
                    [models_volume],
                ),
            }
        )
    service = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": "specray"},
        "spec": {
            "serveConfigV2": to_yaml([serve]),
            "rayClusterConfig": {
                "rayVersion": "2.60.0",
                "enableInTreeAutoscaling": True,
                "headGroupSpec": {
                    "rayStartParams": {"num-cpus": "0", "resources": '"{\\"specray-head\\": 1}"'},
                    "template": _pod(
                        image, {"cpu": "2", "memory": "8Gi"}, env, mounts, [models_volume]
                    ),
                },
                "workerGroupSpecs": groups,
            },
        },
    }
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "specray-models"},
        "spec": {
            "accessModes": ["ReadWriteMany"],
            "resources": {"requests": {"storage": f"{math.ceil(weights_gi * 1.1)}Gi"}},
        },
    }
    ray_pods = {"matchExpressions": [{"key": "ray.io/node-type", "operator": "Exists"}]}
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "specray-ray-internal"},
        "spec": {
            "podSelector": ray_pods,
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [
                        {"podSelector": ray_pods},
                        {
                            "namespaceSelector": {
                                "matchLabels": {"kubernetes.io/metadata.name": "ray-system"}
                            }
                        },
                    ]
                }
            ],
        },
    }
    return [service, pvc, policy]


def header(plan: Plan) -> str:
    """The YAML comment: the plan behind the file and what it expects."""
    best = _best(plan)
    s = plan.settings
    lines = [
        f"Generated by `specray plan` for {plan.model.name} on {plan.shape.nodes} x "
        f"{plan.shape.gpus_per_node} {plan.gpu.name} (docs/scale.md).",
        f"Layout: {best.layout.label}, {best.replicas} x {best.layout.gpus} GPUs; "
        f"weights {s.precision.weights}, KV {s.precision.kv}.",
        f"Expected: {best.memory.weight_bytes_per_gpu / 1e9:.1f} GB weights/GPU, "
        f"{best.memory.kv_tokens_per_replica} KV tokens/replica, decode step "
        f"{best.decode.total_s * 1e3:.2f} ms at {best.batch} requests/replica, "
        f"speculative speedup {best.speedup:.2f}x.",
        f"Each replica is tp {best.layout.serve_tp} x ep {best.layout.serve_ep} target shards.",
        "max_len is the replica's KV tokens / num_slots: specray reserves max_len per slot.",
    ]
    return "".join(f"# {line}\n" for line in lines)


def _best(plan: Plan) -> Candidate:
    if plan.best is None:
        raise ValueError("the plan has no layout that fits; nothing to emit")
    return plan.best


def _pod(
    image: str,
    resources: dict[str, Any],
    env: list[dict[str, str]],
    mounts: list[dict[str, str]],
    volumes: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "spec": {
            "containers": [
                {
                    "name": "ray",
                    "image": image,
                    "env": env,
                    "resources": {"requests": resources, "limits": resources},
                    "volumeMounts": mounts,
                }
            ],
            "volumes": volumes,
        }
    }


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (serveConfigV2), no anchors for shared dicts."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(documents: list[dict[str, Any]]) -> str:
    return yaml.dump_all(documents, Dumper=_Dumper, sort_keys=False)


def dump(plan: Plan, documents: list[dict[str, Any]]) -> str:
    """YAML documents under the plan's header comment."""
    return header(plan) + to_yaml(documents)
