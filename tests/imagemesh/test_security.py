"""Bearer-token authentication, TLS and mutual TLS on the shared server bootstrap."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from imagemesh.channels import open_channel
from imagemesh.config import ConfigError, Settings, load_settings
from imagemesh.mesh import build_mesh


def _list_services(channel: grpc.aio.Channel) -> grpc.aio.StreamStreamCall:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    return stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )


async def _services(channel: grpc.aio.Channel) -> set[str]:
    return {s.name async for r in _list_services(channel) for s in r.list_services_response.service}


async def test_a_token_protects_every_rpc_but_health(embedded_settings: Settings) -> None:
    embedded_settings.auth_token = "s3cret"
    server, port = build_mesh(embedded_settings, ["search"], port=0)
    await server.start()
    address = f"127.0.0.1:{port}"
    try:
        async with grpc.aio.insecure_channel(address) as bare:
            reply = await health_pb2_grpc.HealthStub(bare).Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _services(bare)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "Bearer" in (info.value.details() or "")
        wrong = embedded_settings.model_copy(update={"auth_token": "guess"})
        async with open_channel(address, wrong) as chan:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _services(chan)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        async with open_channel(address, embedded_settings) as chan:
            assert "imagemesh.search.v1.SearchService" in await _services(chan)
    finally:
        await server.stop(grace=0)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    d = tmp_path_factory.mktemp("pki")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=imagemesh test CA",
    )
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for who in ("server", "client"):
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{who}.key",
            "-out",
            f"{who}.csr",
            "-subj",
            f"/CN={who}",
        )
        run(
            "x509",
            "-req",
            "-in",
            f"{who}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{who}.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        )
    return d


def _tls_settings(base: Settings, pki: Path, *, mutual: bool) -> Settings:
    server = base.server.model_copy(
        update={
            "tls_cert_file": pki / "server.pem",
            "tls_key_file": pki / "server.key",
            "tls_client_ca_file": pki / "ca.pem" if mutual else None,
        }
    )
    return base.model_copy(update={"server": server})


def _client_settings(base: Settings, pki: Path, *, with_cert: bool) -> Settings:
    server = base.server.model_copy(
        update={
            "tls_ca_file": pki / "ca.pem",
            "tls_cert_file": pki / "client.pem" if with_cert else None,
            "tls_key_file": pki / "client.key" if with_cert else None,
        }
    )
    return base.model_copy(update={"server": server})


async def test_tls_port_serves_tls_clients_only(embedded_settings: Settings, pki: Path) -> None:
    server, port = build_mesh(
        _tls_settings(embedded_settings, pki, mutual=False), ["search"], port=0
    )
    await server.start()
    address = f"127.0.0.1:{port}"
    try:
        async with open_channel(
            address, _client_settings(embedded_settings, pki, with_cert=False)
        ) as chan:
            assert "imagemesh.search.v1.SearchService" in await _services(chan)
        async with grpc.aio.insecure_channel(address) as plain:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await health_pb2_grpc.HealthStub(plain).Check(
                    health_pb2.HealthCheckRequest(), timeout=2
                )
            assert info.value.code() in {
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            }
    finally:
        await server.stop(grace=0)


async def test_mutual_tls_refuses_clients_without_a_certificate(
    embedded_settings: Settings, pki: Path
) -> None:
    server, port = build_mesh(
        _tls_settings(embedded_settings, pki, mutual=True), ["search"], port=0
    )
    await server.start()
    address = f"127.0.0.1:{port}"
    try:
        async with open_channel(
            address, _client_settings(embedded_settings, pki, with_cert=True)
        ) as chan:
            assert "imagemesh.search.v1.SearchService" in await _services(chan)
        async with open_channel(
            address, _client_settings(embedded_settings, pki, with_cert=False)
        ) as chan:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await health_pb2_grpc.HealthStub(chan).Check(
                    health_pb2.HealthCheckRequest(), timeout=2
                )
            assert info.value.code() in {
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            }
    finally:
        await server.stop(grace=0)


def test_tls_settings_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must be set together"):
        load_settings(server={"tls_cert_file": __file__})
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(server={"tls_ca_file": tmp_path / "nope.pem"})


async def test_blocking_channels_carry_the_token_too(embedded_settings: Settings) -> None:
    import asyncio

    from imagemesh.channels import open_sync_channel

    embedded_settings.auth_token = "s3cret"
    server, port = build_mesh(embedded_settings, ["search"], port=0)
    await server.start()

    def list_services(settings: Settings) -> set[str]:
        with open_sync_channel(f"127.0.0.1:{port}", settings) as chan:
            stub = reflection_pb2_grpc.ServerReflectionStub(chan)
            replies = stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
            return {s.name for r in replies for s in r.list_services_response.service}

    try:
        names = await asyncio.to_thread(list_services, embedded_settings)
        assert "imagemesh.search.v1.SearchService" in names
        wrong = embedded_settings.model_copy(update={"auth_token": "nope"})
        with pytest.raises(grpc.RpcError) as info:
            await asyncio.to_thread(list_services, wrong)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    finally:
        await server.stop(grace=0)
