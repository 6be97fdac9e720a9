"""Which matmul a dense weight runs for a few rows, chosen by measuring.

A verify multiplies every weight by ``k + 1`` rows. On some CPUs torch's
``F.linear`` (``x · Wᵀ``) is fast for one row and several times slower for
two to a dozen, while the same product computed as ``W · xᵀ`` is not (an
AVX2-only EPYC in fp32: the LM head and the MLP's up projections for 2-9
rows), and oneDNN's matmul on a blocked copy of the weight
(:mod:`specray.actors.parallel.packed_kernel`) beats both at every row count
there. Other CPUs and dtypes differ, so nothing is assumed:
:func:`choose_row_kernels` times the forms once per weight shape when a
model loads. The packed form is taken when it is never more than 10% slower
than the better plain form and faster over all row counts; it then serves
every row count (it kept up with ``F.linear`` up to 512 rows), so the plain
copy is freed. Otherwise each :class:`DenseWeights` uses ``W · xᵀ`` up to
the largest row count where it won. All are the same product; only the order
of the float additions differs.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from specray.actors.parallel.embedding import ParallelLMHead, VocabParallelEmbedding
from specray.actors.parallel.linear_weights import DenseWeights
from specray.actors.parallel.packed_kernel import pack_dense, packed_linear

ROW_COUNTS = (2, 4, 8, 16, 32)
# Smaller weights (routers, per-head gates) are left on F.linear: measuring
# them costs more than it could save, and tests on tiny models keep one kernel.
# Larger ones are measured even when small: a bf16 GEMM's fixed per-call cost
# can exceed reading a few hundred KB of weight.
MIN_ELEMENTS = 1 << 17
MARGIN = 0.9  # a form must be 10% faster to displace F.linear


@dataclass(frozen=True)
class RowKernels:
    """What one weight shape runs: oneDNN's packed copy for every row count,
    or ``W · xᵀ`` for 2 to ``transposed_rows`` rows and ``F.linear`` else."""

    packed: bool
    transposed_rows: int
    ms: dict[str, dict[int, float]]  # form -> rows -> best time measured


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - began)
    return best


def measure(
    dense: DenseWeights,
    row_counts: Sequence[int] = ROW_COUNTS,
    repeats: int = 2,
    try_packed: bool = True,
) -> RowKernels:
    """Time ``dense`` as each form runs it, at one row and at each of
    ``row_counts``, and pick: ``W · xᵀ`` up to the largest count where it beat
    ``F.linear`` at every count tried; the packed copy where it is never more
    than 10% slower than that and faster in sum. ``dense`` is left plain."""
    weight = dense.weight
    packed = pack_dense(weight) if try_packed else None
    trial = DenseWeights(weight)
    ms: dict[str, dict[int, float]] = {"linear": {}, "transposed": {}, "packed": {}}
    for rows in (1, *row_counts):
        x = torch.randn(rows, dense.in_features, dtype=weight.dtype, device=weight.device)
        forms = {"linear": 0} if rows == 1 else {"linear": 0, "transposed": rows}
        for form, transposed_rows in forms.items():
            trial.transposed_rows = transposed_rows
            ms[form][rows] = 1e3 * best_seconds(functools.partial(trial, x), repeats)
        if packed is not None:
            run = functools.partial(packed_linear, x, packed, None)
            ms["packed"][rows] = 1e3 * best_seconds(run, repeats)
    transposed_rows = 0
    for rows in row_counts:
        if ms["transposed"][rows] > MARGIN * ms["linear"][rows]:
            break
        transposed_rows = rows
    plain = {
        rows: ms["transposed" if 1 < rows <= transposed_rows else "linear"][rows]
        for rows in ms["linear"]
    }
    use_packed = bool(ms["packed"]) and displaces(ms["packed"], plain)
    return RowKernels(use_packed, transposed_rows, ms)


def displaces(candidate_ms: dict[int, float], incumbent_ms: dict[int, float]) -> bool:
    """Whether a kernel timed at the incumbent's row counts should replace it
    for all of them: never more than 10% slower, and faster in sum."""
    return all(candidate_ms[rows] * MARGIN <= incumbent_ms[rows] for rows in incumbent_ms) and sum(
        candidate_ms.values()
    ) < sum(incumbent_ms.values())


def choose_row_kernels(
    model: nn.Module, min_elements: int = MIN_ELEMENTS, try_packed: bool = True
) -> dict[tuple[int, int, str], RowKernels]:
    """Time each distinct CPU weight shape of ``model`` once and set every
    :class:`DenseWeights` of that shape to its chosen form; the choices, by
    (out, in, dtype). An embedding's table is left plain unless it is also
    the LM head (tied); then it keeps its plain copy beside the packed one,
    for the row lookups of every step."""
    modules = list(model.modules())
    tables = {id(m.weights) for m in modules if isinstance(m, VocabParallelEmbedding)}
    heads = {id(m.weights) for m in modules if isinstance(m, ParallelLMHead)}
    by_shape: dict[tuple[int, int, str], list[DenseWeights]] = {}
    for module in modules:
        if (
            isinstance(module, DenseWeights)
            and (id(module) not in tables or id(module) in heads)
            and module.packed is None
            and module.weight.device.type == "cpu"
            and module.weight.is_floating_point()
            and module.weight.numel() >= min_elements
        ):
            key = (module.out_features, module.in_features, module.format_name)
            by_shape.setdefault(key, []).append(module)
    choices = {}
    with torch.inference_mode():
        for key, same_shape in by_shape.items():
            choices[key] = choice = measure(same_shape[0], try_packed=try_packed)
            for dense in same_shape:
                dense.transposed_rows = choice.transposed_rows
                packed = pack_dense(dense.weight) if choice.packed else None
                if packed is not None:
                    dense.use_packed(packed, keep_plain=id(dense) in tables)
    return choices
