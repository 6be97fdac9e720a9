"""Per-layer matmul timings of :mod:`specray.bench.kernel_bench`: each
format's kernel on the model's layer shapes, weights from DRAM, and what
the start-up probe would choose from them."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from specray.actors.model.config import ModelConfig
from specray.actors.model.hardware import CpuFeatures, recommend
from specray.actors.parallel.block_kernel import block_kernel_reason
from specray.actors.parallel.block_weights import BlockWeights
from specray.actors.parallel.linear_weights import Int4Weights, Int8Weights
from specray.actors.parallel.packed_kernel import pack_dense, packed_linear
from specray.actors.parallel.quantized import (
    quantize_int4_grouped,
    quantize_int8_per_channel,
    quantize_symmetric_blocks,
)
from specray.bench.common import timed_ms

LAYER_ROWS = (1, 2, 4, 9, 17)
L3_BYTES = 64 << 20  # weights cycled per layer measurement, so they come from DRAM


def layer_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """[out, in] of every matmul of one decoder layer, and the LM head."""
    hidden, inter = config.hidden_size, config.intermediate_size
    return {
        "qkv": (config.q_size + 2 * config.kv_size, hidden),
        "o": (hidden, config.q_size),
        "gate_up": (2 * inter, hidden),
        "down": (hidden, inter),
        "lm_head": (config.vocab_size, hidden),
    }


def _kernel(fmt: str, weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    cpu = torch.device("cpu")
    if fmt == "fp32":
        return lambda x: F.linear(x, weight)
    if fmt == PACKED_FP32:
        packed = pack_dense(weight)
        if packed is None:
            raise RuntimeError("oneDNN's packed matmul is not available here")
        return functools.partial(packed_linear, packed=packed, bias=None)
    if fmt == "bf16":
        half = weight.bfloat16()
        return lambda x: F.linear(x, half)
    if fmt == BLOCKS:
        return BlockWeights(quantize_symmetric_blocks(weight, 5), torch.bfloat16)
    if fmt in ("int8", PER_TOKEN_INT8):
        int8 = Int8Weights(quantize_int8_per_channel(weight), torch.bfloat16, cpu)
        if fmt == PER_TOKEN_INT8:
            int8.use_kernel("per_token")
        return int8
    return Int4Weights(quantize_int4_grouped(weight, 32), torch.bfloat16, cpu)


PACKED_FP32 = "fp32 packed"  # oneDNN's blocked copy, what a loaded fp32 model runs
PER_TOKEN_INT8 = "int8 per-token"  # activations rounded to int8 too (int8_kernels)
# A loaded model runs each of these where it measures faster than the format named.
ALTERNATIVE_OF = {PACKED_FP32: "fp32", PER_TOKEN_INT8: "int8"}
LAYER_FORMATS = {"fp32": torch.float32, PACKED_FP32: torch.float32, "bf16": torch.bfloat16}
LAYER_FORMATS.update({"int8": torch.bfloat16, PER_TOKEN_INT8: torch.bfloat16})
LAYER_FORMATS["int4"] = torch.bfloat16
BLOCKS = "blocks"  # Q5_0-like blocks on the block kernel, where it runs here
if block_kernel_reason() is None:
    LAYER_FORMATS[BLOCKS] = torch.bfloat16


def time_layers(config: ModelConfig, repeats: int) -> dict[str, dict[str, dict[int, float]]]:
    """shape -> format -> rows -> ms, cycling copies of each weight past the L3."""
    results: dict[str, dict[str, dict[int, float]]] = {}
    for name, (out_features, in_features) in layer_shapes(config).items():
        copies = max(1, min(8, L3_BYTES // (out_features * in_features)))
        weights = [torch.randn(out_features, in_features) * 0.02 for _ in range(copies)]
        results[name] = {}
        for fmt, dtype in LAYER_FORMATS.items():
            kernels = [_kernel(fmt, weight) for weight in weights]
            results[name][fmt] = {}
            for rows in LAYER_ROWS:
                x = torch.randn(rows, in_features).to(dtype)

                def cycle(
                    x: torch.Tensor = x,
                    kernels: Sequence[Callable[[torch.Tensor], torch.Tensor]] = kernels,
                ) -> None:
                    for kernel in kernels:
                        kernel(x)

                results[name][fmt][rows] = timed_ms(cycle, repeats) / len(kernels)
    return results


def probe_line(
    layers_ms: dict[str, dict[str, dict[int, float]]], cpu: CpuFeatures, result: dict[str, Any]
) -> str:
    """What the start-up probe would pick from these layer timings (a decoder
    layer's four matmuls); fp32 and int8 as a loaded model runs them, each
    on the faster of its two kernels."""

    def layer_sum(fmt: str, rows: int) -> float:
        return sum(float(layers_ms[s][fmt][rows]) for s in ("qkv", "o", "gate_up", "down"))

    per_format = {
        fmt: {rows: layer_sum(fmt, rows) for rows in LAYER_ROWS}
        for fmt in ("fp32", "bf16", "int8", "int4", BLOCKS)
        if all(fmt in layers_ms[s] for s in ("qkv", "o", "gate_up", "down"))
    }
    for alternative, fmt in ALTERNATIVE_OF.items():
        if all(alternative in layers_ms[s] for s in ("qkv", "o", "gate_up", "down")):
            for rows in LAYER_ROWS:
                per_format[fmt][rows] = min(per_format[fmt][rows], layer_sum(alternative, rows))
    return recommend(per_format, cpu, result["gguf_int4_share"]).reason
