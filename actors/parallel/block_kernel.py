"""The CPU kernels of ``csrc/``, loaded: the block matmul, row-by-row
attention, and the steps around them (RMSNorm, rotary embedding, cache
rows), called through ``ctypes``.

The library is compiled on first use (:mod:`specray.actors.parallel.kernel_build`);
its threads run on the OpenMP runtime torch has already loaded, with torch's
thread count. Where it cannot run (no AVX2/FMA/F16C, no compiler, not x86)
:func:`load_block_kernel` says why and the caller keeps torch's kernels.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from specray.actors.parallel.kernel_build import (
    CSRC,
    VNNI_CPU_FLAGS,
    BlockKernelUnavailable,
    compiled_library,
    cpu_flags,
)

# Set to off / 0 to keep torch's kernels (per-channel int8, int4) for every
# GGUF block, e.g. to compare with them; to avx2 for the AVX2 build on a CPU
# that has VNNI.
SWITCH = "SPECRAY_BLOCK_KERNEL"
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}

T = TypeVar("T")


@dataclass(frozen=True)
class PackedBlocks:
    """A weight in the kernel's layout (csrc/tiled_matmul.cpp: tiles of 16
    output rows); the parts a format does not use are empty."""

    nibbles: torch.Tensor  # uint8: bits 4-6
    highs: torch.Tensor  # uint8: bits 5-6
    codes: torch.Tensor  # uint8: bits 8
    scales: torch.Tensor  # float32 or float16
    offsets: torch.Tensor | None  # as the scales: value = scale * code + offset
    bits: int
    group: int
    code_min: int


@dataclass(frozen=True)
class BoundMatmul:
    """One weight's matmul entry point with its weight arguments bound."""

    entry: Callable[..., int]
    fixed: tuple[int | None, ...]
    scales_at: int  # where the scales were when bound: moved weights need a new binding
    refusal: str

    def __call__(
        self,
        x: torch.Tensor,  # [rows, k] float32 or bfloat16, contiguous, CPU
        out: torch.Tensor,  # [rows, n] float32 or bfloat16, contiguous
    ) -> None:
        status = self.entry(
            x.data_ptr(),
            DTYPE_CODES[x.dtype],
            x.shape[0],
            x.shape[1],
            *self.fixed,
            out.shape[1],
            out.data_ptr(),
            DTYPE_CODES[out.dtype],
            torch.get_num_threads(),
        )
        if status:
            raise ValueError(self.refusal)


