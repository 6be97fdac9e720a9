"""The Ray side of ``specray cluster check``: probe every node, measure
all-reduce within each node and across nodes, return nccl-tests rows.

Per node, with at least two GPUs and ``all_reduce_perf`` on PATH, nccl-tests
runs over the node's GPUs in one Ray task (``--mode auto`` or
``nccl-tests``). Otherwise a torch.distributed group of actors pinned to the
node times all-reduces: one rank per GPU over NCCL, or ``ranks_per_node``
CPU ranks over gloo on a cluster without GPUs. Node groups run at the same
time (they share no links); the cross-node group (one rank per node, NCCL or
gloo, never nccl-tests, which needs MPI across nodes) runs after them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import ray
import torch
from ray.exceptions import GetTimeoutError, RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from specray.cluster.preflight.nccl_tests import (
    NCCL_TYPE_NAMES,
    parse_all_reduce_perf,
    row_from_time,
    sweep_sizes,
)
from specray.cluster.preflight.probe import (
    AllReduceProbe,
    NodeFacts,
    SweepSpec,
    all_reduce_perf_command,
    node_facts,
    run_all_reduce_perf,
)
from specray.cluster.preflight.report import GroupResult, Method

Mode = Literal["auto", "nccl-tests", "torch"]
GPU_MAX_BYTES = 128 << 20  # nccl-tests' usual sweep end
CPU_MAX_BYTES = 1 << 20  # gloo over TCP: larger sizes only take longer


class PreflightError(RuntimeError):
    """The check could not measure a node (not: a node measured too slow)."""


@dataclass(frozen=True)
class CheckSettings:
    """What to measure and how long to wait."""

    min_bytes: int = 8
    max_bytes: int | None = None  # default: GPU_MAX_BYTES with GPUs, else CPU_MAX_BYTES
    factor: int = 2
    dtype: str = "float32"
    warmup: int = 5
    iters: int = 20
    mode: Mode = "auto"
    ranks_per_node: int = 2  # gloo ranks on a node without GPUs
    cross_node: bool = True
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.dtype not in NCCL_TYPE_NAMES:
            raise ValueError(
                f"--dtype must be one of {sorted(NCCL_TYPE_NAMES)}, got {self.dtype!r}"
            )
        itemsize = torch.empty((), dtype=self.torch_dtype).element_size()
        # Raises for a bad --min-bytes / --max-bytes / --factor before Ray starts.
        sweep_sizes(self.min_bytes, self.max_bytes or self.min_bytes, self.factor, itemsize)
        for name, least in (("warmup", 0), ("iters", 1), ("ranks_per_node", 2)):
            if getattr(self, name) < least:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} must be >= {least}, got {getattr(self, name)}")
        if self.timeout_s <= 0:
            raise ValueError(f"--timeout must be > 0, got {self.timeout_s}")

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype: torch.dtype = getattr(torch, self.dtype)
        return dtype


@dataclass(frozen=True)
class _Node:
    """A node as Ray advertises it and as its probe task saw it."""

    facts: NodeFacts
    ray_gpus: int

    @property
    def name(self) -> str:
        return f"node {self.facts.node_ip} ({self.facts.node_id[:8]})"


def run_check(settings: CheckSettings) -> list[GroupResult]:
    """Measure every alive node of the connected Ray cluster, then across nodes."""
    nodes = _inspect_nodes(settings.timeout_s)
    gpu_cluster = any(node.ray_gpus for node in nodes)
    max_bytes = settings.max_bytes or (GPU_MAX_BYTES if gpu_cluster else CPU_MAX_BYTES)
    itemsize = torch.empty((), dtype=settings.torch_dtype).element_size()
    sizes = tuple(sweep_sizes(settings.min_bytes, max_bytes, settings.factor, itemsize))
    pending: list[tuple[_Node, _NcclTestsJob | _TorchSweep]] = []
    results: dict[str, GroupResult] = {}
    try:
        for node in nodes:
            skipped = _skip_reason(node, gpu_cluster)
            if skipped:
                results[node.facts.node_id] = GroupResult(
                    "node", node.name, (node.facts.node_id,), None, node.ray_gpus, skipped=skipped
                )
            else:
                pending.append((node, _start_node(node, settings, sizes, max_bytes)))
        for node, job in pending:
            results[node.facts.node_id] = job.result(node.name)
    finally:
        # After a failure, the other nodes' ranks must not linger holding GPUs.
        for _, job in pending:
            job.cancel()
    groups = [results[node.facts.node_id] for node in nodes]
    # Across nodes: every GPU node (one GPU is enough), or every node of a CPU cluster.
    measured = [node for node in nodes if node.ray_gpus or not gpu_cluster]
    if settings.cross_node and len(measured) >= 2:
        device = "cuda" if gpu_cluster else "cpu"
        ids = [node.facts.node_id for node in measured]
        sweep = _TorchSweep(ids, device, sizes, settings)
        name = f"cross-node ({len(ids)} nodes, one rank each)"
        groups.append(sweep.result(name, scope="cross-node"))
    return groups


def _skip_reason(node: _Node, gpu_cluster: bool) -> str | None:
    if gpu_cluster and node.ray_gpus == 0:
        return "no GPUs; on a GPU cluster only GPU nodes are checked"
    if gpu_cluster and node.ray_gpus == 1:
        return "one GPU: nothing to all-reduce within the node"
    return None


def _pinned(node_id: str) -> NodeAffinitySchedulingStrategy:
    return NodeAffinitySchedulingStrategy(node_id, soft=False)


def _inspect_nodes(timeout_s: float) -> list[_Node]:
    alive = [node for node in ray.nodes() if node["Alive"]]
    task = ray.remote(node_facts)
    refs = [
        task.options(
            num_cpus=0,
            num_gpus=int(node["Resources"].get("GPU", 0)),
            scheduling_strategy=_pinned(node["NodeID"]),
        ).remote()
        for node in alive
    ]
    try:
        facts: list[NodeFacts] = ray.get(refs, timeout=timeout_s)
    except GetTimeoutError as err:
        raise PreflightError(
            f"a node did not answer within {timeout_s:g} s (are its GPUs held by running actors?)"
        ) from err
    return [
        _Node(fact, int(node["Resources"].get("GPU", 0)))
        for fact, node in zip(facts, alive, strict=True)
    ]


def _start_node(
    node: _Node, settings: CheckSettings, sizes: tuple[int, ...], max_bytes: int
) -> _NcclTestsJob | _TorchSweep:
    has_binary = node.ray_gpus >= 2 and node.facts.all_reduce_perf is not None
    if settings.mode == "nccl-tests" and not has_binary:
        raise PreflightError(
            f"{node.name}: --mode nccl-tests needs all_reduce_perf on PATH and >= 2 GPUs "
            f"(found {node.facts.all_reduce_perf or 'no binary'}, {node.ray_gpus} GPUs); "
            "see docs/scale.md for installing nccl-tests"
        )
    if has_binary and settings.mode != "torch":
        return _NcclTestsJob(node, settings, max_bytes)
    if node.ray_gpus and node.facts.gpus != node.ray_gpus:
        raise PreflightError(
            f"{node.name}: Ray offers {node.ray_gpus} GPUs but torch sees {node.facts.gpus} "
            "(a CPU build of torch, or a driver problem)"
        )
    if node.ray_gpus >= 2:
        return _TorchSweep([node.facts.node_id] * node.ray_gpus, "cuda", sizes, settings)
    return _TorchSweep([node.facts.node_id] * settings.ranks_per_node, "cpu", sizes, settings)


class _NcclTestsJob:
    """``all_reduce_perf`` in one task holding all of a node's GPUs."""

    def __init__(self, node: _Node, settings: CheckSettings, max_bytes: int) -> None:
        assert node.facts.all_reduce_perf is not None
        self.gpus = node.ray_gpus
        self.timeout_s = settings.timeout_s
        command = all_reduce_perf_command(
            node.facts.all_reduce_perf,
            node.ray_gpus,
            settings.min_bytes,
            max_bytes,
            settings.factor,
            settings.warmup,
            settings.iters,
        )
        task = ray.remote(run_all_reduce_perf).options(
            num_cpus=0, num_gpus=node.ray_gpus, scheduling_strategy=_pinned(node.facts.node_id)
        )
        self.node_id = node.facts.node_id
        self.ref = task.remote(command, settings.timeout_s)

    def result(self, name: str) -> GroupResult:
        try:
            text = ray.get(self.ref, timeout=self.timeout_s + 30)
            run = parse_all_reduce_perf(text)
        except (RayError, ValueError) as err:
            raise PreflightError(f"{name}: all_reduce_perf failed: {err}") from err
        return GroupResult("node", name, (self.node_id,), "nccl-tests", self.gpus, run.rows)

    def cancel(self) -> None:
        with contextlib.suppress(RayError):
            ray.cancel(self.ref, force=True)


