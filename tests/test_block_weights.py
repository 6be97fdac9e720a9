"""The block kernel: GGUF's symmetric blocks (Q4_0, Q5_0, Q8_0, Q6_K)
multiplied as stored. Its weights are the file's values exactly; what rounds
is each 32-value block of an activation row, to int8 on its own scale, so
the reference here rounds the activations the same way and sums the exact
products in float64."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from tiny_gguf import random_blocks

from specray.actors.parallel.block_kernel import (
    SWITCH,
    BlockKernel,
    block_kernel_reason,
    build_block_kernel,
    load_block_kernel,
)
from specray.actors.parallel.block_weights import PROFILER_NAME, BlockWeights, fits_blocks
from specray.actors.parallel.gguf_blocks import decode_blocks
from specray.actors.parallel.kernel_build import VNNI_CPU_FLAGS, BlockKernelUnavailable, cpu_flags
from specray.actors.parallel.linear_weights import Int4Weights, Int8Weights, linear_weights_from
from specray.actors.parallel.quantized import GroupAffine
from specray.bench.decode_profile import kind_of

pytestmark = pytest.mark.skipif(
    block_kernel_reason() is not None, reason=f"block kernel: {block_kernel_reason()}"
)

SYMMETRIC = (Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.Q6_K)
AFFINE = (Q.Q4_K, Q.Q5_K, Q.Q4_1, Q.Q5_1)  # value = scale * code + offset
ALL_TYPES = (*SYMMETRIC, *AFFINE)
CPU = torch.device("cpu")


def _file_blocks(qtype: Q, rows: int = 40, cols: int = 512, seed: int = 0) -> np.ndarray:
    return random_blocks(qtype, rows, cols, np.random.default_rng(seed + int(qtype)), 0.05)


def _matrix(qtype: Q, rows: int = 40, cols: int = 512, seed: int = 0) -> GroupAffine:
    return decode_blocks(torch.from_numpy(_file_blocks(qtype, rows, cols, seed)), qtype)


def _activations(rows: int, cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows))
    x[0, :32] = 0  # an all-zero block keeps scale 0
    return x.to(dtype)


def _reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x rounded to int8 per block of 32 (max |x| -> 127, half to even), times
    ``weight``, in float64."""
    blocks = x.float().reshape(x.shape[0], -1, 32)
    scales = blocks.abs().amax(dim=-1, keepdim=True) / 127
    codes = torch.round(blocks / torch.where(scales > 0, scales, torch.ones_like(scales)))
    rounded = (codes.double() * scales.double()).reshape(x.shape)
    return rounded @ weight.double().t()


def _variants() -> list[BlockKernel]:
    """The AVX2 kernel, and the AVX512-VNNI one where this CPU has it."""
    kernels = [build_block_kernel(vnni=False)]
    if cpu_flags() >= VNNI_CPU_FLAGS:
        kernels.append(build_block_kernel(vnni=True))
    return kernels


