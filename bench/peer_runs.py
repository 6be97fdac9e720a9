"""One arm of the peer benchmark: a server started, warmed, sent every
prompt one at a time, and stopped.

Both servers are measured the same way: each prompt is first sent for one
token (unmeasured) so the measured request finds its prompt cached in either
server, then sent for real. A specray server serves both of its arms (with
and without speculation, a per-request switch); llama.cpp fixes drafting at
start, so each of its drafters is a server of its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from specray.bench.common import stop_process
from specray.bench.llama_server import llama_server, stream_completion
from specray.bench.serve_bench import RequestOptions, send_one
from specray.bench.serve_dataset import BenchPrompt, BenchRequest
from specray.bench.serve_metrics import RequestRecord
from specray.protos.specray.v1 import generation_pb2_grpc as pb_grpc

LLAMA, SPECRAY = "llama.cpp", "specray"
READY = "specray serve: ready"


@dataclass(frozen=True)
class Arm:
    """A server to measure: llama.cpp with ``flags``, or specray from ``config``."""

    name: str
    system: str  # LLAMA or SPECRAY
    flags: tuple[str, ...] = ()  # llama-server's speculative flags
    config: Path | None = None  # specray serve's YAML

    def log_path(self, directory: Path, number: int) -> Path:
        """Where this arm's server logs in round ``number``."""
        return directory / f"{self.name.replace(' ', '_')}.round{number}.log"


@dataclass
class ArmRun:
    """One arm's requests in one round, in the order they were sent."""

    arm: str
    round: int
    records: list[RequestRecord] = field(default_factory=list)
    server_command: list[str] = field(default_factory=list)
    # specray's start-up line saying which weight format and tp it chose, and why
    weights_choice: str | None = None


def llama_arm(name: str, draft_gguf: Path | None, draft_max: int) -> Arm:
    """``none``, or llama.cpp drafters joined by ``+`` in its priority order
    (``ngram-mod+draft``): ``draft`` is its ``draft-simple`` on ``-md
    draft_gguf``, at most ``draft_max`` tokens a round; any other part is a
    ``--spec-type`` name (``ngram-mod``, ``ngram-simple``, ...) at llama.cpp's
    own defaults."""
    if name == "none":
        return Arm(f"{LLAMA} none", LLAMA)
    parts = name.split("+")
    types = ["draft-simple" if part == "draft" else part for part in parts]
    flags = ["--spec-type", ",".join(types)]
    if "draft" in parts:
        if draft_gguf is None:
            raise ValueError(f"llama.cpp arm {name!r} needs --draft-model")
        flags += ["-md", str(draft_gguf), "--spec-draft-n-max", str(draft_max)]
    return Arm(f"{LLAMA} {name}", LLAMA, tuple(flags))


def run_llama(
    arm: Arm,
    binary: Path,
    target_gguf: Path,
    prompts: Sequence[BenchPrompt],
    warmup: Sequence[BenchPrompt],
    options: RequestOptions,
    threads: int,
    log_dir: Path,
    number: int,
    concurrency: int = 1,
) -> ArmRun:
    """One llama.cpp server with ``concurrency`` slots. One at a time, each
    prompt is primed just before it is measured (the slot holds it); with
    several slots every prompt is primed first (llama.cpp keeps prompts in
    its host-memory cache and finds each one's slot by common prefix), then
    they are sent at once, at most ``concurrency`` in flight."""
    log = arm.log_path(log_dir, number)
    run = ArmRun(arm.name, number)
    with llama_server(binary, target_gguf, arm.flags, threads, log, concurrency) as server:
        run.server_command = list(server.command)
        speculative = arm.flags != ()

        def send(prompt: BenchPrompt, max_tokens: int) -> RequestRecord:
            record = RequestRecord(prompt.id, prompt.category, speculative, time.perf_counter())
            ids = prompt.prompt
            if isinstance(ids, str):
                raise TypeError("llama.cpp arms send token ids: give --tokenizer")
            return stream_completion(server, record, ids, max_tokens, options.timeout_s)

        for prompt in warmup:
            send(prompt, options.max_tokens)
        if concurrency == 1:
            for prompt in prompts:
                send(prompt, 1)
                run.records.append(send(prompt, options.max_tokens))
            return run
        for prompt in prompts:
            send(prompt, 1)
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            run.records = list(pool.map(lambda p: send(p, options.max_tokens), prompts))
    return run


def run_specray(
    arm: Arm,
    prompts: Sequence[BenchPrompt],
    warmup: Sequence[BenchPrompt],
    options: RequestOptions,
    log_dir: Path,
    number: int,
    concurrency: int = 1,
    start_timeout_s: float = 900.0,
) -> ArmRun:
    """Start ``specray serve --config``, then: warm-up in both arms, every
    prompt once for one token, all of them with speculation, all without
    (at most ``concurrency`` in flight). Speculation goes first on a fresh
    server so a drafter that caches finished outputs (suffix) never drafts
    a prompt from its own target-only answer."""
    assert arm.config is not None
    log = arm.log_path(log_dir, number)
    command = [
        sys.executable,
        "-m",
        "specray.deploy.cli",
        "serve",
        "--config",
        str(arm.config),
        "--port",
        "0",
    ]
    run = ArmRun(arm.name, number, server_command=command)
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=os.environ)
    try:
        address = _wait_ready(process, log, start_timeout_s)
        run.weights_choice = weights_line(log.read_text())
        sending = _send_specray(address, prompts, warmup, options, concurrency)
        run.records = asyncio.run(sending)
    finally:
        stop_process(process, grace_s=120)
    return run


def weights_line(server_log: str) -> str | None:
    """The message of the server's ``weights ...`` line (deploy/weights_choice.py), if any."""
    for line in server_log.splitlines():
        _, sep, message = line.partition(": weights ")
        if sep:
            return "weights " + message
    return None


def _wait_ready(process: subprocess.Popen[bytes], log: Path, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if line.startswith(READY):
                return next(w for w in line.split() if w.startswith("grpc=")).removeprefix("grpc=")
        if process.poll() is not None:
            raise RuntimeError(f"specray serve exited with {process.returncode}: see {log}")
        time.sleep(1.0)
    raise TimeoutError(f"specray serve not ready after {timeout_s:.0f} s; log: {log}")


async def _send_specray(
    address: str,
    prompts: Sequence[BenchPrompt],
    warmup: Sequence[BenchPrompt],
    options: RequestOptions,
    concurrency: int,
) -> list[RequestRecord]:
    one_token = dataclasses.replace(options, max_tokens=1, ignore_eos=True)
    records: list[RequestRecord] = []
    slots = asyncio.Semaphore(concurrency)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)

        async def send(request: BenchRequest, sent: RequestOptions, tag: str) -> RequestRecord:
            async with slots:
                return await send_one(stub, request, sent, tag)

        for index, prompt in enumerate(warmup):
            for speculative in (True, False):
                await send(BenchRequest(prompt, speculative, index), options, "warmup")
        for index, prompt in enumerate(prompts):
            await send(BenchRequest(prompt, False, index), one_token, "prime")
        for speculative in (True, False):
            arm = [BenchRequest(p, speculative, i) for i, p in enumerate(prompts)]
            records += await asyncio.gather(*(send(r, options, "peer") for r in arm))
    return records
