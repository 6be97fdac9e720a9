"""Starting embedded Ray: a node that times out while starting is tried
again; anything else is raised as it is. (Ray cannot be made to time out on
demand, so ray.init is replaced here; every other test starts the real one.)"""

from __future__ import annotations

from typing import Any

import pytest
import ray

from specray.cluster import local_ray


def _flaky_init(failures: list[str]) -> Any:
    calls: list[dict[str, Any]] = []

    def init(**kwargs: Any) -> None:
        calls.append(kwargs)
        if failures:
            raise Exception(failures.pop(0))

    return init, calls


def test_a_startup_timeout_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    init, calls = _flaky_init(["The current node timed out during startup. This could ..."])
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    local_ray._init_fresh(pause_s=0.0, num_cpus=2)
    assert [c["address"] for c in calls] == ["local", "local"] and calls[1]["num_cpus"] == 2
    init, calls = _flaky_init(["RuntimeError: Timed out waiting for file /tmp/ray/x/gcs_port"])
    monkeypatch.setattr(ray, "init", init)
    local_ray._init_fresh(pause_s=0.0)
    assert len(calls) == 2


def test_other_failures_and_a_second_timeout_are_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    init, calls = _flaky_init(["port in use"])
    monkeypatch.setattr(ray, "init", init)
    with pytest.raises(Exception, match="port in use"):
        local_ray._init_fresh(pause_s=0.0)
    assert len(calls) == 1
    init, calls = _flaky_init(["node timed out during startup"] * 3)
    monkeypatch.setattr(ray, "init", init)
    with pytest.raises(Exception, match="timed out during startup"):
        local_ray._init_fresh(pause_s=0.0)
    assert len(calls) == 3