K_QUANTS = (Q.Q4_K, Q.Q5_K, Q.Q6_K)  # scale d * sc, offset dmin * m: products


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_weights_are_the_files_codes_with_fp16_scales(qtype: Q) -> None:
    """Exactly the file's values where it stores an fp16 scale (and offset);
    the K-quants' scale products rounded to nearest fp16, nothing else."""
    raw = _file_blocks(qtype)
    matrix = decode_blocks(torch.from_numpy(raw), qtype)
    weights = BlockWeights(matrix, torch.float32)
    want = torch.from_numpy(gguf.quants.dequantize(raw, qtype))
    if qtype not in K_QUANTS:
        assert torch.equal(weights.dequantize(), want)
    rounded = GroupAffine(
        matrix.codes,
        matrix.scales.half().float(),
        None if matrix.offsets is None else matrix.offsets.half().float(),
        matrix.group_size,
        matrix.code_min,
        matrix.code_max,
        matrix.kind,
    )
    assert torch.equal(weights.dequantize(), rounded.dequantize())
    assert (rounded.scales - matrix.scales).abs().max() <= 2**-11 * matrix.scales.abs().max()
    bits = {Q.Q4_0: 4, Q.Q5_0: 5, Q.Q8_0: 8, Q.Q6_K: 6, Q.Q4_K: 4, Q.Q4_1: 4}.get(qtype, 5)
    affine = "+offset" if qtype in AFFINE else ""
    assert weights.format_name == f"q{bits}{affine}/g{16 if qtype == Q.Q6_K else 32}"
    assert weights.scales.dtype == torch.float16


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("rows", [1, 3, 4, 9, 17])
def test_matmul_equals_rounded_activations_times_the_weights(qtype: Q, rows: int) -> None:
    matrix = _matrix(qtype)
    x = _activations(rows, 512)
    want = _reference(x, BlockWeights(matrix, torch.float32).dequantize())
    for kernel in _variants():
        got = BlockWeights(matrix, torch.float32, kernel)(x)
        assert got.shape == (rows, 40) and got.dtype == torch.float32
        # Exact integer block sums; float32 scaling and accumulation.
        assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max(), kernel.vnni


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_largest_codes_times_largest_activations_do_not_overflow(qtype: Q) -> None:
    """Every code at an end of its range and every activation at +-127 after
    rounding: the integer sums the AVX2 build adds in int16 before widening
    are at their bounds here."""
    matrix = _matrix(qtype, rows=16, cols=256)
    ones = torch.ones(2, 256)
    x = torch.cat([ones, -ones, torch.where(torch.arange(256) % 2 == 0, 1.0, -1.0)[None]])
    for end in (matrix.code_max, matrix.code_min):
        extreme = dataclasses.replace(matrix, codes=torch.full_like(matrix.codes, end))
        want = _reference(x, BlockWeights(extreme, torch.float32).dequantize())
        for kernel in _variants():
            got = BlockWeights(extreme, torch.float32, kernel)(x)
            assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max(), (end, kernel.vnni)


@pytest.mark.parametrize("rows", [1, 3, 130])  # one thread, or the threads of a prefill
def test_activations_round_half_to_even_on_their_block_scale(rows: int) -> None:
    """Through a weight that copies input i to output i (8-bit codes, scale
    1), the output is each activation as the kernel rounded it: ties go to
    the even code, as torch.round does, in every block and row."""
    ties = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 126.5, -126.5] + [0.25] * 22)
    x = torch.stack([ties * (1 + row % 3) for row in range(rows)]).repeat(1, 2)
    x[:, 32:] *= -0.5  # a second block, on its own scale
    identity = GroupAffine(
        codes=torch.eye(64, dtype=torch.int8),
        scales=torch.ones(64, 2),
        offsets=None,
        group_size=32,
        code_min=-128,
        code_max=127,
        kind="Q8_0",
    )
    scales = x.reshape(rows, 2, 32).abs().amax(-1, keepdim=True) / 127
    want = (torch.round(x.reshape(rows, 2, 32) / scales) * scales).reshape(rows, 64)
    assert want[0, 1] == 0 and want[0, 3] == 2 and want[0, 6] == -2  # the ties above
    for kernel in _variants():
        assert torch.equal(BlockWeights(identity, torch.float32, kernel)(x), want), kernel.vnni


def test_bfloat16_in_and_out_rounds_once_at_the_end() -> None:
    matrix = _matrix(Q.Q5_0)
    x = _activations(5, 512, torch.bfloat16)
    want = _reference(x, matrix.dequantize())
    weights = BlockWeights(matrix, torch.bfloat16)
    got = weights(x)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, BlockWeights(matrix, torch.float32)(x.float()).bfloat16())
    assert (got.double() - want).abs().max() <= 2**-8 * want.abs().max()


def test_a_verify_row_equals_the_decode_of_that_row_bit_for_bit() -> None:
    """Each row is rounded and summed alone, in the same order whatever the
    number of rows: a k-row verify (or a batch, or a prefill) reproduces the
    one-row decodes."""
    for qtype in (Q.Q5_0, Q.Q4_K):
        matrix = _matrix(qtype, rows=72, cols=1024)
        x = _activations(130, 1024, torch.bfloat16)
        for kernel in _variants():
            weights = BlockWeights(matrix, torch.bfloat16, kernel)
            together = weights(x)
            for rows in (2, 5, 8, 9, 13, 17):  # one pass of rows, or several of near-equal sizes
                assert torch.equal(weights(x[:rows]), together[:rows])
            alone = torch.cat([weights(x[row : row + 1]) for row in range(x.shape[0])])
            assert torch.equal(alone, together)


