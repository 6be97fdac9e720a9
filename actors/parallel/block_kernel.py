"""The block matmul kernel (``csrc/block_matmul.cpp``), compiled on first use.

The C++ file is compiled once per machine with the system's C++ compiler
into ``$SPECRAY_HOME/kernels/`` (a name keyed by the source, the compiler
and its flags) and loaded with ``ctypes``; its threads run on the OpenMP
runtime torch has already loaded, with torch's thread count. Where it
cannot run (no AVX2/FMA/F16C, no compiler, not x86) :func:`load_block_kernel`
says why and the caller keeps torch's kernels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from specray.actors.store.layout import default_home

SOURCE = Path(__file__).parent / "csrc" / "block_matmul.cpp"
NEEDED_FLAGS = frozenset({"avx2", "fma", "f16c"})
CXX_FLAGS = ("-O3", "-std=c++17", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-fPIC", "-shared")
# Where the CPU has them, 512-bit integer dot products (two blocks per
# instruction, summed into int32 without the AVX2 path's int16 step).
VNNI_CPU_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_vnni"})
VNNI_CXX_FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni")
# Set to off / 0 to keep torch's kernels (per-channel int8, int4) for every
# GGUF block, e.g. to compare with them.
SWITCH = "SPECRAY_BLOCK_KERNEL"
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}


class BlockKernelUnavailable(RuntimeError):
    """The kernel cannot run here; the message says why."""


@dataclass(frozen=True)
class BlockKernel:
    """The loaded library's one entry point."""

    library: ctypes.CDLL
    path: Path
    vnni: bool  # compiled with the AVX512-VNNI path

    def matmul(
        self,
        x: torch.Tensor,  # [rows, k] float32 or bfloat16, contiguous, CPU
        nibbles: torch.Tensor,  # [n, k / 2] uint8 (bits 4-6) or empty
        planes: torch.Tensor,  # [n, k / 32, bits - 4] int32 (bits 5-6) or empty
        codes: torch.Tensor,  # [n, k] int8 (bits 8) or empty
        scales: torch.Tensor,  # [n, k / group] float32 or float16
        bits: int,
        group: int,
        code_min: int,
        out: torch.Tensor,  # [rows, n] float32 or bfloat16, contiguous
    ) -> None:
        status = self.library.specray_block_matmul(
            x.data_ptr(),
            DTYPE_CODES[x.dtype],
            x.shape[0],
            x.shape[1],
            nibbles.data_ptr(),
            planes.data_ptr(),
            codes.data_ptr(),
            scales.data_ptr(),
            int(scales.dtype == torch.float16),
            bits,
            group,
            code_min,
            out.shape[1],
            out.data_ptr(),
            DTYPE_CODES[out.dtype],
            torch.get_num_threads(),
        )
        if status:
            raise ValueError(f"the block kernel has no {bits}-bit codes in groups of {group}")

    def dequantize(
        self,
        nibbles: torch.Tensor,
        planes: torch.Tensor,
        codes: torch.Tensor,
        scales: torch.Tensor,
        bits: int,
        group: int,
        code_min: int,
        first: int,
        out: torch.Tensor,  # [last - first, k] float32 or bfloat16, contiguous
    ) -> None:
        """Rows ``[first, first + len(out))`` of the weight, into ``out``."""
        status = self.library.specray_block_dequantize(
            nibbles.data_ptr(),
            planes.data_ptr(),
            codes.data_ptr(),
            scales.data_ptr(),
            int(scales.dtype == torch.float16),
            bits,
            group,
            code_min,
            out.shape[1],
            first,
            first + out.shape[0],
            out.data_ptr(),
            DTYPE_CODES[out.dtype],
            torch.get_num_threads(),
        )
        if status:
            raise ValueError(f"the block kernel has no {bits}-bit codes in groups of {group}")


def cpu_flags(path: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    try:
        text = path.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def load_block_kernel() -> BlockKernel:
    """The compiled kernel for this CPU; raises :class:`BlockKernelUnavailable`
    naming the reason when this machine cannot run it (or it is turned off).
    Compiled at most once per source and compiler, tried once per process."""
    if _switched_off():
        raise BlockKernelUnavailable(
            f"the block kernel is turned off ({SWITCH}={os.environ[SWITCH]})"
        )
    found = _kernel_for_this_cpu()
    if isinstance(found, str):
        raise BlockKernelUnavailable(found)
    return found


@functools.cache
def _kernel_for_this_cpu() -> BlockKernel | str:
    try:
        return build_block_kernel(vnni=cpu_flags() >= VNNI_CPU_FLAGS)
    except BlockKernelUnavailable as error:
        return str(error)


def _switched_off() -> bool:
    return os.environ.get(SWITCH, "").lower() in ("0", "off", "false", "no")


def build_block_kernel(vnni: bool) -> BlockKernel:
    """The kernel compiled with (``vnni``) or without the AVX512-VNNI path;
    tests build both on a CPU that has it."""
    if platform.machine() not in ("x86_64", "AMD64"):
        raise BlockKernelUnavailable(f"the block kernel is x86 code; this is {platform.machine()}")
    missing = NEEDED_FLAGS - cpu_flags()
    if missing:
        raise BlockKernelUnavailable(f"the block kernel needs {' '.join(sorted(missing))}")
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise BlockKernelUnavailable("no C++ compiler (g++ or $CXX) to build the block kernel")
    library = _compiled(compiler, CXX_FLAGS + (VNNI_CXX_FLAGS if vnni else ()))
    loaded = ctypes.CDLL(str(library))
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    matmul = loaded.specray_block_matmul
    matmul.restype = ctypes.c_int
    matmul.argtypes = [
        ptr,
        i32,
        i64,
        i64,
        ptr,
        ptr,
        ptr,
        ptr,
        i32,
        i32,
        i32,
        i32,
        i64,
        ptr,
        i32,
        i32,
    ]
    dequantize = loaded.specray_block_dequantize
    dequantize.restype = ctypes.c_int
    dequantize.argtypes = [ptr, ptr, ptr, ptr, i32, i32, i32, i32, i64, i64, i64, ptr, i32, i32]
    return BlockKernel(loaded, library, vnni)


def block_kernel_reason() -> str | None:
    """None where the block kernel runs here, else why not (asked again each
    time, so that ``SPECRAY_BLOCK_KERNEL=off`` set later is seen)."""
    try:
        load_block_kernel()
    except BlockKernelUnavailable as error:
        return str(error)
    return None


def _compiled(compiler: str, flags: tuple[str, ...]) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), version.encode(), " ".join(flags).encode()):
        key.update(part)
    target = default_home() / "kernels" / f"block_matmul-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed into place: processes that start
    # together (TP ranks, draft replicas) each see a whole file or none.
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        built = Path(work) / target.name
        result = subprocess.run(
            [compiler, *flags, "-o", str(built), str(SOURCE)], capture_output=True, text=True
        )
        if result.returncode:
            raise BlockKernelUnavailable(
                f"compiling {SOURCE.name} with {compiler} failed: {result.stderr.strip()[-2000:]}"
            )
        os.replace(built, target)
    return target
