from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from store_helpers import TinyGGUF, write_tiny_gguf
from tiny_models import family_configs, save_tiny_model

FAMILIES = sorted(family_configs())


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_model_dir(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A saved tiny random model of each family."""
    return save_tiny_model(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="session")
def tiny_dir_factory(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    cache: dict[tuple[str, int], Path] = {}

    def make(family: str, seed: int = 0) -> Path:
        key = (family, seed)
        if key not in cache:
            cache[key] = save_tiny_model(family, tmp_path_factory.mktemp(f"{family}{seed}"), seed)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> TinyGGUF:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    return TinyGGUF(path, write_tiny_gguf(path))
