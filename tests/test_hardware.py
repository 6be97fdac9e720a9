"""The hardware probe: CPU flags, the format decision on given timings, and
that the timed probe runs."""

from __future__ import annotations

import time

from specray.actors.model.hardware import (
    CpuFeatures,
    parse_cpuinfo,
    probe,
    read_cpu_features,
    recommend,
    time_kernels,
)
from specray.actors.parallel.block_kernel import block_kernel_reason

CPUINFO = """processor\t: 0
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx avx2 fma f16c
processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx avx2 fma f16c
"""
AVX2 = parse_cpuinfo(CPUINFO)
SAPPHIRE = CpuFeatures("Xeon", frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}), 8)

# Shaped like measurements on an AVX2-only EPYC (ms for one 4864x896 matrix):
# bf16 has no native path, so its 9-row cost is 8x its 1-row cost.
AVX2_TIMINGS = {
    "fp32": {1: 0.96, 9: 3.0, 17: 4.4},
    "bf16": {1: 0.63, 9: 5.1, 17: 9.9},
    "int8": {1: 0.34, 9: 1.26, 17: 2.1},
    "int4": {1: 0.29, 9: 1.14, 17: 2.2},
}


def test_cpuinfo_flags_and_model() -> None:
    assert AVX2.model_name == "AMD EPYC 7B13"
    assert AVX2.flags == {"avx2"} and AVX2.logical_cpus == 2
    assert not AVX2.native_bf16 and SAPPHIRE.native_bf16
    assert "avx2" in AVX2.summary() and "avx512_bf16" not in AVX2.summary()
    here = read_cpu_features()
    assert here.logical_cpus >= 1 and here.flags <= {
        "avx2",
        "avx512f",
        "avx512_bf16",
        "amx_bf16",
        "amx_int8",
    }


def test_dense_only_decode_and_verify_pick_different_dtypes() -> None:
    dense = {name: AVX2_TIMINGS[name] for name in ("fp32", "bf16")}
    choice = recommend(dense, AVX2, gguf_int4_share=None)
    assert (choice.decode.format, choice.decode.dtype) == ("bf16", "bfloat16")
    assert (choice.verify.format, choice.verify.dtype) == ("fp32", "float32")
    assert "native bf16 matmul: no" in choice.reason
    assert "no GGUF file" in choice.reason
    assert "bf16: 1 row 0.63 ms, 9 rows 5.10 ms (8.1x)" in choice.reason


def test_gguf_cost_weighs_int4_and_int8_by_the_files_share() -> None:
    choice = recommend(AVX2_TIMINGS, AVX2, gguf_int4_share=0.25)
    assert choice.decode.weights == choice.verify.weights == "gguf"
    assert choice.decode.dtype == "bfloat16"
    assert abs(choice.costs_ms["gguf"][9] - (0.25 * 1.14 + 0.75 * 1.26)) < 1e-9


def test_gguf_cost_is_the_block_kernels_where_it_was_timed() -> None:
    timings = {**AVX2_TIMINGS, "blocks": {1: 0.2, 9: 0.9, 17: 1.5}}
    choice = recommend(timings, AVX2, gguf_int4_share=0.25)
    assert choice.costs_ms["gguf"] == {1: 0.2, 9: 0.9, 17: 1.5}


def test_slow_low_bit_kernels_are_not_picked() -> None:
    timings = {**AVX2_TIMINGS, "int8": {1: 2.0, 9: 9.0}, "int4": {1: 2.0, 9: 9.0}}
    choice = recommend(timings, AVX2, gguf_int4_share=1.0)
    assert (choice.decode.format, choice.verify.format) == ("bf16", "fp32")


def test_a_near_tie_goes_to_the_more_exact_format() -> None:
    timings = {"fp32": {1: 1.02, 9: 2.0}, "bf16": {1: 1.0, 9: 2.0}}
    choice = recommend(timings, SAPPHIRE, gguf_int4_share=None)
    assert choice.decode.format == choice.verify.format == "fp32"


def test_probe_times_every_format() -> None:
    timings = time_kernels(shape=(64, 128), rows=(1, 9), budget_s=0.2)
    blocks = {"blocks"} if block_kernel_reason() is None else set()
    assert set(timings) == {"fp32", "bf16", "int8", "int4"} | blocks
    assert all(ms > 0 for by_rows in timings.values() for ms in by_rows.values())
    assert all(set(by_rows) == {1, 9} for by_rows in timings.values())


def test_probe_recommends_within_its_budget() -> None:
    began = time.perf_counter()
    choice = probe(gguf_int4_share=0.5, budget_s=0.5)
    assert time.perf_counter() - began < 5  # a bound on the probe, not a benchmark
    assert choice.decode.format in {"fp32", "bf16", "gguf"}
    assert set(choice.costs_ms) == {"fp32", "bf16", "gguf"}
    assert "decode ->" in choice.reason
