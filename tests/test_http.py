"""The one HTTP server (daemon.http) on 127.0.0.1: requests in, responses out, bad
requests, limits, TLS with a certificate made by the test, and a busy port."""

from __future__ import annotations

import ssl

import httpx
import orjson
import pytest
import trio
import trustme

from daemon.http import HttpServer, Request, Response
from daemon.listen import ListenError


async def echo(request: Request) -> Response:
    """What a publish endpoint would see: method, target, headers, body."""
    if request.path == "/fail":
        raise RuntimeError("a handler's bug")
    return Response(200, orjson.dumps({
        "method": request.method, "path": request.path, "query": request.query,
        "type": request.header("Content-Type"), "body": request.body.decode(),
    }), "application/json")


async def start(nursery: trio.Nursery, **options: object) -> tuple[HttpServer, int]:
    server = HttpServer(echo, "127.0.0.1", 0, name="test", setting="test.listen",
                        **options)  # type: ignore[arg-type]
    port = await nursery.start(server.serve)
    return server, port


async def raw(port: int, data: bytes) -> bytes:
    """Send ``data`` and read until the server closes (at most 5 s)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        received = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                received += chunk
    return received


async def test_requests_with_a_body_reach_the_handler_on_one_kept_alive_connection() -> None:
    async with trio.open_nursery() as nursery:
        server, port = await start(nursery)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            posted = await client.post("/publish?x=1", json={"price": "1.5"})
            got = await client.get("/again")
            head = await client.head("/again")
        assert posted.status_code == 200
        assert posted.json() == {"method": "POST", "path": "/publish", "query": {"x": ["1"]},
                                 "type": "application/json", "body": '{"price":"1.5"}'}
        assert got.json()["method"] == "GET" and got.json()["body"] == ""
        assert head.status_code == 200 and head.content == b""
        assert int(head.headers["content-length"]) > 0
        assert server.statistics().requests == 3
        nursery.cancel_scope.cancel()


async def test_a_malformed_request_gets_400_and_a_large_body_413() -> None:
    async with trio.open_nursery() as nursery:
        server, port = await start(nursery, max_body=10)
        bad = await raw(port, b"NOT HTTP AT ALL\r\n\r\n")
        assert bad.startswith(b"HTTP/1.1 400 ")
        large = await raw(port, b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n"
                          + b"x" * 11)
        assert large.startswith(b"HTTP/1.1 413 ")
        chunked = await raw(port, b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
                            b"\r\n\r\n6\r\nxxxxxx\r\n6\r\nxxxxxx\r\n0\r\n\r\n")
        assert chunked.startswith(b"HTTP/1.1 413 ")
        fits = await raw(port, b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n"
                         b"Connection: close\r\n\r\n" + b"y" * 10)
        assert fits.startswith(b"HTTP/1.1 200 ") and b'"body":"yyyyyyyyyy"' in fits
        assert server.statistics().errors == 1  # the malformed one
        nursery.cancel_scope.cancel()


async def test_a_handler_that_raises_gets_500_and_the_server_goes_on() -> None:
    async with trio.open_nursery() as nursery:
        server, port = await start(nursery)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            assert (await client.get("/fail")).status_code == 500
            assert (await client.get("/ok")).status_code == 200
        assert server.statistics().errors == 1
        nursery.cancel_scope.cancel()


async def test_a_silent_connection_is_closed_after_the_request_timeout() -> None:
    async with trio.open_nursery() as nursery:
        _, port = await start(nursery, request_timeout=0.2)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(5):
            assert await stream.receive_some(100) == b""
        await stream.aclose()
        nursery.cancel_scope.cancel()


def verify_failed(error: BaseException) -> bool:
    """Whether ``error`` was caused by a certificate that did not verify."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


async def test_https_with_a_verifying_client_and_a_client_of_another_ca() -> None:
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    stranger = ssl.create_default_context()
    trustme.CA().configure_trust(stranger)
    async with trio.open_nursery() as nursery:
        server, port = await start(nursery, ssl_context=context)
        assert server.scheme == "https"
        async with httpx.AsyncClient(verify=trusting) as client:
            response = await client.get(f"https://127.0.0.1:{port}/tls")
        assert response.status_code == 200 and response.json()["path"] == "/tls"
        async with httpx.AsyncClient(verify=stranger) as client:
            with pytest.raises(httpx.ConnectError) as refused:
                await client.get(f"https://127.0.0.1:{port}/tls")
        assert verify_failed(refused.value)
        async with httpx.AsyncClient() as client:  # plain HTTP to a TLS port
            with pytest.raises(httpx.HTTPError):
                await client.get(f"http://127.0.0.1:{port}/tls")
        nursery.cancel_scope.cancel()


async def test_a_busy_port_is_one_line_naming_the_setting() -> None:
    async with trio.open_nursery() as nursery:
        _, port = await start(nursery)
        second = HttpServer(echo, "127.0.0.1", port, name="metrics", setting="metrics.listen")
        with pytest.raises(ListenError) as error:
            await second.serve()
        message = str(error.value)
        assert "\n" not in message
        assert message.startswith(f"metrics: cannot listen on 127.0.0.1:{port}: the address "
                                  "is in use")
        assert "metrics.listen" in message
        unassignable = HttpServer(echo, "192.0.2.1", 0, name="metrics", setting="metrics.listen")
        with pytest.raises(ListenError, match="no interface of this machine has that address"):
            await unassignable.serve()
        nursery.cancel_scope.cancel()
