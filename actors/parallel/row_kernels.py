"""Which matmul a dense weight runs for a few rows, chosen by measuring.

A verify multiplies every weight by ``k + 1`` rows. On some CPUs torch's
``F.linear`` (``x · Wᵀ``) is fast for one row and several times slower for
two to a dozen, while the same product computed as ``W · xᵀ`` is not (an
AVX2-only EPYC in fp32: the LM head and the MLP's up projections for 2-9
rows). Other CPUs and dtypes differ, so nothing is assumed:
:func:`choose_row_kernels` times both forms once per weight shape when a
model loads, and each :class:`DenseWeights` then uses ``W · xᵀ`` up to the
largest row count where it won. Both are the same product; only the order
of the float additions differs.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from specray.actors.parallel.linear_weights import DenseWeights

ROW_COUNTS = (2, 4, 8, 16, 32)
# Smaller weights are left alone: their matmuls take microseconds either way
# (and tests on tiny models keep one kernel).
MIN_ELEMENTS = 1 << 20
MARGIN = 0.9  # the transposed form must be 10% faster to be chosen


def _best_seconds(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - began)
    return best


def transposed_rows(
    dense: DenseWeights,
    row_counts: Sequence[int] = ROW_COUNTS,
    repeats: int = 2,
) -> int:
    """The largest of ``row_counts`` up to which ``dense`` ran faster as
    ``W · xᵀ`` than as ``x · Wᵀ`` at every count tried (0: it never did, or
    not at the first). Each form is timed as the layer runs it."""
    weight = dense.weight
    chosen = 0
    for rows in row_counts:
        x = torch.randn(rows, dense.in_features, dtype=weight.dtype, device=weight.device)
        dense.transposed_rows = 0
        linear = _best_seconds(functools.partial(dense, x), repeats)
        dense.transposed_rows = rows
        transposed = _best_seconds(functools.partial(dense, x), repeats)
        if transposed > MARGIN * linear:
            break
        chosen = rows
    dense.transposed_rows = chosen
    return chosen


def choose_row_kernels(
    model: nn.Module, min_elements: int = MIN_ELEMENTS
) -> dict[tuple[int, int, str], int]:
    """Time each distinct CPU weight shape of ``model`` once and set every
    :class:`DenseWeights` of that shape's ``transposed_rows``; the choices,
    by (out, in, dtype)."""
    by_shape: dict[tuple[int, int, str], list[DenseWeights]] = {}
    for module in model.modules():
        if (
            isinstance(module, DenseWeights)
            and module.weight.device.type == "cpu"
            and module.weight.is_floating_point()
            and module.weight.numel() >= min_elements
        ):
            key = (module.out_features, module.in_features, module.format_name)
            by_shape.setdefault(key, []).append(module)
    choices = {}
    with torch.inference_mode():
        for key, modules in by_shape.items():
            choices[key] = transposed_rows(modules[0])
            for module in modules:
                module.transposed_rows = choices[key]
    return choices
