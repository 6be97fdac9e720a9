"""The soak (``specray.bench.soak``) on a tiny model: 64 concurrent gRPC
streams against a real router-backed server with two n-gram draft replicas,
while a chaos task SIGKILLs a random draft replica every few seconds.

Nothing may be lost or garbled: every request finishes, every greedy output
equals the prompt's target-only output, and the pool is back to two replicas
at the end. ``SPECRAY_SOAK_S`` sets how long requests keep starting (default
25 s, several kills; the whole test takes about 20 s more than that on 2 cores).
``SPECRAY_SOAK_REPORT=FILE.json`` also writes the report, with the machine.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from router_server_helpers import router_serve_config
from serving_helpers import MODEL_VOCAB, ServingThread, save_served_model

from specray.bench.common import machine_info
from specray.bench.soak import Prompt, SoakConfig, run_soak
from specray.deploy.router_backend import RouterBackend

CONCURRENCY = 64
TEXTS = [
    "x = [1, 2, 3]\ny = [1, 2, 3]\nz = [1, 2, 3]\n",
    "def add(a, b):",
    "The quick brown fox jumps over the lazy dog.",
    "for i in range(10):\n    print(i)\n",
]


def prompts() -> list[Prompt]:
    """Texts, and token ids with a repeat in them so the n-gram drafter finds
    matches (and misses, where the output leaves the repeat)."""
    mixed: list[Prompt] = list(TEXTS)
    for i in range(12):
        gen = torch.Generator().manual_seed(50 + i)
        body = torch.randint(3, MODEL_VOCAB, (4 + 3 * i,), generator=gen).tolist()
        mixed.append(body + body[: 2 + i % 4])
    return mixed


@pytest.mark.slow
def test_soak_loses_and_garbles_nothing_while_drafts_are_killed(
    local_ray: None, tmp_path_factory: pytest.TempPathFactory
) -> None:
    model_dir = save_served_model(tmp_path_factory.mktemp("served"))
    drafts = [{"kind": "ngram", "max_ngram": 3, "placement": "actor"}]  # killed by pid
    router = {"num_drafts": 2, "num_slots": CONCURRENCY, "max_len": 256, "drafts": drafts}
    limits = {"max_tokens": 64, "max_queued_requests": CONCURRENCY}
    config = router_serve_config(model_dir, router, limits)
    soak = SoakConfig(
        duration_s=float(os.environ.get("SPECRAY_SOAK_S", "25")),
        concurrency=CONCURRENCY,
        max_tokens=32,
        kill_every_s=4.0,
    )
    with ServingThread(config) as server:
        backend = server.service.backend
        assert isinstance(backend, RouterBackend)
        report = asyncio.run(run_soak(server.grpc_address, backend.router, prompts(), soak))
    print(report.summary())
    if out := os.environ.get("SPECRAY_SOAK_REPORT"):
        record = {"machine": machine_info(), "soak": asdict(soak), "report": asdict(report)}
        Path(out).write_text(json.dumps(record, indent=2) + "\n")
    assert report.failures == [] and report.mismatches == []
    assert report.requests >= CONCURRENCY and report.kills >= 1
    # Every killed replica was replaced: the pool is back to its two.
    assert report.pool_restored and report.draft_restarts == report.kills
    assert report.fallbacks >= 1  # the kills did hit requests mid-stream
