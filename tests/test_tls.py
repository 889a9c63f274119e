"""TLS end to end: wss:// and https:// with certificates made by the test
(trustme), clients that verify them, a client of another CA that fails, and a
certificate reloaded for new connections."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import pytest
import trio
import trio_websocket
import trustme
from prometheus_client import CollectorRegistry

from daemon.config import AuthConfig, Config, ServerConfig, TlsConfig, TokenConfig
from daemon.metrics import MetricsServer
from daemon.tls import TlsError, exposure_warnings, reload, server_context
from tests.broadcast_server import HELLO, publish, start
from tests.helpers import messages, receive_until, request
from tests.test_channels import trade


def issue(ca: trustme.CA, folder: Path, name: str) -> TlsConfig:
    """A certificate for 127.0.0.1 signed by ``ca``, as PEM files in ``folder``."""
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(folder / f"{name}.pem")
    for blob in cert.cert_chain_pems[1:]:
        blob.write_to_path(folder / f"{name}.pem", append=True)
    cert.private_key_pem.write_to_path(folder / f"{name}.key")
    return TlsConfig(cert=str(folder / f"{name}.pem"), key=str(folder / f"{name}.key"))


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def verify_failed(error: BaseException) -> bool:
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


async def test_wss_with_a_verifying_client_a_stranger_and_a_reloaded_certificate(
    tmp_path: Path,
) -> None:
    ca, other_ca = trustme.CA(), trustme.CA()
    tls = issue(ca, tmp_path, "first")
    context = server_context(tls)
    assert context is not None
    async with trio.open_nursery() as nursery:
        running = await start(nursery, ssl_context=context)
        assert running.url.startswith("wss://")
        async with trio_websocket.open_websocket_url(
                running.url, ssl_context=trusting(ca)) as ws:
            assert messages(await ws.get_message())[0] == HELLO
            await request(ws, {"op": "subscribe", "id": 1, "channels": ["trades"],
                               "symbols": ["*"]})
            await receive_until(ws, lambda m: m["type"] == "ack")
            await publish(running, [trade(i) for i in range(300)])
            got = await receive_until(ws, lambda m: m.get("id") == "299")
            assert [m["seq"] for m in got if m["type"] == "trade"] == list(range(1, 301))

            # a client that trusts another CA cannot connect: its TLS handshake
            # fails on the certificate (trio-websocket reports it as a timeout)
            port = int(running.url.rpartition(":")[2])
            stranger = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port),
                                      trusting(other_ca), server_hostname="127.0.0.1")
            with trio.fail_after(5), pytest.raises(trio.BrokenResourceError) as refused:
                await stranger.do_handshake()
            assert verify_failed(refused.value)
            with pytest.raises(trio_websocket.HandshakeError):
                async with trio_websocket.open_websocket_url(
                        running.url, ssl_context=trusting(other_ca), connect_timeout=2):
                    pass

            # SIGHUP's reload: new connections get the new certificate, open ones stay
            reload(context, issue(other_ca, tmp_path, "second"))
            async with trio_websocket.open_websocket_url(
                    running.url, ssl_context=trusting(other_ca)) as renewed:
                assert messages(await renewed.get_message())[0] == HELLO
            await request(ws, {"op": "ping", "id": "still"})
            assert await receive_until(ws, lambda m: True) == [{"type": "pong", "id": "still"}]
        nursery.cancel_scope.cancel()


async def test_https_metrics_with_a_verifying_client(tmp_path: Path) -> None:
    ca = trustme.CA()
    context = server_context(issue(ca, tmp_path, "metrics"))
    metrics = MetricsServer(CollectorRegistry(), "127.0.0.1", 0, ssl_context=context)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(metrics.serve)
        async with httpx.AsyncClient(verify=trusting(ca)) as client:
            response = await client.get(f"https://127.0.0.1:{port}/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        async with httpx.AsyncClient(verify=trusting(trustme.CA())) as client:
            with pytest.raises(httpx.ConnectError) as refused:
                await client.get(f"https://127.0.0.1:{port}/metrics")
        assert verify_failed(refused.value)
        assert metrics.scrapes == 1
        nursery.cancel_scope.cancel()


def test_tls_is_on_by_default_with_a_certificate_and_a_warning_without(tmp_path: Path) -> None:
    tls = issue(trustme.CA(), tmp_path, "c")
    token = TokenConfig(name="t", sha256="0" * 64)
    public = ServerConfig(listen="0.0.0.0:8765")
    auth = AuthConfig(tokens=[token])  # auto: on for 0.0.0.0
    assert server_context(TlsConfig()) is None
    assert TlsConfig(cert=tls.cert, key=tls.key).on
    assert not TlsConfig(enabled="off", cert=tls.cert, key=tls.key).on
    with pytest.raises(ValueError, match="cert and key go together"):
        TlsConfig(cert=tls.cert)
    with pytest.raises(ValueError, match="needs cert and key"):
        TlsConfig(enabled="on")
    [warning] = exposure_warnings(Config(server=public, auth=auth))
    assert "tokens travel in the clear" in warning
    with_tls = Config(server=ServerConfig(listen="0.0.0.0:8765", tls=tls), auth=auth)
    assert exposure_warnings(with_tls) == []
    assert exposure_warnings(Config()) == []  # loopback, no auth
    with pytest.raises(TlsError, match="server.tls.cert"):
        server_context(TlsConfig(cert=str(tmp_path / "missing.pem"), key=tls.key))
    with pytest.raises(TlsError, match="not a PEM certificate chain"):
        server_context(TlsConfig(cert=tls.key, key=tls.cert))
