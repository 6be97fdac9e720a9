"""Every config shipped under deploy/configs loads as ``specray serve``
reads it, and says in its header how it is served."""

from __future__ import annotations

from pathlib import Path

import pytest

from specray.deploy.config import load_config

CONFIGS = sorted((Path(__file__).parent.parent / "deploy" / "configs").glob("*.yaml"))


def test_there_are_shipped_configs() -> None:
    assert {p.name for p in CONFIGS} >= {"tiny_v4.yaml", "suffix_1.5b.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_a_shipped_config_loads_and_documents_its_command(path: Path) -> None:
    config = load_config(path)
    assert config.backend == "router"
    assert config.host == "127.0.0.1"
    assert f"specray serve --config deploy/configs/{path.name}" in path.read_text()


def test_the_suffix_config_drafts_copies_up_to_sixteen() -> None:
    config = load_config(CONFIGS[[p.name for p in CONFIGS].index("suffix_1.5b.yaml")])
    assert config.router.drafter is not None and config.router.drafter.kind == "suffix"
    assert (config.router.k, config.router.adaptive, config.router.weights) == (16, True, "auto")
