from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch

sys.path.insert(0, str(Path(__file__).parent))

from store_helpers import TinyGGUF, write_tiny_gguf
from tiny_models import family_configs, save_tiny_model

from specray.cluster.local_ray import start_ray

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


@pytest.fixture(scope="module")
def local_ray(request: pytest.FixtureRequest) -> Iterator[None]:
    """An embedded Ray on loopback for one test module, shut down after it
    when the module started it. ``RAY_CPUS`` in the module sets its logical
    CPUs (for placement; each actor runs an explicit thread count)."""
    info = start_ray(num_cpus=getattr(request.module, "RAY_CPUS", 8))
    assert info.node_ips == ("127.0.0.1",)
    assert info.gcs_address.startswith("127.0.0.1:")
    yield
    if info.started_here:
        ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """torch on one thread for a module (``pytestmark`` it in): models of
    many small ops only spin OpenMP's threads on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
