"""Which kernel int8 weights run on a CPU, chosen by measuring.

torch's weight-only ``_weight_int8pack_mm`` keeps the activations in the
model dtype; measured on an AVX512-BF16 EPYC (2 threads, bfloat16) it reads
a DRAM-resident weight at about half the rate a plain sum does, and its cost
grows almost linearly past 4 rows (a 9-row verify ~4x one row), so a verify
pays nearly a decode per token. The per-token kernel
(:func:`~specray.actors.parallel.lowbit_kernels.int8_per_token_matmul`)
rounds each activation row to int8 and multiplies exactly in int32, as
llama.cpp's Q8_0 path does with blocks of 32. It changes the numbers (one
more rounding, of the activations), not the exactness of speculation: a row
depends on itself alone, so a verify equals the decodes it replaces bit for
bit. ``bench/kernel_bench.py`` reports both kernels and the greedy agreement
of the model that runs the chosen one.

Nothing is assumed about which is faster: :func:`choose_int8_kernels` times
both once per weight shape when a model loads and takes the per-token kernel
where it is never more than 10% slower and faster over all row counts, the
rule :mod:`specray.actors.parallel.row_kernels` applies to dense weights. One
kernel serves every row count of a weight, so a decode and a verify compute
each row the same way.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from specray.actors.parallel.linear_weights import Int8Weights
from specray.actors.parallel.row_kernels import ROW_COUNTS, best_seconds, displaces

# The per-token kernel rounds activations, so it changes results, not only
# the order of additions: weights under this size (tiny test models) keep
# the weight-only kernel whatever a timing says.
MIN_ELEMENTS = 1 << 19


@dataclass(frozen=True)
class Int8Kernel:
    """The kernel one int8 weight shape runs, and what was measured."""

    kernel: str  # weight_only | per_token
    ms: dict[str, dict[int, float]]  # kernel -> rows -> best time measured


def measure_int8(
    weights: Int8Weights, row_counts: Sequence[int] = ROW_COUNTS, repeats: int = 2
) -> Int8Kernel:
    """Time ``weights`` on both kernels at one row and at each of
    ``row_counts`` and pick; ``weights`` is left on the kernel it had."""
    before = weights.kernel
    ms: dict[str, dict[int, float]] = {"weight_only": {}, "per_token": {}}
    for rows in (1, *row_counts):
        x = torch.randn(rows, weights.in_features, dtype=weights.scales.dtype)
        for kernel in ms:
            weights.use_kernel(kernel)
            ms[kernel][rows] = 1e3 * best_seconds(functools.partial(weights, x), repeats)
    weights.use_kernel(before)
    per_token_wins = displaces(ms["per_token"], ms["weight_only"])
    return Int8Kernel("per_token" if per_token_wins else "weight_only", ms)


def use_int8_kernel(model: nn.Module, kernel: str) -> None:
    """Put every int8 weight of ``model`` on ``kernel``, whatever was measured."""
    for module in model.modules():
        if isinstance(module, Int8Weights):
            module.use_kernel(kernel)


def choose_int8_kernels(
    model: nn.Module, min_elements: int = MIN_ELEMENTS
) -> dict[tuple[int, int], Int8Kernel]:
    """Time each distinct CPU int8 weight shape of ``model`` once and set
    every :class:`Int8Weights` of that shape to its kernel; the choices, by
    (out, in)."""
    by_shape: dict[tuple[int, int], list[Int8Weights]] = {}
    for module in model.modules():
        if (
            isinstance(module, Int8Weights)
            and module.codes.device.type == "cpu"
            and module.codes.numel() >= min_elements
        ):
            by_shape.setdefault((module.out_features, module.in_features), []).append(module)
    choices = {}
    with torch.inference_mode():
        for key, same_shape in by_shape.items():
            choices[key] = choice = measure_int8(same_shape[0])
            for weights in same_shape:
                weights.use_kernel(choice.kernel)
    return choices
