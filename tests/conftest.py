from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch

sys.path.insert(0, str(Path(__file__).parent))

from serving_helpers import ServingThread
from store_helpers import TinyGGUF, write_tiny_gguf
from tiny_models import family_configs, save_tiny_model

from specray.cluster.local_ray import start_ray
from specray.deploy.client import SpecrayClient

FAMILIES = sorted(family_configs())
_EXIT_STATUS = pytest.StashKey[int]()

# Under pytest-xdist (scripts/test.sh runs two workers) each worker gets its
# share of the cores: two processes each spinning torch's default thread
# pool on 2 cores slow each other several times over.
if _workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with slow tests first, each module's tests kept together and
    in order: scripts/test.sh hands whole files to its workers in this
    order, and a long module handed out last would run alone at the end."""
    slow_modules = {item.module for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module not in slow_modules)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave with the session's status once pytest has reported it, without
    the interpreter's teardown: after a run that passed all 791 tests, that
    teardown crashed once (SIGSEGV, exit 139) among the native threads the
    suite leaves behind (Ray's core worker, gRPC's pollers, torch's OpenMP
    pool), which no test can catch and which would fail CI for nothing the
    tests checked. A crash during a test still fails the run."""
    if _EXIT_STATUS in config.stash:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(config.stash[_EXIT_STATUS])


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


@pytest.fixture(scope="module")
def client(server: ServingThread) -> Iterator[SpecrayClient]:
    """A gRPC client of the module's ``server`` fixture (a served model)."""
    with SpecrayClient(server.grpc_address, timeout_s=120) as specray:
        yield specray