@dataclass(frozen=True)
class BlockKernel:
    """The loaded library's entry points."""

    library: ctypes.CDLL
    path: Path
    vnni: bool  # compiled with the AVX512-VNNI inner loop (else the AVX2 one)

    def bind(self, weights: PackedBlocks) -> BoundMatmul:
        """``weights``' matmul with its pointers and fields resolved once: a
        decode calls it a hundred times a step, where rebuilding the call's
        arguments cost several times the call itself."""
        entry = self.library.specray_tiled_matmul
        fixed = _weight_args(weights)
        return BoundMatmul(entry, fixed, weights.scales.data_ptr(), _refusal(weights))

    def row_attention(
        self,
        query: torch.Tensor,  # [tokens, heads, head_dim] float32 or bf16, contiguous
        query_rows: torch.Tensor,  # [tokens] int64: b * max_new + i, each query's mask row
        keys: torch.Tensor,  # [blocks, kv_heads, length, head_dim], rows of head_dim contiguous
        values: torch.Tensor,  # as keys, same dtype
        kv_blocks: torch.Tensor,  # [batch] int64: the block sequence b reads
        visible: torch.Tensor,  # [batch, max_new, context] bool, contiguous
        scale: float,
    ) -> torch.Tensor | None:  # as query; None: shapes or dtypes csrc/row_attention.cpp refuses
        """Attention row by row over each row's visible keys, read where they
        lie (csrc/row_attention.cpp)."""
        tokens, heads, head_dim = query.shape
        out = torch.empty_like(query)
        status = self.library.specray_row_attention(
            query.data_ptr(),
            DTYPE_CODES[query.dtype],
            tokens,
            heads,
            head_dim,
            query_rows.data_ptr(),
            keys.data_ptr(),
            values.data_ptr(),
            DTYPE_CODES[keys.dtype],
            keys.shape[1],
            kv_blocks.data_ptr(),
            keys.stride(0),
            keys.stride(1),
            values.stride(0),
            values.stride(1),
            visible.data_ptr(),
            visible.shape[1],
            visible.shape[2],
            out.data_ptr(),
            scale,
            torch.get_num_threads(),
        )
        return None if status else out

    def rms_norm(
        self,
        x: torch.Tensor,  # [rows, dim] float32 or bf16, contiguous
        weight: torch.Tensor,  # [dim] float32 or bf16, contiguous
        eps: float,
        mode: int,  # csrc/row_norm.cpp: 0 Llama, 1 Gemma, 2 float32 weight
    ) -> torch.Tensor | None:  # as x; None: what csrc/row_norm.cpp refuses
        """RMSNorm of each row in one call (csrc/row_norm.cpp)."""
        out = torch.empty_like(x)
        status = self.library.specray_rms_norm(
            x.data_ptr(),
            DTYPE_CODES[x.dtype],
            weight.data_ptr(),
            DTYPE_CODES[weight.dtype],
            out.data_ptr(),
            x.shape[0],
            x.shape[1],
            eps,
            mode,
            torch.get_num_threads(),
        )
        return None if status else out

    def rotary(
        self,
        x: torch.Tensor,  # [tokens, heads, head_dim], head_dim contiguous
        cos: torch.Tensor,  # [tokens, head_dim], x's dtype, contiguous
        sin: torch.Tensor,  # as cos
    ) -> torch.Tensor | None:  # [tokens, heads, head_dim] contiguous; None: refused
        """Rotary embedding of every head, bit for bit as torch's operators
        compute it (csrc/rotary.cpp)."""
        tokens, heads, head_dim = x.shape
        out = torch.empty((tokens, heads, head_dim), dtype=x.dtype)
        status = self.library.specray_rotary(
            x.data_ptr(),
            DTYPE_CODES[x.dtype],
            cos.data_ptr(),
            sin.data_ptr(),
            out.data_ptr(),
            tokens,
            heads,
            head_dim,
            x.stride(0),
            x.stride(1),
            torch.get_num_threads(),
        )
        return None if status else out

    def cache_rows(
        self,
        cache_keys: torch.Tensor,  # [num_slots, kv_heads, max_len, head_dim], rows contiguous
        cache_values: torch.Tensor,  # as cache_keys, same strides and dtype
        slots: torch.Tensor,  # [tokens] int64
        positions: torch.Tensor,  # [tokens] int64
        keys: torch.Tensor,  # [tokens, kv_heads, head_dim], cache's dtype, rows contiguous
        values: torch.Tensor,  # as keys
    ) -> None:
        """``cache[slots[t], :, positions[t]] = keys[t]`` (and values) for
        every token t, in one call (csrc/cache_rows.cpp)."""
        num_slots, kv_heads, max_len, head_dim = cache_keys.shape
        status = self.library.specray_cache_rows(
            cache_keys.data_ptr(),
            cache_values.data_ptr(),
            cache_keys.stride(0),
            cache_keys.stride(1),
            num_slots,
            max_len,
            slots.data_ptr(),
            positions.data_ptr(),
            keys.shape[0],
            kv_heads,
            head_dim,
            keys.data_ptr(),
            keys.stride(0),
            keys.stride(1),
            values.data_ptr(),
            values.stride(0),
            values.stride(1),
            keys.element_size(),
        )
        if status:
            raise IndexError(
                f"cache rows out of range: slots {slots.tolist()} of {num_slots}, "
                f"positions {positions.tolist()} of {max_len}"
            )

    def dequantize(
        self,
        weights: PackedBlocks,
        first: int,
        out: torch.Tensor,  # [count, k] float32 or bfloat16, contiguous
    ) -> None:
        """Output rows ``[first, first + len(out))`` of the weight, into ``out``."""
        status = self.library.specray_tiled_dequantize(
            *_weight_args(weights),
            out.shape[1],
            first,
            first + out.shape[0],
            out.data_ptr(),
            DTYPE_CODES[out.dtype],
            torch.get_num_threads(),
        )
        if status:
            raise ValueError(_refusal(weights))


def _weight_args(weights: PackedBlocks) -> tuple[int | None, ...]:
    """The weight's arguments, in the order every entry point takes them."""
    return (
        weights.nibbles.data_ptr(),
        weights.highs.data_ptr(),
        weights.codes.data_ptr(),
        weights.scales.data_ptr(),
        int(weights.scales.dtype == torch.float16),
        None if weights.offsets is None else weights.offsets.data_ptr(),
        weights.bits,
        weights.group,
        weights.code_min,
    )


