"""What runs on the nodes: a torch.distributed all-reduce sweep in one rank's
process, and nccl-tests' ``all_reduce_perf`` over a node's GPUs."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

import ray
import torch

from specray.actors.parallel.distributed import init_tp_group, reserve_port

ALL_REDUCE_PERF = "all_reduce_perf"


@dataclass(frozen=True)
class SweepSpec:
    """One rank's part of an all-reduce sweep."""

    rank: int
    size: int
    master_addr: str
    master_port: int
    sizes: tuple[int, ...]  # bytes, each a whole number of elements
    dtype: str  # torch dtype name, e.g. "float32"
    warmup: int
    iters: int
    timeout_s: float
    device: str  # "cpu" or "cuda"


@dataclass(frozen=True)
class NodeFacts:
    """What a node offers the check."""

    node_id: str
    node_ip: str
    gpus: int  # CUDA devices this process (holding all the node's GPUs) sees
    all_reduce_perf: str | None  # its path, when on PATH


def node_facts() -> NodeFacts:
    """Run inside a task on the node, holding the node's GPUs."""
    return NodeFacts(
        node_id=ray.get_runtime_context().get_node_id(),
        node_ip=ray.util.get_node_ip_address(),
        gpus=torch.cuda.device_count() if torch.cuda.is_available() else 0,
        all_reduce_perf=shutil.which(ALL_REDUCE_PERF),
    )


def all_reduce_perf_command(
    binary: str, gpus: int, min_bytes: int, max_bytes: int, factor: int, warmup: int, iters: int
) -> list[str]:
    """One process driving all ``gpus`` of the node (``-g``), float data, as nccl-tests' README."""
    return [
        binary,
        *("-b", str(min_bytes), "-e", str(max_bytes), "-f", str(factor)),
        *("-g", str(gpus), "-w", str(warmup), "-n", str(iters), "-d", "float"),
    ]


def run_all_reduce_perf(command: Sequence[str], timeout_s: float) -> str:
    """Its stdout; a nonzero exit raises with the tail of its output."""
    done = subprocess.run(
        list(command), capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-2000:]
        raise RuntimeError(f"{command[0]} exited with {done.returncode}: {tail}")
    return done.stdout


class AllReduceProbe:
    """Ray actor body: one rank of a torch.distributed group that times
    all-reduces. Started in two steps, like a target shard, so rank 0 can
    reserve the rendezvous port on its own node first."""

    def __init__(self) -> None:
        self._listen: socket.socket | None = None

    def where(self) -> tuple[str, str]:
        """(node id, node IP) of this rank."""
        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()

    def reserve_rendezvous(self) -> tuple[str, int]:
        node_ip = ray.util.get_node_ip_address()
        self._listen = reserve_port(node_ip)
        return node_ip, int(self._listen.getsockname()[1])

    def sweep(self, spec: SweepSpec) -> list[float]:
        """Seconds per all-reduce at each size, as this rank saw them."""
        torch.set_num_threads(1)
        device = torch.device("cuda", 0) if spec.device == "cuda" else torch.device("cpu")
        group = init_tp_group(
            spec.rank,
            spec.size,
            spec.master_addr,
            spec.master_port,
            timeout=spec.timeout_s,
            listen_socket=self._listen,
            device=device if device.type == "cuda" else None,
        )
        self._listen = None
        dtype = getattr(torch, spec.dtype)
        itemsize = torch.empty((), dtype=dtype).element_size()
        seconds: list[float] = []
        try:
            for size in spec.sizes:
                # Zeros: repeated sums of anything else overflow within the sweep.
                buffer = torch.zeros(size // itemsize, dtype=dtype, device=device)
                for _ in range(spec.warmup):
                    group.all_reduce(buffer)
                _synchronize(device)
                start = time.perf_counter()
                for _ in range(spec.iters):
                    group.all_reduce(buffer)
                _synchronize(device)
                seconds.append((time.perf_counter() - start) / spec.iters)
        finally:
            group.close()
        return seconds


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
