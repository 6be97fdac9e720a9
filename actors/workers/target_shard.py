"""One shard of the target model, in its own process.

Every rank of a group receives the same calls in the same order and runs the
same batch; each holds only its slice of the weights and KV heads, and of a
mixture-of-experts model its share of the experts (a group of ``size = tp ×
ep`` ranks is a grid, :class:`~specray.actors.parallel.expert.ShardGrid`).
Rank 0 answers, the other ranks return ``None``: the caller that fans calls
out keeps rank 0's answer.
"""

from __future__ import annotations

import resource
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from specray.actors.engine.target import LocalTarget, VerifyInput, VerifyOutput
from specray.actors.model.loader import load_model
from specray.actors.parallel.distributed import TorchDistGroup, init_tp_group
from specray.actors.parallel.expert import ExpertShard, ShardGrid
from specray.actors.parallel.group import SingleGroup, TPGroup
from specray.actors.workers.progress import ForwardCount
from specray.actors.workers.shard_model import ShardModel
from specray.actors.workers.timed_group import CollectiveStats, TimedGroup


@dataclass(frozen=True)
class ShardSpec:
    """Everything one rank needs to join its group and load its slices."""

    model: ShardModel
    rank: int = 0
    size: int = 1  # ranks in the group: tp × ep
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    num_threads: int = 1
    timeout_s: float = 60.0  # every collective
    rendezvous_timeout_s: float = 300.0  # waiting for the other ranks to join
    device: str = "cpu"
    time_collectives: bool = False
    ep: int = 1  # expert-parallel rows of the grid; size // ep ranks per TP group

    @property
    def grid(self) -> ShardGrid:
        if self.size % self.ep:
            raise ValueError(f"a group of {self.size} ranks has no {self.ep} equal rows")
        return ShardGrid(self.size // self.ep, self.ep)


@dataclass
class ShardStats:
    """What one rank spent since the last reset."""

    verify_calls: int
    verify_s: float
    collectives: CollectiveStats | None  # None unless ``time_collectives``; the TP group's
    expert_collectives: CollectiveStats | None = None  # the MoE combine's, over the group


@dataclass
class ShardMemory:
    param_bytes: int
    rss_bytes: int
    peak_rss_bytes: int
    device_bytes: int  # allocated on the accelerator; 0 on CPU


class TargetShardWorker:
    """Joins the TP group, loads this rank's slices and serves verify calls."""

    def __init__(self, spec: ShardSpec, listen_socket: socket.socket | None = None) -> None:
        """``listen_socket``: rank 0's reserved rendezvous socket, if any."""
        self.spec = spec
        torch.set_num_threads(spec.num_threads)
        self.device = _resolve(torch.device(spec.device))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            # The model core allocates with factory defaults; in a shard's own
            # process the default device is this shard's GPU.
            torch.set_default_device(self.device)
        grid = spec.grid
        self._dist: TorchDistGroup | None = None
        group: TPGroup = SingleGroup()
        if spec.size > 1:
            self._dist = init_tp_group(
                spec.rank,
                spec.size,
                spec.master_addr,
                spec.master_port,
                spec.timeout_s,
                listen_socket,
                rendezvous_timeout=spec.rendezvous_timeout_s,
                device=self.device if self.device.type == "cuda" else None,
            )
            group = self._dist
        tp_group = _row_group(self._dist, grid)
        self._timed = TimedGroup(tp_group) if spec.time_collectives else None
        self._timed_experts = TimedGroup(group) if spec.time_collectives else None
        experts = ExpertShard.on_grid(grid, spec.rank, self._timed_experts or group)
        loads = spec.model
        model = load_model(
            Path(loads.model_dir), loads.dtype, self._timed or tp_group, experts, loads.weights
        )
        self.target = LocalTarget(model, loads.num_slots, loads.max_len, loads.prefix_tokens)
        # How a long call shows it is computing (the group's liveness probe).
        self.forwards = ForwardCount([model])
        self._verify_calls = 0
        self._verify_s = 0.0

    @property
    def rank(self) -> int:
        return self.spec.rank

    def verify(
        self, inputs: Sequence[VerifyInput], hidden_layers: tuple[int, ...] = ()
    ) -> list[VerifyOutput] | None:
        start = time.perf_counter()
        outputs = self.target.verify(inputs, hidden_layers)
        self._verify_s += time.perf_counter() - start
        self._verify_calls += 1
        if self.rank != 0:
            return None
        return [_ship(out, item.argmax_only) for item, out in zip(inputs, outputs, strict=True)]

    def release(self, request_id: str) -> None:
        self.target.release(request_id)

    def prefix_pins(self) -> int:
        return self.target.prefix_pins

    def ping(self) -> int:
        return self.rank

    def param_bytes(self) -> int:
        """Bytes of this rank's parameters (tied weights counted once)."""
        return sum(p.numel() * p.element_size() for p in self.target.model.parameters())

    def memory(self) -> ShardMemory:
        device_bytes = 0
        if self.device.type == "cuda":
            device_bytes = torch.cuda.memory_allocated(self.device)
        return ShardMemory(
            param_bytes=self.param_bytes(),
            rss_bytes=_rss_bytes(),
            peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            device_bytes=device_bytes,
        )

    def stats(self, reset: bool = False) -> ShardStats:
        collectives = experts = None
        if self._timed is not None and self._timed_experts is not None:
            collectives = self._timed.reset() if reset else self._timed.stats
            experts = self._timed_experts.reset() if reset else self._timed_experts.stats
        stats = ShardStats(self._verify_calls, self._verify_s, collectives, experts)
        if reset:
            self._verify_calls, self._verify_s = 0, 0.0
        return stats

    def probe_all_reduce(self, numel: int, iters: int) -> float:
        """Seconds per all-reduce of ``numel`` model-dtype values with no
        compute around it: the pure communication cost a step pays per call."""
        group = self._dist or SingleGroup()
        probe = torch.zeros(numel, dtype=self.target.model.dtype)
        group.all_reduce(probe)  # warm the connections
        start = time.perf_counter()
        for _ in range(iters):
            group.all_reduce(probe)
        if probe.is_cuda:
            torch.cuda.synchronize(probe.device)
        return (time.perf_counter() - start) / iters

    def close(self) -> None:
        if self._dist is not None:
            self._dist.close()
            self._dist = None


def _ship(out: VerifyOutput, argmax_only: bool) -> VerifyOutput:
    """One request's answer as it leaves rank 0: argmax ids when the caller
    reads no more, else the logits in their own storage (a view of the batch
    tensor would pickle every request's rows with each request's)."""
    hidden = ship_hidden(out.hidden_states)
    if argmax_only:
        return VerifyOutput(None, hidden, out.greedy_ids().cpu(), out.prefix_hit)
    return VerifyOutput(out.full_logits().to("cpu", copy=True), hidden, None, out.prefix_hit)


def ship_hidden(hidden: torch.Tensor | None) -> torch.Tensor | None:
    """Hidden states as they leave rank 0: bf16 (half of fp32, what the head
    reads anyway) and in their own storage per request. A view of the batch
    tensor pickles its whole storage, so every later message carrying one
    request's rows (the router's DraftUpdate) would carry every request's."""
    if hidden is None:
        return None
    return hidden.to("cpu", torch.bfloat16, copy=True)


def _row_group(world: TorchDistGroup | None, grid: ShardGrid) -> TPGroup:
    """This rank's tensor-parallel group: its row of the grid."""
    if world is None or grid.tp == 1:
        return SingleGroup()
    if grid.ep == 1:
        return world
    return world.subgroup([grid.row_ranks(row) for row in range(grid.ep)])


def _resolve(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * resource.getpagesize()
