"""Building the compiled CPU kernels: processes that start together (TP
ranks, replicas, test workers) build the library once between them, and a
model is built at load, so its first forward waits on no compiler. A
stand-in compiler records each build, so this runs in a second on any
machine."""

from __future__ import annotations

import multiprocessing
import os
import stat
from pathlib import Path

import pytest

from specray.actors.model import loader
from specray.actors.parallel import kernel_build
from specray.actors.parallel.kernel_build import CSRC, CXX_FLAGS

FAKE_COMPILER = """#!/bin/sh
# Records the build, takes a while as a real one does, writes the output.
if [ "$1" = "--version" ]; then echo "fake 1.0"; exit 0; fi
echo build >> "$BUILD_LOG"
sleep 1
while [ "$#" -gt 0 ]; do
  if [ "$1" = "-o" ]; then echo library > "$2"; fi
  shift
done
"""


def _build_in_a_process(home: str, compiler: str, log: str) -> str:
    os.environ["SPECRAY_HOME"] = home
    os.environ["BUILD_LOG"] = log
    return str(kernel_build._compile(compiler, CXX_FLAGS, CSRC))


def test_processes_that_start_together_build_the_library_once(tmp_path: Path) -> None:
    compiler = tmp_path / "fake-g++"
    compiler.write_text(FAKE_COMPILER)
    compiler.chmod(compiler.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "builds.log"
    home = tmp_path / "home"
    args = (str(home), str(compiler), str(log))
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        libraries = pool.starmap(_build_in_a_process, [args] * 3)
    assert len(set(libraries)) == 1 and Path(libraries[0]).read_text() == "library\n"
    assert log.read_text().splitlines() == ["build"]  # one build; the others waited for it
    assert _build_in_a_process(*args) == libraries[0]  # later: found, not built
    assert log.read_text().splitlines() == ["build"]


def test_a_failed_build_says_why_and_leaves_no_library(tmp_path: Path) -> None:
    compiler = tmp_path / "broken-g++"
    compiler.write_text("#!/bin/sh\necho 'error: no such instruction' >&2\nexit 1\n")
    compiler.chmod(compiler.stat().st_mode | stat.S_IEXEC)
    os.environ["SPECRAY_HOME"] = str(tmp_path / "home")
    try:
        with pytest.raises(kernel_build.BlockKernelUnavailable, match="no such instruction"):
            kernel_build._compile(str(compiler), CXX_FLAGS, CSRC)
    finally:
        del os.environ["SPECRAY_HOME"]
    assert not list((tmp_path / "home" / "kernels").glob("*.so"))


def test_loading_a_cpu_model_builds_the_kernels_before_its_first_forward(
    tiny_dir_factory,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The build (or the finding of a built library) happens in
    ``load_model``, which start-up deadlines bound, not in the first
    forward, which a verify deadline bounds."""
    asked: list[str] = []
    monkeypatch.setattr(loader, "block_kernel_reason", lambda: asked.append("built") or None)
    model = loader.load_model(tiny_dir_factory("qwen2"))
    assert asked == ["built"] and not model.training


def test_a_change_to_any_header_builds_a_new_library(tmp_path: Path) -> None:
    """The store's key covers every header of the sources' tree, so an edit
    to one is never served from a library built before it."""
    compiler = tmp_path / "fake-g++"
    compiler.write_text(FAKE_COMPILER)
    compiler.chmod(compiler.stat().st_mode | stat.S_IEXEC)
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    for source in (*kernel_build.SOURCES, *(path.name for path in CSRC.glob("*.h"))):
        (csrc / source).write_bytes((CSRC / source).read_bytes())
    args = (str(tmp_path / "home"), str(compiler), str(tmp_path / "builds.log"))
    os.environ["SPECRAY_HOME"], os.environ["BUILD_LOG"] = args[0], args[2]
    try:
        first = kernel_build._compile(str(compiler), CXX_FLAGS, csrc)
        headers = sorted(csrc.glob("*.h"))
        assert {path.name for path in headers} >= {"block_common.h", "tile_unpack.h"}
        libraries = {first}
        for header in headers:
            header.write_text(header.read_text() + "\n// edited\n")
            libraries.add(kernel_build._compile(str(compiler), CXX_FLAGS, csrc))
        assert len(libraries) == len(headers) + 1
    finally:
        del os.environ["SPECRAY_HOME"], os.environ["BUILD_LOG"]
