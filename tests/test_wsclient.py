"""The collector's WebSocket client (``daemon.collectors.wsclient``) against real
servers on 127.0.0.1: trio-websocket's (plain and TLS with trustme certificates),
and a wsproto server that breaks RFC 6455 on purpose."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from functools import partial

import pytest
import trio
import trio_websocket
import trustme
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request

from daemon.collectors.wsclient import FeedSocket
from daemon.errors import FeedDisconnected

LIMIT = 1 << 20


async def ws_server(nursery: trio.Nursery, handler: Callable, ssl_context: ssl.SSLContext | None = None) -> int:
    server = await nursery.start(trio_websocket.serve_websocket, handler, "127.0.0.1", 0,
                                 ssl_context)
    return server.port


async def test_messages_both_ways_and_a_ping_is_answered() -> None:
    got: list[str] = []
    ponged = trio.Event()

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.send_message("one")
        await ws.send_message("two" * 100)
        got.append(await ws.get_message())
        await ws.ping(b"are you there")  # returns once the pong came back
        ponged.set()
        await ws.send_message("three")
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        port = await ws_server(nursery, handler)
        with trio.fail_after(10):
            async with await FeedSocket.connect(f"ws://127.0.0.1:{port}/path?q=1",
                                                max_message=LIMIT) as ws:
                received: list[str | bytes] = []
                while len(received) < 2:
                    received += await ws.receive()
                assert received == ["one", "two" * 100]
                await ws.send_text('{"type":"subscribe"}')
                while not ponged.is_set() or len(received) < 3:
                    received += await ws.receive()
                assert received[2] == "three"
        assert got == ['{"type":"subscribe"}']
        nursery.cancel_scope.cancel()


async def test_a_close_from_the_server_names_its_code_and_is_answered() -> None:
    closed: list[trio_websocket.CloseReason | None] = []

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.aclose(4001, "maintenance")
        closed.append(ws.closed)

    async with trio.open_nursery() as nursery:
        port = await ws_server(nursery, handler)
        with trio.fail_after(10):
            ws = await FeedSocket.connect(f"ws://127.0.0.1:{port}/", max_message=LIMIT)
            with pytest.raises(FeedDisconnected, match="closed \\(4001 maintenance\\)"):
                for _ in range(10):
                    await ws.receive()
            await ws.aclose()
            while not closed:
                await trio.sleep(0.01)
        assert closed[0] is not None and closed[0].code == 4001  # our close came back
        nursery.cancel_scope.cancel()


async def test_a_refused_upgrade_names_the_http_status() -> None:
    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        await request.reject(403, body=b"forbidden")

    async with trio.open_nursery() as nursery:
        port = await ws_server(nursery, handler)
        with trio.fail_after(10), pytest.raises(FeedDisconnected, match="HTTP 403"):
            await FeedSocket.connect(f"ws://127.0.0.1:{port}/", max_message=LIMIT)
        nursery.cancel_scope.cancel()


async def test_wss_verifies_the_server_certificate(tmp_path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_context)
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.send_message("over tls")
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        port = await ws_server(nursery, handler, server_context)
        with trio.fail_after(10):
            async with await FeedSocket.connect(f"wss://127.0.0.1:{port}/", max_message=LIMIT,
                                                ssl_context=trusting) as ws:
                assert await ws.receive() == ["over tls"]
            with pytest.raises(FeedDisconnected, match="CERTIFICATE_VERIFY_FAILED"):
                await FeedSocket.connect(f"wss://127.0.0.1:{port}/", max_message=LIMIT)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("secure", [False, True])
async def test_backlog_says_whether_more_of_the_server_data_is_already_here(
    secure: bool,
) -> None:
    """Three 300-byte messages sent at once, read 200 bytes at a time: while bytes
    wait in the socket (or in TLS's buffer), or a message is begun, ``backlog()``
    is true; once all three are read it is false."""
    server_context = client_context = None
    if secure:
        ca = trustme.CA()
        server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(server_context)
        client_context = ssl.create_default_context()
        ca.configure_trust(client_context)
    sent = trio.Event()

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        for n in range(3):
            await ws.send_message(str(n) * 300)
        sent.set()
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        port = await ws_server(nursery, handler, server_context)
        scheme = "wss" if secure else "ws"
        with trio.fail_after(10):
            async with await FeedSocket.connect(f"{scheme}://127.0.0.1:{port}/", max_message=LIMIT,
                                                ssl_context=client_context, read_size=200) as ws:
                await sent.wait()
                await trio.sleep(0.05)  # loopback: the bytes are here
                received: list[str | bytes] = []
                backlog = []
                for _ in range(20):
                    received += await ws.receive()
                    backlog.append(ws.backlog())
                    if len(received) == 3:
                        break
                assert received == [str(n) * 300 for n in range(3)]
                assert backlog[:-1] == [True] * (len(backlog) - 1) and len(backlog) >= 4
                assert backlog[-1] is False
        nursery.cancel_scope.cancel()


async def test_a_server_that_breaks_the_protocol_is_failed_with_1002() -> None:
    """A masked frame from a server (RFC 6455 §5.1): the client closes with 1002."""
    seen: list[object] = []

    async def serve(stream: trio.SocketStream) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        while not seen:
            ws.receive_data(await stream.receive_some(4096))
            for event in ws.events():
                if isinstance(event, Request):
                    await stream.send_all(ws.send(AcceptConnection()))
                    seen.append(event.target)
        await stream.send_all(b"\x81\x82abcd" + bytes([ord("h") ^ 97, ord("i") ^ 98]))
        with trio.move_on_after(5):
            while len(seen) < 2:
                data = await stream.receive_some(4096)
                if not data:
                    break
                ws.receive_data(data)
                seen.extend(e for e in ws.events() if isinstance(e, CloseConnection))

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(10):
            ws = await FeedSocket.connect(f"ws://127.0.0.1:{port}/x", max_message=LIMIT)
            with pytest.raises(FeedDisconnected, match="masked frame"):
                await ws.receive()
            while len(seen) < 2:
                await trio.sleep(0.01)
        assert seen[0] == "/x"
        assert isinstance(seen[1], CloseConnection) and seen[1].code == 1002
        nursery.cancel_scope.cancel()


async def test_a_server_that_never_answers_times_out() -> None:
    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(10), pytest.raises(FeedDisconnected, match="no connection within"):
            await FeedSocket.connect(f"ws://127.0.0.1:{port}/", max_message=LIMIT,
                                     connect_timeout=0.3)
        with trio.fail_after(10), pytest.raises(FeedDisconnected, match="cannot connect"):
            await FeedSocket.connect("ws://127.0.0.1:1/", max_message=LIMIT)
        nursery.cancel_scope.cancel()
