"""Start an embedded Ray bound to loopback, or join an existing cluster.

Left alone, Ray 2.60 advertises (and connects to) the machine's outward
address, even with ``_node_ip_address="127.0.0.1"``, because it resolves
"localhost" to the address the default route uses. Its switch for that,
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, is read once when ``ray`` is
imported, so :func:`pin_loopback` sets both the environment (for the
processes Ray starts) and the already-imported constant (for this one; a
private name of Ray's, checked by ``start_ray`` after every start).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ray
import ray._private.ray_constants as ray_constants

from specray.actors.parallel.distributed import is_loopback

LOOPBACK = "127.0.0.1"

# Workers inherit these: gloo binds to ``lo`` instead of the hostname's NIC.
LOOPBACK_WORKER_ENV = {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}


@dataclass(frozen=True)
class RayInfo:
    gcs_address: str
    node_ips: tuple[str, ...]  # of the alive nodes
    started_here: bool  # this call started an embedded instance


def pin_loopback() -> None:
    """Keep every Ray process started from here on 127.0.0.1.

    Also turns off Ray's usage-stats reporting, which would phone home.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def start_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    resources: Mapping[str, float] | None = None,
    namespace: str | None = None,
) -> RayInfo:
    """Start embedded Ray on loopback (``address=None``) or join ``address``.

    Joining a loopback address keeps this driver on loopback too. A Ray
    already initialised in this process is reused as it is. Raises
    ``RuntimeError`` (after shutting Ray down) if a loopback instance turns
    out to use any other address.
    """
    if ray.is_initialized():
        return describe_ray(started_here=False)
    local = address is None or is_loopback(address.rsplit(":", 1)[0])
    if local:
        pin_loopback()
    init_args: dict[str, Any] = dict(
        namespace=namespace,
        runtime_env={"env_vars": dict(LOOPBACK_WORKER_ENV)} if local else None,
        _node_ip_address=LOOPBACK if local else None,
    )
    if address is None:
        # "local" starts a fresh instance; None could join whichever cluster
        # another user last recorded in /tmp/ray.
        _init_fresh(
            include_dashboard=False,
            num_cpus=num_cpus,
            resources=dict(resources) if resources else None,
            **init_args,
        )
    else:
        ray.init(address=address, **init_args)
    info = describe_ray(started_here=address is None)
    if local:
        ips = (*info.node_ips, info.gcs_address.rsplit(":", 1)[0])
        if not all(is_loopback(ip) for ip in ips):
            ray.shutdown()
            raise RuntimeError(f"Ray did not stay on loopback: {ips}")
    return info


# Ray gives a fresh node's GCS and raylet fixed times to come up; on two
# busy cores (a previous instance still shutting down) they twice did not,
# in CI, at the same test, which passes on its own.
_STARTUP_TIMEOUTS = ("timed out during startup", "timed out waiting for file")


def _init_fresh(attempts: int = 3, pause_s: float = 5.0, **init_args: Any) -> None:
    """``ray.init(address="local")``, tried again (after a pause) if the new
    node timed out while starting; any other failure is raised at once."""
    for attempt in range(attempts):
        try:
            ray.init(address="local", **init_args)
            return
        except Exception as err:
            timed_out = any(t in str(err).lower() for t in _STARTUP_TIMEOUTS)
            if not timed_out or attempt == attempts - 1:
                raise
            ray.shutdown()
            time.sleep(pause_s)


def describe_ray(started_here: bool = False) -> RayInfo:
    nodes = [node for node in ray.nodes() if node["Alive"]]
    return RayInfo(
        gcs_address=ray.get_runtime_context().gcs_address,
        node_ips=tuple(node["NodeManagerAddress"] for node in nodes),
        started_here=started_here,
    )
