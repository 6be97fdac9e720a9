"""A target replica sharded over tensor- and expert-parallel Ray actors.

:class:`ShardedTarget` implements the ``Target`` protocol like ``LocalTarget``
does, but its model lives in ``tp × ep`` ``TargetShard`` actors, one
placement-group bundle each, that form one torch.distributed group: ``ep`` rows
of ``tp`` ranks (:mod:`specray.actors.parallel.expert`). Like TGI's sharded
client, every call goes to every shard with the same arguments
(:meth:`ShardedTarget._fan_out`) and rank 0's answer is the answer
(:meth:`ShardedTarget._call`); nothing else talks to the shards.

Failure model: a shard that dies, fails out of step with the others, or
hangs (:mod:`specray.cluster.liveness`: no progress for ``timeout_s``, or no
answer to a probe) makes the call raise
:class:`~specray.cluster.errors.TargetGroupError` and marks the group broken
(its survivors may be stuck in a collective until their own timeout). Later
calls fail at once; recovery is :meth:`ShardedTarget.shutdown` and a new
group (gang restart). An error every shard raises alike (a bad request, a
full KV cache) is the caller's, is re-raised as itself, and leaves the group
usable.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import ActorDiedError, RayError, RayTaskError
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from specray.actors.engine.target import VerifyInput, VerifyOutput
from specray.actors.parallel.distributed import reserve_port
from specray.actors.workers.target_shard import (
    ShardMemory,
    ShardModel,
    ShardSpec,
    ShardStats,
    TargetShardWorker,
)
from specray.cluster.errors import TargetGroupError
from specray.cluster.liveness import ProgressWatch
from specray.cluster.target_group_config import ShardedTargetConfig


@dataclass(frozen=True)
class ShardPlacement:
    rank: int
    pid: int
    node_id: str
    node_ip: str
    verifies_trees: bool = True  # the model may verify token trees


class TargetShard:
    """Ray actor body: one :class:`TargetShardWorker`, started in two steps so
    rank 0 can reserve its rendezvous port on its own node first."""

    def __init__(self) -> None:
        self._worker: TargetShardWorker | None = None
        self._listen: socket.socket | None = None

    def reserve_rendezvous(self) -> tuple[str, int]:
        node_ip = ray.util.get_node_ip_address()
        self._listen = reserve_port(node_ip)
        return node_ip, int(self._listen.getsockname()[1])

    def start(self, spec: ShardSpec) -> ShardPlacement:
        self._worker = TargetShardWorker(spec, self._listen)
        self._listen = None
        return ShardPlacement(
            rank=spec.rank,
            pid=os.getpid(),
            node_id=ray.get_runtime_context().get_node_id(),
            node_ip=ray.util.get_node_ip_address(),
            verifies_trees=self._worker.target.verifies_trees,
        )

    def call(self, method: str, *args: Any) -> Any:
        if self._worker is None:
            raise RuntimeError("shard not started")
        return getattr(self._worker, method)(*args)

    def active_slots(self) -> int:
        """KV cache slots this shard holds for requests."""
        if self._worker is None:
            raise RuntimeError("shard not started")
        return self._worker.target.num_active

    @ray.method(concurrency_group="probe")
    def progress(self) -> int:
        """Model modules this shard has run: answered beside a running call
        (its own concurrency group), so a long call still shows it computes."""
        return self._worker.forwards.count if self._worker is not None else 0


class ShardedTarget:
    """The ``Target`` protocol over ``tp × ep`` shard actors."""

    def __init__(self, config: ShardedTargetConfig) -> None:
        self.config = config
        self._submit = threading.Lock()
        self._broken: TargetGroupError | None = None
        self._shards: list[Any] = []  # ray ActorHandles, rank order
        self.placements: list[ShardPlacement] = []
        self._pg: PlacementGroup | None = None
        try:
            self._start()
        except BaseException:
            self.shutdown()
            raise

    @classmethod
    def create(
        cls,
        model_dir: str | Path,
        tp: int = 1,
        **options: Any,
    ) -> ShardedTarget:
        """``options``: any field of :class:`ShardModel` (what each rank
        loads) or of :class:`ShardedTargetConfig`."""
        loads = {f.name for f in fields(ShardModel)}
        model = ShardModel(str(model_dir), **{k: v for k, v in options.items() if k in loads})
        group = {k: v for k, v in options.items() if k not in loads}
        return cls(ShardedTargetConfig(model, tp, **group))

    @property
    def max_len(self) -> int:
        return self.config.model.max_len

    @property
    def verifies_trees(self) -> bool:
        return all(p.verifies_trees for p in self.placements)

    # -- the Target protocol ------------------------------------------------

    def verify(
        self, inputs: Sequence[VerifyInput], hidden_layers: tuple[int, ...] = ()
    ) -> list[VerifyOutput]:
        outputs: list[VerifyOutput] = self._call("verify", list(inputs), tuple(hidden_layers))
        return outputs

    def release(self, request_id: str) -> None:
        self.submit_release(request_id)()

    def submit_release(self, request_id: str) -> Callable[[], None]:
        """Send the release to every shard now and return what waits for it.
        Every later call reaches each shard after it (one caller's tasks run
        in the order sent), so a request placed here next finds the
        released request's blocks in the prefix cache even while the wait
        is still pending."""
        wait = self._submitted("release", request_id)

        def done() -> None:
            wait()

        return done

    # -- diagnostics, one entry per shard -----------------------------------

    def ping(self) -> list[int]:
        return self._fan_out("ping")

    def param_bytes(self) -> list[int]:
        return self._fan_out("param_bytes")

    def memory(self) -> list[ShardMemory]:
        return self._fan_out("memory")

    def stats(self, reset: bool = False) -> list[ShardStats]:
        return self._fan_out("stats", reset)

    def probe_all_reduce(self, numel: int, iters: int = 50) -> list[float]:
        """Seconds per bare all-reduce of ``numel`` values, per shard."""
        return self._fan_out("probe_all_reduce", numel, iters)

    def active_slots(self) -> list[int]:
        """KV cache slots in use, per shard (leak checks)."""
        refs = [shard.active_slots.remote() for shard in self._shards]
        return self._gather(refs, self.config.timeout_s, "active_slots")

    def prefix_pins(self) -> list[int]:
        """Pins on prefix-cache blocks, per shard (leak checks)."""
        return self._fan_out("prefix_pins")

    def dead_ranks(self, timeout_s: float) -> tuple[int, ...]:
        """Shards whose process is gone (all of them once the group is broken).

        A liveness probe, not a call: the progress probe answers beside a
        running call, a shard that does not answer within ``timeout_s``
        counts as alive (calls watch their own progress), and nothing here
        marks the group broken. It bypasses the submit lock: a probe is no
        collective, so the shards need not see it in the same order.
        """
        if self._broken is not None:
            return self._broken.ranks or tuple(range(self.config.shards))
        refs = [shard.progress.remote() for shard in self._shards]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        dead = []
        for rank, ref in enumerate(refs):
            if ref in ready:
                try:
                    ray.get(ref)
                except ActorDiedError:  # not merely unreachable
                    dead.append(rank)
        return tuple(dead)

    # -- lifecycle ------------------------------------------------------------

    def shutdown(self) -> None:
        """Kill every shard and free the placement group. Idempotent."""
        for shard in self._shards:
            with contextlib.suppress(RayError):  # already gone
                ray.kill(shard, no_restart=True)
        self._shards = []
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None
        self._broken = self._broken or TargetGroupError("target group is shut down", "closed")

    def __enter__(self) -> ShardedTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- fan-out and merge: the only code that talks to shards ---------------

    def _call(self, method: str, *args: Any) -> Any:
        """Fan out; the merge rule is: rank 0's answer is the answer."""
        return self._fan_out(method, *args)[0]

    def _fan_out(self, method: str, *args: Any) -> list[Any]:
        """Run ``method(*args)`` on every shard; their results in rank order."""
        return self._submitted(method, *args)()

    def _submitted(self, method: str, *args: Any) -> Callable[[], list[Any]]:
        """Send ``method(*args)`` to every shard; what waits for their
        results in rank order."""
        with self._submit:
            if self._broken is not None:
                raise TargetGroupError(
                    f"target group is unusable ({self._broken})",
                    self._broken.reason,
                    self._broken.ranks,
                )
            # Submitting under the lock gives every shard the same call order,
            # which their collectives need.
            refs = [shard.call.remote(method, *args) for shard in self._shards]

        def wait() -> list[Any]:
            try:
                watch = ProgressWatch.for_deadline(self._probe, self.config.timeout_s)
                return self._gather(refs, self.config.timeout_s, method, watch)
            except TargetGroupError as err:
                self._broken = err
                raise

        return wait

    def _probe(self, rank: int) -> Any:
        return self._shards[rank].progress.remote()

    def _gather(
        self,
        refs: Sequence[Any],
        timeout_s: float,
        what: str,
        watch: ProgressWatch | None = None,
    ) -> list[Any]:
        """Wait for one result per rank: at most ``timeout_s``, or with a
        ``watch`` as long as every pending shard makes progress.

        Raises TargetGroupError on a dead shard at once, on a deadline or a
        hang, or on shards failing differently; re-raises an error all
        shards share.
        """
        began = time.monotonic()
        deadline = began + timeout_s
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        pending = list(refs)
        failed: dict[int, RayTaskError] = {}
        while pending:
            left = max(0.0, deadline - time.monotonic())
            wait_s = left if watch is None else watch.probe_interval_s
            ready, pending = ray.wait(pending, num_returns=1, timeout=wait_s)
            if not ready:
                ranks = tuple(sorted(rank_of[ref] for ref in pending))
                if watch is not None:
                    hang = watch.check(ranks, began)
                    if hang is None:
                        continue  # computing: the call may take as long as it needs
                    ranks, detail = hang.ranks, hang.detail
                else:
                    detail = f"gave no answer within {timeout_s:g} s"
                reason = "failed" if failed else "timeout"
                raise TargetGroupError(
                    f"{what}: shards {ranks} {detail}"
                    + (f" after shards {sorted(failed)} failed" if failed else ""),
                    reason,
                    ranks,
                )
            for ref in ready:
                rank = rank_of[ref]
                try:
                    ray.get(ref)
                except RayTaskError as err:
                    failed[rank] = err
                except RayError as err:
                    raise TargetGroupError(
                        f"{what}: shard {rank} died: {err}", "died", (rank,)
                    ) from err
        if failed:
            ranks = tuple(sorted(failed))
            first = failed[ranks[0]]
            if len(ranks) == len(refs) and len({type(failed[r].cause) for r in ranks}) == 1:
                raise first.cause from first
            raise TargetGroupError(
                f"{what}: shards {ranks} failed: {first.cause!r}", "failed", ranks
            ) from first
        return list(ray.get(list(refs)))

    def _start(self) -> None:
        config = self.config
        if not ray.is_initialized():
            # Ray's own auto-init would bind the machine's outward address.
            raise RuntimeError(
                "Ray is not running: start it first (specray.cluster.local_ray.start_ray "
                "binds a local one to 127.0.0.1)"
            )
        cpus = config.cpus_per_shard if config.cpus_per_shard is not None else config.threads
        extra = list(config.bundle_resources) or [{} for _ in range(config.shards)]
        gpu = {"GPU": config.gpus_per_shard} if config.gpus_per_shard > 0 else {}
        bundles = [{"CPU": cpus, **gpu, **dict(res)} for res in extra]
        self._pg = placement_group(bundles, strategy=config.strategy)
        ready, _ = ray.wait([self._pg.ready()], timeout=config.start_timeout_s)
        if not ready:
            raise TargetGroupError(
                f"no room for {config.shards} shards as {config.strategy} bundles {bundles}",
                "unschedulable",
            )
        # Calls run one at a time in the default group (their collectives
        # need the same order on every shard); progress probes answer beside.
        actor: Any = ray.remote(concurrency_groups={"probe": 1})(TargetShard)  # type: ignore[call-overload]
        for rank in range(config.shards):
            strategy = PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=rank)
            self._shards.append(
                actor.options(
                    num_cpus=cpus,
                    num_gpus=config.gpus_per_shard,
                    resources=dict(extra[rank]),
                    scheduling_strategy=strategy,
                    max_restarts=0,
                ).remote()
            )
        master_addr, master_port = self._gather(
            [self._shards[0].reserve_rendezvous.remote()], config.start_timeout_s, "rendezvous"
        )[0]
        specs = [
            ShardSpec(
                model=config.model,
                rank=rank,
                size=config.shards,
                ep=config.ep,
                master_addr=master_addr,
                master_port=master_port,
                num_threads=config.threads,
                timeout_s=config.timeout_s,
                rendezvous_timeout_s=config.start_timeout_s,
                device="cuda" if config.gpus_per_shard > 0 else "cpu",
                time_collectives=config.time_collectives,
            )
            for rank in range(config.shards)
        ]
        refs = [shard.start.remote(spec) for shard, spec in zip(self._shards, specs, strict=True)]
        self.placements = self._gather(refs, config.start_timeout_s, "start")
