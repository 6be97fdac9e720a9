"""Sinkhorn-Knopp iterations that make the hyper-connections' ``comb``
matrices doubly stochastic.

Each matrix is ``n x n`` (``n`` = 4 in V4) and the iterations are
sequential, so a decode step is ~120 calls on a few dozen floats: per-call
overhead, not arithmetic. On CPU, for a few tokens, numpy's per-call
overhead is about half of torch's, and its float32 additions and divisions
are the same IEEE operations in the same order, so both executors give
bit-identical matrices (``tests/test_v4_sinkhorn.py``) and a verify of ``k``
tokens still equals ``k`` decode steps. Larger batches (prefill) stay in
torch, whose vectorised kernels win there.
"""

from __future__ import annotations

import numpy as np
import torch

# Above this many matrices torch's kernels outrun numpy's lower call overhead.
NUMPY_MAX_MATRICES = 32


def sinkhorn_(
    comb: torch.Tensor,  # [tokens, n, n] float32, positive; normalised in place
    iters: int,
    eps: float,
) -> torch.Tensor:
    """Divide by column sums, then ``iters - 1`` times by row and column
    sums, each sum plus ``eps`` (the reference's order). Returns ``comb``."""
    if comb.device.type == "cpu" and comb.is_contiguous() and comb.shape[0] <= NUMPY_MAX_MATRICES:
        _numpy_sinkhorn(comb.numpy(), iters, np.float32(eps))
    else:
        _torch_sinkhorn(comb, iters, eps)
    return comb


def _torch_sinkhorn(comb: torch.Tensor, iters: int, eps: float) -> None:
    comb.div_(comb.sum(dim=-2, keepdim=True).add_(eps))
    for _ in range(iters - 1):
        comb.div_(comb.sum(dim=-1, keepdim=True).add_(eps))
        comb.div_(comb.sum(dim=-2, keepdim=True).add_(eps))


def _numpy_sinkhorn(comb: np.ndarray, iters: int, eps: np.float32) -> None:
    rows = np.empty((*comb.shape[:-1], 1), dtype=np.float32)
    cols = np.empty((*comb.shape[:-2], 1, comb.shape[-1]), dtype=np.float32)
    add, divide = np.add, np.divide
    add.reduce(comb, axis=-2, keepdims=True, out=cols)
    divide(comb, add(cols, eps, out=cols), out=comb)
    for _ in range(iters - 1):
        add.reduce(comb, axis=-1, keepdims=True, out=rows)
        divide(comb, add(rows, eps, out=rows), out=comb)
        add.reduce(comb, axis=-2, keepdims=True, out=cols)
        divide(comb, add(cols, eps, out=cols), out=comb)
