"""What this machine's matmul kernels cost, and which weight format to serve.

The dtype that is fastest for one token is not always the fastest for a
k-token verify: without AVX512-BF16 or AMX, torch's bf16 GEMM has no native
path and a 9-row bf16 matmul can cost 8x one row, while float32's costs
about 3x. So the choice is measured, not assumed: :func:`probe` times one
model-shaped matrix at 1, 9 and 17 rows in each format (about a second),
and :func:`recommend` picks from those timings.

Formats:

- ``fp32`` / ``bf16``: dense weights in that dtype (``weights="dense"``);
- ``gguf``: the checkpoint's GGUF blocks on the low-bit kernels (4-bit
  blocks as int4, the rest as per-channel int8), bfloat16 activations. Its
  cost is the int4 and int8 timings weighted by the file's share of 4-bit
  parameters; int8 is timed on both of its kernels (weight-only and
  per-token, see :mod:`specray.actors.parallel.int8_kernels`), the faster
  counting, as a loaded model takes the faster.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from specray.actors.parallel.block_kernel import block_kernel_reason
from specray.actors.parallel.block_weights import BlockWeights
from specray.actors.parallel.cpuinfo import CPUINFO, flags_in, read_cpuinfo
from specray.actors.parallel.linear_weights import Int4Weights, Int8Weights
from specray.actors.parallel.packed_kernel import pack_dense, packed_linear
from specray.actors.parallel.quantized import (
    quantize_int4_grouped,
    quantize_int8_per_channel,
    quantize_symmetric_blocks,
)

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8")
PROBE_ROWS = (1, 9, 17)
# Qwen2.5-Coder-0.5B's MLP: [intermediate, hidden].
PROBE_SHAPE = (4864, 896)
# Within this fraction of the fastest, the more exact format wins
# (fp32 over bf16 over gguf): a tie is not worth rounding for.
TIE_MARGIN = 0.05
# Rounds of the probe at most (each times every format at every row count).
MAX_ROUNDS = 15
# Read before each timed call so that the weight comes from memory, as in a
# model: more than the last-level cache of the CPUs measured (32 MB).
EVICT_BYTES = 96 << 20
EXACTNESS_ORDER = ("fp32", "bf16", "gguf")
PACKED = "/packed"
PER_TOKEN = "/per_token"
# A timed kernel with one of these suffixes is another way to run the format
# before it; the format is charged the faster of the two.
ALTERNATIVES = (PACKED, PER_TOKEN)


@dataclass(frozen=True)
class CpuFeatures:
    """The matmul-relevant flags of ``/proc/cpuinfo``."""

    model_name: str
    flags: frozenset[str]
    logical_cpus: int

    @property
    def native_bf16(self) -> bool:
        """bf16 dot products in hardware (AVX512-BF16 or AMX)."""
        return bool(self.flags & {"avx512_bf16", "amx_bf16"})

    def summary(self) -> str:
        present = [flag for flag in CPU_FLAGS if flag in self.flags] or [
            "none of " + "/".join(CPU_FLAGS)
        ]
        return f"{self.model_name}, {self.logical_cpus} CPUs, {' '.join(present)}"


def parse_cpuinfo(text: str, logical_cpus: int | None = None) -> CpuFeatures:
    """Flags and model name from the text of ``/proc/cpuinfo``."""
    model = "unknown CPU"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
            break
    cpus = logical_cpus if logical_cpus is not None else text.count("processor\t:") or 1
    return CpuFeatures(model, flags_in(text) & set(CPU_FLAGS), cpus)


def read_cpu_features(path: Path = CPUINFO) -> CpuFeatures:
    return parse_cpuinfo(read_cpuinfo(path), len(os.sched_getaffinity(0)))


@dataclass(frozen=True)
class Choice:
    """A format to load: ``load_model(dir, dtype, weights=weights)``."""

    format: str  # fp32 | bf16 | gguf
    dtype: str  # float32 | bfloat16
    weights: str  # dense | gguf


CHOICES = {
    "fp32": Choice("fp32", "float32", "dense"),
    "bf16": Choice("bf16", "bfloat16", "dense"),
    "gguf": Choice("gguf", "bfloat16", "gguf"),
}


@dataclass(frozen=True)
class Recommendation:
    decode: Choice  # fastest for one row
    verify: Choice  # fastest for a verify of ``verify_rows`` rows
    verify_rows: int
    reason: str  # one paragraph for the server's log
    costs_ms: Mapping[str, Mapping[int, float]] = field(
        default_factory=dict
    )  # format -> rows -> ms


def recommend(
    timings_ms: Mapping[str, Mapping[int, float]],
    cpu: CpuFeatures,
    gguf_int4_share: float | None,
    verify_rows: int = 9,
    device: str = "cpu",
) -> Recommendation:
    """Pick formats from measured per-format, per-row-count matmul times.

    ``timings_ms`` holds ``fp32``, ``bf16``, ``int8`` and ``int4`` (any may be
    missing); ``gguf_int4_share`` is the fraction of the GGUF's matmul
    parameters in 4-bit blocks, or None when no GGUF file is available.
    """
    costs: dict[str, dict[int, float]] = {
        name: dict(timings_ms[name]) for name in ("fp32", "bf16") if name in timings_ms
    }
    if gguf_int4_share is not None and "blocks" in timings_ms:
        # Where the block kernel runs (it was timed), every block of the file
        # runs on it, 4-bit ones included.
        costs["gguf"] = dict(timings_ms["blocks"])
    elif gguf_int4_share is not None and "int8" in timings_ms and "int4" in timings_ms:
        share = gguf_int4_share
        costs["gguf"] = {
            rows: share * timings_ms["int4"][rows] + (1 - share) * timings_ms["int8"][rows]
            for rows in timings_ms["int8"]
            if rows in timings_ms["int4"]
        }
    if not costs:
        raise ValueError("no format was timed")
    decode = _fastest(costs, 1)
    verify = _fastest(costs, verify_rows)
    lines = [
        f"{device}: {cpu.summary()}; native bf16 matmul: {'yes' if cpu.native_bf16 else 'no'}."
    ]
    for name, by_rows in costs.items():
        if 1 in by_rows and verify_rows in by_rows:
            ratio = by_rows[verify_rows] / by_rows[1]
            lines.append(
                f"{name}: 1 row {by_rows[1]:.2f} ms, {verify_rows} rows "
                f"{by_rows[verify_rows]:.2f} ms ({ratio:.1f}x)."
            )
    lines.append(f"decode -> {decode}; verify of {verify_rows} rows -> {verify}.")
    if gguf_int4_share is None:
        lines.append("no GGUF file: low-bit formats not considered.")
    return Recommendation(CHOICES[decode], CHOICES[verify], verify_rows, " ".join(lines), costs)


def _fastest(costs: Mapping[str, Mapping[int, float]], rows: int) -> str:
    timed = {name: by_rows[rows] for name, by_rows in costs.items() if rows in by_rows}
    best = min(timed.values())
    for name in EXACTNESS_ORDER:
        if name in timed and timed[name] <= best * (1 + TIE_MARGIN):
            return name
    raise AssertionError("unreachable: the fastest format is in EXACTNESS_ORDER")


def time_kernels(
    shape: tuple[int, int] = PROBE_SHAPE,
    rows: Sequence[int] = PROBE_ROWS,
    budget_s: float = 1.5,
    device: torch.device | None = None,
) -> dict[str, dict[int, float]]:
    """Ms of ``x · Wᵀ`` per format and row count: the fastest of rounds
    that interleave every format and row count, within ``budget_s``."""
    device = device or torch.device("cpu")
    out_features, in_features = shape
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=gen) * 0.02
    kernels: dict[str, tuple[torch.dtype, Callable[[torch.Tensor], torch.Tensor]]] = {}
    fp32 = weight.to(device)
    bf16 = weight.to(device, torch.bfloat16)
    kernels["fp32"] = (torch.float32, lambda x: F.linear(x, fp32))
    kernels["bf16"] = (torch.bfloat16, lambda x: F.linear(x, bf16))
    # A loaded model runs a dense weight on oneDNN's packed copy where that
    # measures faster (row_kernels), so the dense formats get its time too.
    for name, dense in (("fp32", fp32), ("bf16", bf16)):
        packed = pack_dense(dense)
        if packed is not None:
            kernels[f"{name}{PACKED}"] = (dense.dtype, functools.partial(_packed, packed))
    int8 = quantize_int8_per_channel(weight)
    kernels["int8"] = (torch.bfloat16, Int8Weights(int8, torch.bfloat16, device))
    if device.type == "cpu":
        per_token = Int8Weights(int8, torch.bfloat16, device)
        per_token.use_kernel("per_token")
        kernels[f"int8{PER_TOKEN}"] = (torch.bfloat16, per_token)
    kernels["int4"] = (
        torch.bfloat16,
        Int4Weights(quantize_int4_grouped(weight, 32), torch.bfloat16, device),
    )
    if device.type == "cpu" and block_kernel_reason() is None:
        blocks = quantize_symmetric_blocks(weight, 5)  # Q5_0, the usual non-K block
        kernels["blocks"] = (torch.bfloat16, BlockWeights(blocks, torch.bfloat16))
    inputs = {
        (name, count): torch.randn(count, in_features, generator=gen).to(device, dtype)
        for name, (dtype, _) in kernels.items()
        for count in rows
    }
    samples: dict[tuple[str, int], list[float]] = {cell: [] for cell in inputs}
    for (name, _), x in inputs.items():
        kernels[name][1](x)  # warm-up: first-call allocation and packing
    # A model's weights stream from memory: one matrix alone stays in the
    # last-level cache between calls, where the dense formats look faster
    # against the low-bit ones than they run in a model. Reading a buffer
    # larger than that cache before each timed call evicts it.
    evict = torch.ones(EVICT_BYTES // 4) if device.type == "cpu" else None
    began = time.perf_counter()
    # Every cell once per round, so that a burst of other work on a shared
    # machine hits all formats alike; the fastest sample is the kernel's
    # cost, since other work only ever adds time.
    for _ in range(MAX_ROUNDS):
        for (name, count), x in inputs.items():
            if evict is not None:
                evict.sum()
            samples[name, count].append(_time_ms(kernels[name][1], x, device))
        if time.perf_counter() - began > budget_s:
            break
    timed = {name: {count: min(samples[name, count]) for count in rows} for name in kernels}
    for name in [name for name in timed if name.endswith(ALTERNATIVES)]:
        alternative_ms = timed.pop(name)
        plain = timed[name.rsplit("/", 1)[0]]
        for count in rows:
            plain[count] = min(plain[count], alternative_ms[count])
    return timed


def _packed(packed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return packed_linear(x, packed, None)


def _time_ms(
    kernel: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, device: torch.device
) -> float:
    start = time.perf_counter()
    kernel(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block on ``count`` torch threads, then restore the setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def probe(
    gguf_int4_share: float | None,
    shape: tuple[int, int] = PROBE_SHAPE,
    verify_rows: int = 9,
    budget_s: float = 1.5,
    threads: int | None = None,
) -> Recommendation:
    """Read the CPU flags, time the kernels here (on the GPU if there is
    one) on ``threads`` torch threads (default: the current setting), and
    recommend a format for decode and for verify."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    rows = sorted({1, verify_rows, *PROBE_ROWS})
    with torch_threads(threads or torch.get_num_threads()):
        timings = time_kernels(shape, rows, budget_s, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return recommend(timings, read_cpu_features(), gguf_int4_share, verify_rows, name)