def _refusal(weights: PackedBlocks) -> str:
    return f"the block kernel has no {weights.bits}-bit codes in groups of {weights.group}"


def load_block_kernel() -> BlockKernel:
    """The compiled kernel for this CPU (``SPECRAY_BLOCK_KERNEL=avx2``: the
    AVX2 build even where VNNI is there); raises :class:`BlockKernelUnavailable`
    naming the reason when this machine cannot run it (or it is turned off).
    Compiled at most once per source and compiler, tried once per process."""
    found = _kernel_for_setting(os.environ.get(SWITCH, ""))
    if isinstance(found, str):
        raise BlockKernelUnavailable(found)
    return found


@functools.cache
def _kernel_for_setting(setting: str) -> BlockKernel | str:
    """The kernel for a value of :data:`SWITCH`, or why there is none; cached,
    since layers ask on every call."""
    if setting.lower() in ("0", "off", "false", "no"):
        return f"the block kernel is turned off ({SWITCH}={setting})"
    return _kernel_for(vnni=setting.lower() != "avx2" and cpu_flags() >= VNNI_CPU_FLAGS)


@functools.cache
def _kernel_for(vnni: bool) -> BlockKernel | str:
    try:
        return build_block_kernel(vnni)
    except BlockKernelUnavailable as error:
        return str(error)


def build_block_kernel(vnni: bool, csrc: Path = CSRC) -> BlockKernel:
    """The kernel compiled with the AVX512-VNNI inner loop (``vnni``) or the
    AVX2 one; both read the same layout, and tests build both on a CPU that
    has VNNI. ``csrc``: another version of the sources (a benchmark's)."""
    library = compiled_library(vnni, csrc)
    loaded = ctypes.CDLL(str(library))
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    weight = [ptr, ptr, ptr, ptr, i32, ptr, i32, i32, i32]  # _weight_args
    entries = {
        "tiled_matmul": [ptr, i32, i64, i64, *weight, i64, ptr, i32, i32],
        "tiled_dequantize": [*weight, i64, i64, i64, ptr, i32, i32],
        "row_attention": [
            *[ptr, i32, i64, i64, i64, ptr, ptr, ptr, i32, i64, ptr, i64, i64, i64, i64],
            *[ptr, i64, i64, ptr, ctypes.c_float, i32],
        ],
        "rms_norm": [ptr, i32, ptr, i32, ptr, i64, i64, ctypes.c_float, i32, i32],
        "rotary": [ptr, i32, ptr, ptr, ptr, i64, i64, i64, i64, i64, i32],
        "cache_rows": [ptr, ptr, *[i64] * 4, ptr, ptr, *[i64] * 3, ptr, i64, i64, ptr, *[i64] * 3],
    }
    for name, args in entries.items():
        entry = getattr(loaded, f"specray_{name}")
        entry.restype = ctypes.c_int
        entry.argtypes = args
    return BlockKernel(loaded, library, vnni)


def inference_kernel(*tensors: torch.Tensor) -> BlockKernel | None:
    """The kernels for an inference step on ``tensors``: None where they are
    not all on the CPU in a kernel dtype, where autograd wants their
    gradients (the kernels have no backward), or where the kernel cannot
    load here."""
    grad = torch.is_grad_enabled()
    for tensor in tensors:
        if not tensor.is_cpu or tensor.dtype not in DTYPE_CODES or (grad and tensor.requires_grad):
            return None
    found = _kernel_for_setting(os.environ.get(SWITCH, ""))
    return None if isinstance(found, str) else found


def named_for_profiler(name: str, call: Callable[[], T]) -> T:
    """``call()``, in a range named ``name`` while torch's profiler runs: it
    sees operators only, and a kernel's ctypes call is none."""
    if torch.autograd._profiler_enabled():
        with torch.profiler.record_function(name):
            return call()
    return call()


def block_kernel_reason() -> str | None:
    """None where the block kernel runs here, else why not (asked again each
    time, so that ``SPECRAY_BLOCK_KERNEL=off`` set later is seen)."""
    try:
        load_block_kernel()
    except BlockKernelUnavailable as error:
        return str(error)
    return None
