"""Regenerate the Python stubs of ``specray/v1/*.proto`` with grpcio-tools.

    python -m specray.protos.generate           # rewrite the committed stubs
    python -m specray.protos.generate --check   # exit 1 if they are stale

protoc writes imports relative to the proto root (``from specray.v1 import
...``); the stubs live in the package ``specray.protos.specray.v1``, so that
import is rewritten to the full package path.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from importlib import resources
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILES = ("specray/v1/generation.proto", "specray/v1/admin.proto")
STUB_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
# protoc's import prefix, and the package the stubs really live in.
PROTO_PACKAGE_IMPORT = "from specray.v1 import "
PYTHON_PACKAGE_IMPORT = "from specray.protos.specray.v1 import "
# pyproject's ruff exclude covers the generated .py files only: keep ruff off
# the generated type stubs too, and mypy off the untyped generated code.
HEADERS = {".pyi": "# ruff: noqa\n# fmt: off\n", ".py": "# mypy: ignore-errors\n"}


def generate(out_dir: Path) -> list[Path]:
    """Write the stubs of every proto under ``out_dir`` (mirroring the proto
    paths) and return their paths."""
    from grpc_tools import protoc

    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *PROTO_FILES,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    written = []
    for proto in PROTO_FILES:
        stem = out_dir / proto.removesuffix(".proto")
        for suffix in STUB_SUFFIXES:
            path = stem.with_name(stem.name + suffix)
            text = path.read_text().replace(PROTO_PACKAGE_IMPORT, PYTHON_PACKAGE_IMPORT)
            text = HEADERS[path.suffix] + text
            path.write_text(text)
            written.append(path)
    return written


def stale_stubs() -> list[str]:
    """The committed stubs that differ from freshly generated ones."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = []
        for path in fresh:
            relative = path.relative_to(tmp)
            committed = PROTO_ROOT / relative
            if not committed.exists() or committed.read_bytes() != path.read_bytes():
                stale.append(str(relative))
        return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check the committed stubs")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_stubs()
        for name in stale:
            print(f"stale: protos/{name} (run python -m specray.protos.generate)", file=sys.stderr)
        return 1 if stale else 0
    for path in generate(PROTO_ROOT):
        print(path.relative_to(PROTO_ROOT.parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
