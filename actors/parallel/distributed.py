"""The TP group over torch.distributed: backend choice and rendezvous.

This is the one place that picks the backend (NCCL when CUDA devices are
present, gloo on CPU) and runs the rendezvous. Each shard is its own process,
so the one default process group torch.distributed keeps per process is the
whole TP group.

The rendezvous store listens only on ``master_addr`` (never on the wildcard
address torch would bind by default), and on a loopback address gloo and NCCL
are told to use the ``lo`` interface, so a local group sends nothing to any
other interface.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from collections.abc import Sequence

import torch
import torch.distributed as dist

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    host = host.strip("[]")  # IPv6 literal as written in host:port
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def pick_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def reserve_port(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening socket on ``host`` (a free port when ``port`` is 0).

    Rank 0 hands it to the rendezvous store, so the port is never released
    between being chosen and being used, and the store listens on ``host``
    only.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def find_free_port(host: str = "127.0.0.1") -> int:
    """A port that was free on ``host`` a moment ago (racy; prefer :func:`reserve_port`)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class TorchDistGroup:
    """:class:`~specray.actors.parallel.group.TPGroup` over the default process
    group, or over ``process_group``, a subgroup of it (see :meth:`subgroup`)."""

    def __init__(
        self,
        rank: int,
        size: int,
        backend: str,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        self._rank = rank
        self._size = size
        self.backend = backend
        self._group = process_group
        self._upcast = backend == "gloo" and size > 2

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._size

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum in place (callers pass fresh partial results) and return it.

        gloo sums half-precision natively, and for two ranks the result is
        the correctly rounded sum (measured). For more ranks it rounds after
        every addition of its ring (27% of bf16 sums off by an ulp at four
        ranks), so on gloo those are summed in float32: one rounding, as with
        two ranks. NCCL keeps the native dtype, where bandwidth matters more.
        """
        if self._upcast and tensor.dtype in (torch.bfloat16, torch.float16):
            wide = tensor.float()
            dist.all_reduce(wide, op=dist.ReduceOp.SUM, group=self._group)
            return tensor.copy_(wide)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self._group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self._size)]
        dist.all_gather(parts, tensor, group=self._group)
        return torch.cat(parts, dim=dim)

    def subgroup(self, partition: Sequence[Sequence[int]]) -> TorchDistGroup:
        """This rank's part of ``partition`` (disjoint lists of ranks of this
        group that cover it) as a group of its own. Creating groups is
        collective: every rank calls this with the same partition."""
        if self._group is not None:
            raise ValueError("subgroups are made from the whole group")
        mine: TorchDistGroup | None = None
        for ranks in partition:
            handle = dist.new_group(list(ranks))
            if self._rank in ranks:
                mine = TorchDistGroup(
                    list(ranks).index(self._rank), len(ranks), self.backend, handle
                )
        if mine is None:
            raise ValueError(f"rank {self._rank} is in no part of {partition}")
        return mine

    def close(self) -> None:
        """Leave torch.distributed (the whole group's handle only)."""
        if self._group is None and dist.is_initialized():
            dist.destroy_process_group()


def init_tp_group(
    rank: int,
    size: int,
    master_addr: str = "127.0.0.1",
    master_port: int = 0,
    timeout: float = 60.0,
    listen_socket: socket.socket | None = None,
    backend: str | None = None,
    device: torch.device | None = None,
    rendezvous_timeout: float | None = None,
) -> TorchDistGroup:
    """Join the TP group of ``size`` processes as ``rank``.

    Rank 0 hosts the rendezvous store on ``master_addr:master_port``, on
    ``listen_socket`` if it already holds one (see :func:`reserve_port`).
    ``timeout`` (seconds) bounds every collective, so a rank whose peer died
    raises instead of blocking forever; ``rendezvous_timeout`` (default:
    ``timeout``) bounds waiting for the other ranks to join. With NCCL,
    ``device`` is this rank's GPU (default: the current CUDA device).
    """
    if dist.is_initialized():
        raise RuntimeError("this process already belongs to a torch.distributed group")
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} is outside a group of {size}")
    backend = backend or pick_backend()
    if is_loopback(master_addr):
        # Otherwise gloo / NCCL pick the interface the hostname resolves to.
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        os.environ["NCCL_SOCKET_IFNAME"] = "lo"
    device_id = None
    if backend == "nccl":
        device_id = device or torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device_id)
    wait = datetime.timedelta(seconds=timeout)
    join = datetime.timedelta(seconds=rendezvous_timeout or timeout)
    if rank == 0:
        sock = listen_socket or reserve_port(master_addr, master_port)
        port = int(sock.getsockname()[1])
        # Passing our own socket keeps the store off the wildcard address;
        # the store owns the descriptor from here on.
        fd = sock.detach()
        store = dist.TCPStore(master_addr, port, size, True, join, master_listen_fd=fd)
    else:
        store = dist.TCPStore(master_addr, master_port, size, False, join)
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=size, timeout=wait, device_id=device_id
    )
    return TorchDistGroup(rank, size, backend)
