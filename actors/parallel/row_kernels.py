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


def _transposed(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.mm(weight, x.t()).t().contiguous()


def transposed_rows(
    weight: torch.Tensor,  # [out, in]
    row_counts: Sequence[int] = ROW_COUNTS,
    repeats: int = 2,
) -> int:
    """The largest of ``row_counts`` up to which ``W · xᵀ`` beat ``x · Wᵀ``
    at every count tried (0: it never did, or not at the first)."""
    chosen = 0
    for rows in row_counts:
        x = torch.randn(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
        linear = _best_seconds(functools.partial(torch.nn.functional.linear, x, weight), repeats)
        transposed = _best_seconds(functools.partial(_transposed, weight, x), repeats)
        if transposed > MARGIN * linear:
            break
        chosen = rows
    return chosen


def choose_row_kernels(
    model: nn.Module, min_elements: int = MIN_ELEMENTS
) -> dict[tuple[int, int, str], int]:
    """Time each distinct CPU weight shape of ``model`` once and set every
    :class:`DenseWeights` of that shape's ``transposed_rows``; the choices,
    by (out, in, dtype)."""
    by_shape: dict[tuple[int, int, str], list[DenseWeights]] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (
            isinstance(module, DenseWeights)
            and weight is not None
            and weight.device.type == "cpu"
            and weight.is_floating_point()
            and weight.numel() >= min_elements
        ):
            key = (module.out_features, module.in_features, module.format_name)
            by_shape.setdefault(key, []).append(module)
    choices = {}
    with torch.inference_mode():
        for key, modules in by_shape.items():
            choices[key] = transposed_rows(modules[0].weight)
            for module in modules:
                module.transposed_rows = choices[key]
    return choices
