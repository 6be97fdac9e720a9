"""A fake multi-node Ray cluster on 127.0.0.1, for the tests that need more
than one node (``ray.cluster_utils.Cluster``: one raylet per node)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import ray
from ray.cluster_utils import Cluster

from specray.cluster.local_ray import pin_loopback


@contextmanager
def loopback_cluster(tmp_prefix: str, nodes: Sequence[dict[str, Any]]) -> Iterator[Cluster]:
    """A head without CPUs plus one node per entry of ``nodes`` (its
    ``add_node`` options), all on 127.0.0.1. Any Ray this process had
    joined is shut down first, and again on the way out.

    Ray's files, its address file among them, go to a private temp dir
    (``tmp_prefix``), so nobody else's plain ``ray.init()`` on this machine
    joins this cluster by accident."""
    ray.shutdown()
    pin_loopback()
    saved = os.environ.get("RAY_TMPDIR")
    ray_tmp = tempfile.mkdtemp(prefix=tmp_prefix)  # short: Ray's socket paths live under it
    os.environ["RAY_TMPDIR"] = ray_tmp
    loopback: dict[str, Any] = {"node_ip_address": "127.0.0.1", "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args={**loopback, "num_cpus": 0})
    try:
        for options in nodes:
            cluster.add_node(**loopback, **options)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        if saved is None:
            del os.environ["RAY_TMPDIR"]
        else:
            os.environ["RAY_TMPDIR"] = saved
        shutil.rmtree(ray_tmp, ignore_errors=True)
