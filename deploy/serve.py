"""``specray serve``: the gRPC and OpenAI HTTP front doors over one backend:
the Ray router (default; an embedded Ray on loopback, or ``--address`` to
join a cluster) or the in-process engine (``backend: engine``).

Both servers start first and report NOT_SERVING / 503 while the model loads;
one line containing ``ready`` goes to stdout once requests are served.
SIGTERM or Ctrl-C drains: new requests get UNAVAILABLE, those in flight
finish (up to ``drain_timeout_s``; a second signal cuts the wait short).
Both servers bind 127.0.0.1 unless ``--host`` says otherwise, and take
optional TLS and a bearer token (docs/security.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from pydantic import ValidationError

from specray.actors.engine.factory import build_engine
from specray.actors.engine.target import Target
from specray.actors.model.weight_plan import WEIGHT_FORMATS
from specray.deploy.auth import TOKEN_ENV, is_private, load_token
from specray.deploy.backend import Backend, model_info
from specray.deploy.config import WEIGHTS_HELP, ServeConfig, is_loopback_host, load_config
from specray.deploy.engine_backend import EngineBackend
from specray.deploy.errors import BindError
from specray.deploy.gateway import Gateway
from specray.deploy.grpc_server import GrpcServer, host_port
from specray.deploy.openai_http import HttpServer, create_app
from specray.deploy.validation import Validator
from specray.deploy.weights_choice import planned_config, planned_engine

log = logging.getLogger(__name__)
T = TypeVar("T")
# Loads the model and returns its backend and validator (blocking; runs in a thread).
BuildBackend = Callable[[ServeConfig], tuple[Backend, Validator]]


def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="serve gRPC and OpenAI-compatible HTTP")
    p.add_argument("--config", type=Path, default=None, help="YAML or JSON settings file")
    p.add_argument("--host", default=None, help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="gRPC port (default 50051; 0: any)")
    p.add_argument("--http-port", type=int, default=None, help="HTTP port (default 8000; 0: any)")
    p.add_argument("--no-http", action="store_true", help="serve gRPC only")
    p.add_argument("--address", default=None, help="Ray cluster to join (router backend)")
    p.add_argument(
        "--backend", choices=("router", "engine"), default=None, help="default: the config's"
    )
    p.add_argument("--target", default=None, help="override the config's target model")
    p.add_argument("--draft", default=None, help="override the drafter: none|ngram|NAME|PATH")
    p.add_argument("--weights", choices=WEIGHT_FORMATS, default=None, help=WEIGHTS_HELP)
    p.add_argument(
        "--tp", type=int, default=None, help="router: shards per target (default: measured)"
    )
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="tokens a target replica feeds per round: longer prompts prefill in chunks "
        "beside the decoding requests (default 512; 0: whole prompts in one round)",
    )
    p.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate chain (TLS)")
    p.add_argument("--tls-key", type=Path, default=None, help="PEM private key (TLS)")
    p.add_argument(
        "--auth-token-file",
        type=Path,
        default=None,
        help=f"file holding the bearer token callers must send (or set ${TOKEN_ENV})",
    )
    return p


def run(args: argparse.Namespace) -> int:
    try:
        config = apply_overrides(load_config(args.config), args)
        load_token(config.auth_token_file, os.environ)  # refuse a bad token before starting
    except (OSError, ValueError, ValidationError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = planned_config(config)  # the probe, when weights or tp are left to it
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # With the router this process only tokenizes: the replicas own the cores.
    default_threads = (os.cpu_count() or 1) if config.backend == "engine" else 1
    torch.set_num_threads(config.threads or default_threads)
    if config.backend == "engine":
        return asyncio.run(serve(config))
    # Imported here: the engine backend needs neither Ray nor the router.
    from specray.deploy.router_backend import start_ray_for, stop_ray

    try:
        started = start_ray_for(config)  # here: on the main thread
    except (RuntimeError, ConnectionError, ValueError) as error:
        print(f"error: could not start or join Ray: {error}", file=sys.stderr)
        return 1
    try:
        return asyncio.run(serve(config))
    finally:
        if started:
            stop_ray()


def apply_overrides(config: ServeConfig, args: argparse.Namespace) -> ServeConfig:
    """The command-line flags over the file's settings; ``--target`` and
    ``--draft`` go to the section of the backend in use."""
    settings = config.model_dump()
    for key in (
        "host",
        "port",
        "http_port",
        "address",
        "backend",
        "tls_cert",
        "tls_key",
        "auth_token_file",
    ):
        value = getattr(args, key)
        if value is not None:
            settings[key] = value
    if args.no_http:
        settings["http_port"] = None
    # --weights replaces a legacy dtype key rather than contradict it.
    weights = {} if args.weights is None else {"weights": args.weights, "dtype": None}
    budget = args.max_num_batched_tokens
    chunking = {} if budget is None else {"max_num_batched_tokens": budget or None}
    if settings["backend"] == "router":
        router = config.router.model_copy(update=weights | chunking)
        if args.target is not None:
            router = router.model_copy(update={"target": args.target})
        if args.draft is not None:
            router = router.with_draft(args.draft)
        if args.tp is not None:
            router = router.model_copy(update={"tp": args.tp})
        settings["router"] = router.model_dump()
    else:
        settings.update(weights | chunking)
        for key in ("target", "draft"):
            if getattr(args, key) is not None:
                settings[key] = getattr(args, key)
    return ServeConfig.model_validate(settings)


class Service:
    """The gateway, both servers and the engine backend, started and stopped together."""

    def __init__(
        self,
        config: ServeConfig,
        build: BuildBackend | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """``environ`` (default: this process's) may hold ``$SPECRAY_AUTH_TOKEN``."""
        self.config = config
        self._build = build or select_backend
        self.gateway = Gateway()
        token = load_token(config.auth_token_file, os.environ if environ is None else environ)
        self.authenticated = token is not None
        max_bytes = config.limits.max_request_bytes
        self.grpc = GrpcServer(
            self.gateway,
            config.host,
            config.port,
            admin=config.admin_enabled,
            tls=config.tls,
            auth_token=token,
            max_request_bytes=max_bytes,
        )
        self.http = None
        if config.http_port is not None:
            app = create_app(self.gateway, auth_token=token, max_body_bytes=max_bytes)
            self.http = HttpServer(app, config.host, config.http_port, tls=config.tls)
        self.backend: Backend | None = None

    async def start(self) -> None:
        """Bind both servers; they answer NOT_SERVING / 503 until :meth:`load`."""
        await self.grpc.start()
        if self.http is not None:
            await self.http.start()

    async def load(self) -> None:
        # A daemon thread, not the default executor: a model still loading
        # must not hold up the process exiting on SIGTERM.
        backend, validator = await in_daemon_thread(lambda: self._build(self.config))
        self.backend = backend
        self.gateway.attach(backend, validator, self.config.queue_limits())
        await self.grpc.refresh_health()

    async def shutdown(self, force: asyncio.Event | None = None) -> None:
        """Drain (at most ``drain_timeout_s``, or until ``force`` is set), then stop."""
        drain = asyncio.create_task(self.grpc.drain(self.config.drain_timeout_s))
        waits: set[asyncio.Future[Any]] = {drain}
        if force is not None:
            waits.add(asyncio.create_task(force.wait()))
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in waits:
            task.cancel()
        if self.http is not None:
            await self.http.stop()
        await self.grpc.stop(grace_s=1.0)
        if self.backend is not None:
            await self.backend.close()

    def ready_line(self) -> str:
        parts = [f"grpc={self.grpc.address}"]
        if self.http is not None:
            parts.append(f"http={host_port(self.config.host, self.http.port)}")
        info = self.gateway.model_info()
        drafts = ",".join(info.drafts) or "none"
        return f"specray serve: ready {' '.join(parts)} target={info.target} draft={drafts}"


def select_backend(config: ServeConfig) -> tuple[Backend, Validator]:
    """The backend ``config.backend`` names, loaded (blocking)."""
    if config.backend == "engine":
        return build_backend(config)
    # Imported here: Ray and the router are not needed for the engine.
    from specray.deploy.router_backend import build_router_backend

    return build_router_backend(config)


def build_backend(config: ServeConfig, target: Target | None = None) -> tuple[Backend, Validator]:
    """Load the in-process engine (``target`` replaces the local target, as in
    build_engine), whatever ``config.backend`` says."""
    if config.weights == "auto":
        config = planned_engine(config)
    spec = config.engine_spec()
    loaded = build_engine(spec, target)
    info = model_info(
        spec.target,
        spec.draft,
        loaded.target_config,
        spec.max_len,
        spec.dtype,
        1,
        spec.num_speculative_tokens,
    )
    return EngineBackend(loaded.engine, info), Validator(
        config.validation_limits(info), loaded.tokenizer
    )


async def in_daemon_thread(work: Callable[[], T]) -> T:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def target() -> None:
        result: T | None = None
        failure: BaseException | None = None
        try:
            result = work()
        except BaseException as error:
            failure = error
        # The loop is gone if the server stopped while this was loading.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_settle, done, result, failure)

    threading.Thread(target=target, name="specray-load", daemon=True).start()
    return await done


def _settle(future: asyncio.Future[T], result: T | None, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type]


async def serve(config: ServeConfig) -> int:
    loop = asyncio.get_running_loop()
    stop, force = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        (force if stop.is_set() else stop).set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    service = Service(config)
    for secret in (config.auth_token_file, config.tls_key):
        if secret is not None and not is_private(secret):
            log.warning("%s is readable by other users; chmod 600 it", secret)
    if not is_loopback_host(config.host):
        missing = [
            what
            for what, on in (("TLS", config.tls is not None), ("a token", service.authenticated))
            if not on
        ]
        log.warning(
            "serving on %s: reachable from other machines%s",
            config.host,
            f", without {' or '.join(missing)}" if missing else "",
        )
    try:
        await service.start()
    except BindError as error:
        print(f"error: {error}", file=sys.stderr)
        await service.shutdown()
        return 2
    if config.backend == "router":
        router = config.router
        drafter = router.drafter.spec.name if router.drafter is not None else "none"
        model = (
            f"router: {router.target} ({router.weights}, tp {router.tp}, ep {router.ep}), "
            f"draft {drafter}"
        )
    else:
        model = f"engine: {config.target} ({config.weights}), draft {config.draft}"
    log.info("loading %s; health is NOT_SERVING until ready", model)
    load = asyncio.create_task(service.load())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({load, stopped}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if load.done() and load.exception() is not None:
        log.error("loading the model failed", exc_info=load.exception())
        code = 1
    elif load.done():
        print(service.ready_line(), flush=True)
        await stopped
    for task in (load, stopped):
        task.cancel()
    log.info("draining (a second signal stops at once)")
    await service.shutdown(force)
    log.info("stopped")
    return code
