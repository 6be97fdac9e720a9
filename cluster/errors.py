"""Errors the Ray side raises to its callers (the router, the CLI)."""

from __future__ import annotations


class TargetGroupError(RuntimeError):
    """A sharded target can no longer serve: a shard died, failed out of
    step with the others, or a call ran past its deadline.

    The group as a whole is unusable afterwards (its survivors may be stuck
    in a collective); recover by shutting it down and creating it afresh.
    """

    def __init__(self, message: str, reason: str, ranks: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.reason = reason  # "died" | "timeout" | "failed" | "unschedulable" | "closed"
        self.ranks = ranks  # the shards that caused it, where known

    def __reduce__(self) -> tuple[type, tuple[str, str, tuple[int, ...]]]:
        # Ray pickles errors to hand them to callers; the default reduce
        # would drop reason and ranks and fail to rebuild the error.
        return (type(self), (str(self), self.reason, self.ranks))
