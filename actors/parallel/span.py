"""A slice of a checkpoint tensor along one dimension: what a rank reads."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """The ``[start, end)`` slice along ``dim``; ``end`` None runs to the end."""

    dim: int
    start: int = 0
    end: int | None = None

    def stop(self, size: int) -> int:
        """``end`` in a dimension ``size`` long."""
        return size if self.end is None else self.end

    def index(self, ndim: int) -> tuple[slice, ...]:
        """The index that takes the span out of an ``ndim``-dimensional tensor."""
        index = [slice(None)] * ndim
        index[self.dim] = slice(self.start, self.end)
        return tuple(index)

    def blocks(self, block: int, size: int) -> tuple[int, int]:
        """The first and one past the last ``block``-long block that hold the
        span, in a dimension ``size`` long: block-scaled formats are read
        whole blocks at a time, then cut."""
        return self.start // block, -(-self.stop(size) // block)
