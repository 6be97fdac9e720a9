"""Security, for real: both front doors bind loopback by default; TLS (a
self-signed certificate made here with ``cryptography``) and the bearer
token on gRPC and HTTP with real handshakes on 127.0.0.1; weights never
unpickled; and the embedded Ray keeps its own token authentication on."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import ray
import requests
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from serving_helpers import ServingThread, save_served_model, serve_config

from specray.actors.store.errors import UnsafeWeightsError
from specray.cluster.local_ray import start_ray
from specray.deploy.auth import TOKEN_ENV, load_token
from specray.deploy.cli import main
from specray.deploy.client import SpecrayClient, SpecrayError
from specray.deploy.config import ServeConfig
from specray.deploy.serve import build_backend
from specray.protos.messages import build_request
from specray.protos.specray.v1 import admin_pb2, admin_pb2_grpc
from specray.protos.specray.v1 import generation_pb2 as pb
from specray.protos.specray.v1 import generation_pb2_grpc as pb_grpc

TOKEN = "s3cret-token-for-tests"
PROMPT = [5, 9, 5, 9, 5]
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Pki:
    cert: Path  # the server's self-signed certificate, also the clients' CA
    key: Path
    other_ca: Path  # a certificate that did not sign the server's


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    cert, key = self_signed(directory, "server")
    other, _ = self_signed(directory, "other")
    return Pki(cert, key, other)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[ServingThread]:
    """TLS and a token on both doors; the host is left at its default."""
    model_dir = save_served_model(tmp_path_factory.mktemp("served"))
    token_file = tmp_path_factory.mktemp("secrets") / "token"
    token_file.write_text(f"{TOKEN}\n")
    token_file.chmod(0o600)
    settings = {"tls_cert": pki.cert, "tls_key": pki.key, "auth_token_file": token_file}
    with ServingThread(serve_config(model_dir, http_port=0, **settings)) as serving:
        yield serving


def tls_channel(server: ServingThread, ca: Path) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    return grpc.secure_channel(server.grpc_address, credentials)


def https_url(server: ServingThread) -> str:
    return server.http_url.replace("http://", "https://")


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


# -- loopback by default -----------------------------------------------------------


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the TCP sockets listening on ``port`` (Linux);
    IPv4-mapped IPv6 ones (gRPC's) as IPv4."""
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.rsplit(":", 1)
            if state != "0A" or int(port_hex, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            # /proc prints each 32-bit word in host (little-endian) order.
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            address = ipaddress.ip_address(socket.inet_ntop(family, words))
            mapped = getattr(address, "ipv4_mapped", None)
            found.add(str(mapped or address))
    return found


def test_default_config_binds_loopback_only(server: ServingThread) -> None:
    if not Path("/proc/net/tcp").exists():
        pytest.skip("reads the kernel's socket table (/proc/net/tcp)")
    assert ServeConfig.model_validate({}).host == "127.0.0.1"
    assert server.service.config.host == "127.0.0.1"
    http = server.service.http
    assert http is not None
    assert listening_addresses(server.service.grpc.port) == {"127.0.0.1"}
    assert listening_addresses(http.port) == {"127.0.0.1"}


# -- TLS and the bearer token: gRPC --------------------------------------------------


def test_grpc_over_tls_needs_the_token(server: ServingThread, pki: Pki) -> None:
    with tls_channel(server, pki.cert) as channel:
        stub = pb_grpc.GenerationStub(channel)
        request = build_request(PROMPT, max_tokens=4, temperature=0)
        reply = stub.Generate(request, timeout=60, metadata=bearer(TOKEN))
        assert len(reply.token_ids) > 0

        refusals = {
            "this server needs a bearer token": (),
            "the bearer token is wrong": bearer("not-the-token"),
            "must be `Bearer <token>`": (("authorization", f"Basic {TOKEN}"),),
        }
        for message, metadata in refusals.items():
            with pytest.raises(grpc.RpcError) as caught:
                stub.Generate(request, timeout=60, metadata=metadata)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert message in (caught.value.details() or "")

        # Every method is closed, streaming, reflection and Admin included ...
        with pytest.raises(grpc.RpcError) as stream:
            list(stub.GenerateStream(request, timeout=60))
        with pytest.raises(grpc.RpcError) as info:
            stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=60)
        with pytest.raises(grpc.RpcError) as admin:
            admin_pb2_grpc.AdminStub(channel).GetState(admin_pb2.GetStateRequest(), timeout=60)
        with pytest.raises(grpc.RpcError) as reflection:
            ProtoReflectionDescriptorDatabase(channel).get_services()
        for refused in (stream, info, admin, reflection):
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # ... but health checks, which load balancers make without secrets.
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=60).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def test_grpc_refuses_plaintext_and_unknown_certificates(server: ServingThread, pki: Pki) -> None:
    request = build_request(PROMPT, max_tokens=4)
    with grpc.insecure_channel(server.grpc_address) as plaintext:
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.GenerationStub(plaintext).Generate(request, timeout=10, metadata=bearer(TOKEN))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    with tls_channel(server, pki.other_ca) as untrusted:
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.GenerationStub(untrusted).Generate(request, timeout=10, metadata=bearer(TOKEN))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_specray_client_takes_the_ca_and_the_token(server: ServingThread, pki: Pki) -> None:
    with SpecrayClient(server.grpc_address, 60, tls_ca=pki.cert, token=TOKEN) as client:
        assert client.model_info().vocab_size > 0
        reply = client.generate(PROMPT, max_tokens=4, ignore_eos=True)
        assert reply.finish_reason == "length"
    with SpecrayClient(server.grpc_address, 60, tls_ca=pki.cert) as client:
        with pytest.raises(SpecrayError) as caught:
            client.generate(PROMPT, max_tokens=4)
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_client_cli_reads_the_token_from_the_environment(
    server: ServingThread,
    pki: Pki,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    command = ["client", "generate", "--server", server.grpc_address, "--tls-ca", str(pki.cert)]
    command += ["--token-ids", "5,9,5", "--max-tokens", "4", "--ignore-eos", "--json"]
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert main(command) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    assert main(command) == 0
    assert '"finish_reason": "length"' in capsys.readouterr().out
    assert main([*command, "--token", "wrong"]) == 1  # the flag wins over the variable


def test_scale_cli_takes_the_ca_and_the_token(
    server: ServingThread,
    pki: Pki,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    command = ["scale", "--server", server.grpc_address, "--tls-ca", str(pki.cert), "--json"]
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert main(command) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert main([*command, "--token", TOKEN]) == 0
    assert '"backend": "engine"' in capsys.readouterr().out


# -- TLS and the bearer token: HTTP ----------------------------------------------------


def test_https_needs_the_token(server: ServingThread, pki: Pki) -> None:
    url = https_url(server)
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    good = {"Authorization": f"Bearer {TOKEN}"}
    reply = requests.post(f"{url}/v1/completions", json=body, headers=good, verify=pki.cert)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        reply = requests.post(f"{url}/v1/completions", json=body, headers=headers, verify=pki.cert)
        assert reply.status_code == 401, headers
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")
        error = reply.json()["error"]
        assert (error["type"], error["code"]) == ("authentication_error", 401)
    for path in ("/v1/models", "/metrics", "/v1/chat/completions", "/no/such/path"):
        assert requests.get(f"{url}{path}", verify=pki.cert).status_code == 401, path
    assert requests.get(f"{url}/health", verify=pki.cert).json() == {"status": "serving"}


def test_http_refuses_plaintext_and_unknown_certificates(server: ServingThread, pki: Pki) -> None:
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"{server.http_url}/health", timeout=10)  # plain HTTP to a TLS port
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{https_url(server)}/health", verify=pki.other_ca, timeout=10)


# -- configuration -----------------------------------------------------------------------


def test_token_sources(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-the-file\n")
    token_file.chmod(0o600)
    assert load_token(None, {}) is None  # no token: no authentication
    assert load_token(None, {TOKEN_ENV: " from-env "}) == "from-env"
    assert load_token(token_file, {TOKEN_ENV: "from-env"}) == "from-the-file"
    token_file.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        load_token(token_file, {})
    with pytest.raises(ValueError, match="empty"):
        load_token(None, {TOKEN_ENV: ""})
    with pytest.raises(ValueError, match="printable ASCII without spaces"):
        load_token(None, {TOKEN_ENV: "two words"})


def test_serve_refuses_half_a_tls_config_and_a_bad_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--tls-cert", str(tmp_path / "cert.pem")]) == 2
    assert "TLS needs both `tls_cert` and `tls_key`" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.write_text("")
    assert main(["serve", "--auth-token-file", str(empty)]) == 2
    assert "is empty" in capsys.readouterr().err


# -- weights -----------------------------------------------------------------------------


@pytest.mark.parametrize("filename", ["pytorch_model.bin", "model.pt", "weights.ckpt"])
def test_serving_refuses_pickled_weights(  # type: ignore[no-untyped-def]
    tmp_path: Path, tiny_dir_factory, filename: str
) -> None:
    """A checkpoint whose weights are only pickles is refused before anything
    is unpickled: torch.load runs arbitrary code."""
    source = tiny_dir_factory("llama")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((source / "config.json").read_text())
    torch.save({"w": torch.zeros(2)}, pickled / filename)
    config = serve_config(pickled)
    with pytest.raises(UnsafeWeightsError, match="never pickle") as caught:
        build_backend(config)
    assert filename in str(caught.value)


def test_the_package_never_unpickles() -> None:
    """No loader in specray calls an unpickler (Ray's own object transport aside)."""
    unpickling = re.compile(r"torch\.load\(|pickle\.loads?\(|allow_pickle\s*=\s*True|joblib\.load")
    offenders = []
    for path in REPO.rglob("*.py"):
        parts = path.relative_to(REPO).parts
        if parts[0] in (".venv", "tests", "build") or "site-packages" in parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if unpickling.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders


# -- Ray ---------------------------------------------------------------------------------


def ray_token() -> str:
    """The token this machine's Ray uses, where Ray looks for it."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"]
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token"
    return Path(path).read_text().strip()


def test_embedded_ray_keeps_token_auth_on() -> None:
    """``specray serve``'s embedded Ray (start_ray on loopback) runs with Ray
    2.60's token authentication, which a fresh local cluster turns on by
    default; nothing in specray turns it off. Its GCS refuses a call
    without the token."""
    from ray._raylet import AuthenticationMode, get_authentication_mode

    started = start_ray(num_cpus=1).started_here
    try:
        assert get_authentication_mode() == AuthenticationMode.TOKEN
        gcs = ray.get_runtime_context().gcs_address
        assert gcs.startswith("127.0.0.1:")
        with grpc.insecure_channel(gcs) as channel:
            call = channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetAllNodeInfo")
            with pytest.raises(grpc.RpcError) as caught:
                call(b"", timeout=30)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert len(call(b"", timeout=30, metadata=bearer(ray_token()))) > 0
    finally:
        if started:
            ray.shutdown()