class _TorchSweep:
    """A torch.distributed group, one actor per entry of ``node_ids``, timing all-reduces."""

    def __init__(
        self, node_ids: Sequence[str], device: str, sizes: tuple[int, ...], settings: CheckSettings
    ) -> None:
        self.node_ids = tuple(node_ids)
        self.device = device
        self.sizes = sizes
        self.settings = settings
        actor = ray.remote(AllReduceProbe)
        self.actors: list[Any] = [
            actor.options(
                num_cpus=0,
                num_gpus=1 if device == "cuda" else 0,
                scheduling_strategy=_pinned(node_id),
                max_restarts=0,
            ).remote()
            for node_id in node_ids
        ]
        self.refs: list[Any] = []
        try:
            master_addr, master_port = ray.get(
                self.actors[0].reserve_rendezvous.remote(), timeout=settings.timeout_s
            )
        except (RayError, GetTimeoutError) as err:
            self.cancel()
            raise PreflightError(f"could not start all-reduce ranks: {err}") from err
        self.refs = [
            probe.sweep.remote(
                SweepSpec(
                    rank=rank,
                    size=len(self.actors),
                    master_addr=master_addr,
                    master_port=master_port,
                    sizes=sizes,
                    dtype=settings.dtype,
                    warmup=settings.warmup,
                    iters=settings.iters,
                    timeout_s=settings.timeout_s,
                    device=device,
                )
            )
            for rank, probe in enumerate(self.actors)
        ]

    def result(self, name: str, scope: Literal["node", "cross-node"] = "node") -> GroupResult:
        try:
            per_rank: list[list[float]] = ray.get(self.refs, timeout=self.settings.timeout_s)
        except (RayError, GetTimeoutError) as err:
            raise PreflightError(f"{name}: all-reduce sweep failed: {err}") from err
        finally:
            self.cancel()
        dtype = self.settings.torch_dtype
        itemsize = torch.empty((), dtype=dtype).element_size()
        ranks = len(per_rank)
        # The slowest rank's time: an all-reduce is done when every rank has it.
        rows = tuple(
            row_from_time(size, itemsize, NCCL_TYPE_NAMES[self.settings.dtype], max(times), ranks)
            for size, times in zip(self.sizes, zip(*per_rank, strict=True), strict=True)
        )
        method: Method = "torch-nccl" if self.device == "cuda" else "torch-gloo"
        unique = tuple(dict.fromkeys(self.node_ids))
        return GroupResult(scope, name, unique, method, ranks, rows)

    def cancel(self) -> None:
        """Kill the ranks (idempotent)."""
        for probe in self.actors:
            with contextlib.suppress(RayError):
                ray.kill(probe, no_restart=True)