def test_bias_and_leading_dimensions() -> None:
    matrix = _matrix(Q.Q8_0, rows=24, cols=256)
    weights = BlockWeights(matrix, torch.float32)
    x = _activations(6, 256)
    bias = torch.randn(24)
    assert torch.equal(weights(x, bias), weights(x) + bias)
    assert torch.equal(weights(x.view(2, 3, 256)), weights(x).view(2, 3, 24))


def test_the_kernels_agree_where_both_run() -> None:
    if not cpu_flags() >= VNNI_CPU_FLAGS:
        pytest.skip("no AVX512-VNNI here: one kernel only")
    avx2, vnni = _variants()
    for qtype in (Q.Q6_K, Q.Q4_K, Q.Q8_0):
        matrix = _matrix(qtype, rows=32, cols=1024)
        x = _activations(7, 1024)
        got, want = (BlockWeights(matrix, torch.float32, k)(x) for k in (avx2, vnni))
        assert (got - want).abs().max() <= 1e-6 * want.abs().max()
    # A width of 3 blocks and 8 output rows (half a tile, padded).
    odd = _matrix(Q.Q5_0, rows=8, cols=96)
    x = _activations(3, 96)
    got, want = (BlockWeights(odd, torch.float32, k)(x) for k in (avx2, vnni))
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()


def test_formats_without_blocks_keep_torchs_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    five = _matrix(Q.Q5_0, rows=16, cols=64)
    assert fits_blocks(_matrix(Q.Q4_K, rows=16, cols=256))
    # A row-wide scale, a width that is not whole blocks of 32: not blocks.
    wide = GroupAffine(five.codes, five.scales[:, :1], None, 64, -16, 15, "x")
    assert not fits_blocks(wide)
    assert not fits_blocks(_matrix(Q.Q6_K, rows=16, cols=256).narrow(1, 0, 16 * 3))
    assert isinstance(linear_weights_from([five], torch.float32, CPU), BlockWeights)
    monkeypatch.setenv(SWITCH, "avx2")
    assert not load_block_kernel().vnni
    monkeypatch.setenv(SWITCH, "off")
    assert block_kernel_reason() == f"the block kernel is turned off ({SWITCH}=off)"
    assert isinstance(linear_weights_from([five], torch.float32, CPU), Int8Weights)
    four = _matrix(Q.Q4_0, rows=16, cols=64)
    assert isinstance(linear_weights_from([four], torch.float32, CPU), Int4Weights)


def test_bad_formats_are_refused_by_name() -> None:
    five = _matrix(Q.Q5_0, rows=16, cols=64)
    wide = GroupAffine(five.codes, five.scales[:, :1], None, 64, -16, 15, "Q5_0 per row")
    with pytest.raises(ValueError, match="Q5_0 per row is not a block format"):
        BlockWeights(wide, torch.float32)


def test_a_copy_or_a_pickle_loads_its_own_kernel() -> None:
    matrix = _matrix(Q.Q5_0, rows=24, cols=64)
    x = _activations(2, 64)
    for kernel in _variants():
        weights = BlockWeights(matrix, torch.float32, kernel)
        want = weights(x)
        for copied in (copy.deepcopy(weights), pickle.loads(pickle.dumps(weights))):
            assert copied.kernel.vnni == kernel.vnni
            assert torch.equal(copied(x), want)


def test_a_kernel_that_cannot_be_built_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocked = tmp_path / "a file"
    blocked.write_text("")
    monkeypatch.setenv("SPECRAY_HOME", str(blocked / "home"))  # cannot be made
    with pytest.raises(BlockKernelUnavailable, match="could not build the block kernel"):
        build_block_kernel(vnni=False)
    monkeypatch.setenv("SPECRAY_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(BlockKernelUnavailable, match="no C\\+\\+ compiler"):
        build_block_kernel(vnni=False)


def test_the_profiler_sees_the_kernel_as_a_low_bit_matmul() -> None:
    weights = BlockWeights(_matrix(Q.Q5_0, rows=16, cols=64), torch.float32)
    x = _activations(2, 64)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        weights(x)
    names = {event.name for event in prof.events()}
    assert PROFILER_NAME in names and kind_of(PROFILER_NAME) == "low-bit matmul"
