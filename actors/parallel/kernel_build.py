"""Compiling ``csrc/`` into one shared library for this CPU, once per
source, compiler and flags, into ``$SPECRAY_HOME/kernels/``: what
:mod:`specray.actors.parallel.block_kernel` loads. Where the library cannot
be built here (not x86, no AVX2/FMA/F16C, no compiler, an unwritable store)
:class:`BlockKernelUnavailable` says why."""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from specray.actors.parallel.cpuinfo import flags_in, read_cpuinfo
from specray.actors.store.layout import default_home

CSRC = Path(__file__).parent / "csrc"
SOURCES = ("tiled_matmul.cpp", "row_attention.cpp", "row_norm.cpp", "rotary.cpp", "cache_rows.cpp")
NEEDED_FLAGS = frozenset({"avx2", "fma", "f16c"})
# No contraction into fused multiply-adds where the source has a multiply
# then an add: dequantized values round twice, as the checkpoint defines.
CXX_FLAGS = (
    "-O3",
    "-std=c++17",
    "-ffp-contract=off",
    "-mavx2",
    "-mfma",
    "-mf16c",
    "-fopenmp",
    "-fPIC",
    "-shared",
)
# Where the CPU has them, 512-bit integer dot products (two blocks per
# instruction, summed into int32 without the AVX2 path's int16 step).
VNNI_CPU_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_vnni"})
VNNI_CXX_FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni")


class BlockKernelUnavailable(RuntimeError):
    """The kernel cannot run here; the message says why."""


@functools.cache
def cpu_flags() -> frozenset[str]:
    return flags_in(read_cpuinfo())


def compiled_library(vnni: bool, csrc: Path = CSRC) -> Path:
    """The library with the AVX512-VNNI inner loop (``vnni``) or the AVX2 one,
    built if it is not in the store yet; ``csrc``: another tree of the same
    sources (a benchmark comparing two versions of the kernels)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        raise BlockKernelUnavailable(f"the block kernel is x86 code; this is {platform.machine()}")
    missing = NEEDED_FLAGS - cpu_flags()
    if missing:
        raise BlockKernelUnavailable(f"the block kernel needs {' '.join(sorted(missing))}")
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise BlockKernelUnavailable("no C++ compiler (g++ or $CXX) to build the block kernel")
    return _compiled(compiler, CXX_FLAGS + (VNNI_CXX_FLAGS if vnni else ()), csrc)


def _compiled(compiler: str, flags: tuple[str, ...], csrc: Path) -> Path:
    try:
        return _compile(compiler, flags, csrc)
    except OSError as error:  # an unwritable store, a compiler that will not run
        raise BlockKernelUnavailable(f"could not build the block kernel: {error}") from error


def _compile(compiler: str, flags: tuple[str, ...], csrc: Path) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    sources = [csrc / name for name in SOURCES]
    key = hashlib.sha256()
    # Every header of the tree, found rather than listed: one missing from a
    # list would leave a library built from its old text in the store.
    for path in (*sources, *sorted(csrc.glob("*.h"))):
        key.update(path.read_bytes())
    key.update(version.encode())
    key.update(" ".join(flags).encode())
    target = default_home() / "kernels" / f"block_matmul-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One build at a time: a build takes about a minute of one core, and
    # processes that start together (TP ranks, draft replicas, test workers)
    # would otherwise each build the same file on the same cores.
    with open(target.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            _build(compiler, flags, sources, target)
    return target


def _build(compiler: str, flags: tuple[str, ...], sources: list[Path], target: Path) -> None:
    # Built beside the target and renamed into place: a process that loads
    # without the lock sees a whole file or none.
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        built = Path(work) / target.name
        result = subprocess.run(
            [compiler, *flags, "-o", str(built), *map(str, sources)],
            capture_output=True,
            text=True,
        )
        if result.returncode:
            error = result.stderr.strip()[-2000:]
            raise BlockKernelUnavailable(
                f"compiling the block kernel with {compiler} failed: {error}"
            )
        os.replace(built, target)
