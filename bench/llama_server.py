"""llama.cpp's ``llama-server`` as a peer under the same client as specray.

Optional, like :mod:`specray.bench.llama_cpp`: nothing runs unless a
``llama-server`` binary is given, and no test needs one. The server is
started on 127.0.0.1 with one slot and its speculative flags fixed at start
(this llama.cpp build ignores per-request speculative settings), so every
drafter is a server of its own. Requests go to its native ``/completion``
endpoint as token ids (the prompt specray is sent, chat template applied by
the same tokenizer), streamed over server-sent events and timed into the
:class:`RequestRecord` that :mod:`specray.bench.serve_metrics` reads, so
TTFT, TPOT and tokens/s mean the same thing for both servers.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from specray.actors.parallel.distributed import find_free_port
from specray.bench.common import stop_process
from specray.bench.serve_metrics import RequestRecord


@dataclass(frozen=True)
class LlamaServer:
    """A started ``llama-server``: where it listens and where it logs."""

    port: int
    log_path: Path
    command: tuple[str, ...]


@contextmanager
def llama_server(
    binary: Path,
    model: Path,
    flags: Sequence[str],
    threads: int,
    log_path: Path,
    slots: int = 1,
    context_per_slot: int = 4096,
    start_timeout_s: float = 300.0,
) -> Iterator[LlamaServer]:
    """Run ``llama-server`` on a free loopback port until the block exits,
    with ``slots`` sequences decoded together (its continuous batching)."""
    port = find_free_port()
    command = (
        str(binary),
        "-m",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-t",
        str(threads),
        "-tb",
        str(threads),
        "-c",
        str(context_per_slot * slots),
        "-np",
        str(slots),
        *flags,
    )
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(port, process, log_path, start_timeout_s)
        yield LlamaServer(port, log_path, command)
    finally:
        stop_process(process, grace_s=30)


def _wait_healthy(port: int, process: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"llama-server exited with {process.returncode}:\n{log.read_text()[-3000:]}"
            )
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"llama-server not healthy after {timeout_s:.0f} s; log: {log}")


def stream_completion(
    server: LlamaServer,
    record: RequestRecord,
    prompt_ids: Sequence[int],
    max_tokens: int,
    timeout_s: float,
) -> RequestRecord:
    """Greedy completion of ``prompt_ids``, timed into ``record`` (whose
    ``send_s`` is set here, just before the request goes out)."""
    body = {
        "prompt": list(prompt_ids),
        "n_predict": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "return_tokens": True,
        "cache_prompt": True,
    }
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout_s)
    record.send_s = time.perf_counter()
    try:
        connection.request(
            "POST", "/completion", json.dumps(body), {"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        if response.status != 200:
            record.error, record.error_details = f"HTTP_{response.status}", response.read().decode()
            return record
        for line in response:
            if not line.startswith(b"data: "):
                continue
            event = json.loads(line[len(b"data: ") :])
            tokens = event.get("tokens") or []
            record.chunk_s.append(time.perf_counter())
            record.chunk_tokens.append(len(tokens))
            record.token_ids += tokens
            if event.get("stop"):
                timings = event.get("timings", {})
                record.prompt_tokens = int(event.get("tokens_evaluated", 0))
                record.cached_tokens = int(timings.get("cache_n", 0))
                record.draft_tokens = int(timings.get("draft_n", 0))
                record.accepted_tokens = int(timings.get("draft_n_accepted", 0))
                record.finish_reason = "length" if event.get("stop_type") == "limit" else "stop"
                # Target forwards after the prefill, as specray counts rounds
                # (one that drafted nothing included): each commits its
                # accepted drafts plus one token of its own.
                output = record.output_tokens
                record.rounds = max(output - 1 - record.accepted_tokens, 0)
                break
    except OSError as error:
        record.error, record.error_details = type(error).__name__, str(error)
    finally:
        connection.close()
    return record


def server_version(binary: Path) -> str:
    """``llama-server --version``'s version line, with the compiler line."""
    done = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, check=False, timeout=60
    )
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    return "; ".join(lines[-2:]) if done.returncode == 0 else "?"
