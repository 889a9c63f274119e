"""The broadcast server over real WebSockets on 127.0.0.1: client protocol errors,
frame limits, and the slow-consumer policy."""

from __future__ import annotations

from pathlib import Path

import attrs
import orjson
import pytest
import trio
import trio_websocket

from daemon.broadcast.server import BroadcastServer
from daemon.config import ServerConfig
from daemon.dispatch import Dispatcher
from daemon.events import BookSnapshot
from daemon.replay.capture import read_capture
from tests.helpers import messages, receive_until, request

HELLO = {"type": "welcome", "server": "tickwire", "version": "test", "epoch": "e1"}


@attrs.define
class Running:
    dispatcher: Dispatcher
    server: BroadcastServer
    url: str


async def start(nursery: trio.Nursery, **server: object) -> Running:
    dispatcher = Dispatcher(64, {"trades": 100, "system": 10})
    config = ServerConfig(listen="127.0.0.1:0", **server)
    broadcast = BroadcastServer(dispatcher, config, HELLO)
    await nursery.start(dispatcher.serve)
    port = await nursery.start(broadcast.serve)
    return Running(dispatcher, broadcast, f"ws://127.0.0.1:{port}")


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json", "invalid_json"),
        ("[1, 2]", "invalid_request"),
        ('{"op": "dance", "id": 7}', "unknown_op"),
        ('{"id": 7}', "invalid_request"),
        ('{"op": "subscribe", "id": 7, "channels": ["candles"], "symbols": ["*"]}', "unknown_channel"),
        ('{"op": "subscribe", "id": 7, "channels": ["trades"], "symbols": ["nknusdt"]}', "invalid_symbol"),
        ('{"op": "subscribe", "id": 7, "channels": ["trades"], "symbols": ["binance:nkn-usdt"]}', "invalid_symbol"),
        ('{"op": "subscribe", "id": 7, "channels": "trades", "symbols": ["*"]}', "invalid_request"),
        ('{"op": "subscribe", "id": 7, "channels": ["trades"], "symbols": ["*"], "history": "x"}', "invalid_request"),
        ('{"op": "subscribe", "id": 7, "channels": ["trades"], "symbols": [], "history": 1}', "invalid_request"),
        ('{"op": "ping", "id": {"a": 1}}', "invalid_request"),
        ('{"op": "ping", "id": 7, "extra": true}', "invalid_request"),
    ],
)
async def test_bad_client_input_gets_an_error_and_the_session_goes_on(frame: str, code: str) -> None:
    async with trio.open_nursery() as nursery:
        running = await start(nursery)
        async with trio_websocket.open_websocket_url(running.url) as ws:
            welcome = messages(await ws.get_message())[0]
            assert welcome == HELLO
            await ws.send_message(frame)
            [error] = await receive_until(ws, lambda m: True)
            assert error["type"] == "error" and error["code"] == code
            assert error["message"]
            if '"id": 7' in frame:
                assert error["id"] == 7
            await request(ws, {"op": "ping", "id": "after"})
            assert await receive_until(ws, lambda m: True) == [{"type": "pong", "id": "after"}]
        nursery.cancel_scope.cancel()


async def test_an_oversized_frame_closes_with_1009() -> None:
    async with trio.open_nursery() as nursery:
        running = await start(nursery, max_message_size=1024)
        async with trio_websocket.open_websocket_url(running.url) as ws:
            await ws.get_message()
            await ws.send_message('{"op":"ping","id":"' + "x" * 2000 + '"}')
            with trio.fail_after(5), pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await ws.get_message()
            assert closed.value.reason.code == 1009
        nursery.cancel_scope.cancel()


async def test_a_client_that_stops_reading_is_closed_as_a_slow_consumer(captures: Path) -> None:
    """Real NKN-USDT depth snapshots (1000 levels a side, ~70 KB each) published
    again and again: the client that does not read fills its socket, then its queue,
    and is closed with 1008; the one beside it receives every event, in order."""
    body = orjson.loads(read_capture(captures / "BINANCE.http.0.0").rest[0].body)
    snapshot = BookSnapshot(
        exchange="binance", symbol="NKN-USDT", ts=1.0, recv_ts=1.0,
        bids=tuple(map(tuple, body["bids"])), asks=tuple(map(tuple, body["asks"])),
    )
    count = 600  # ~40 MB: more than loopback socket buffers hold
    async with trio.open_nursery() as nursery:
        running = await start(nursery, client_queue=32)
        subscribe = {"op": "subscribe", "id": 1, "channels": ["book"], "symbols": ["binance:*"]}
        async with (
            trio_websocket.open_websocket_url(running.url, max_message_size=1 << 26) as fast,
            trio_websocket.open_websocket_url(running.url, max_message_size=1 << 26) as slow,
        ):
            for ws in (fast, slow):
                await ws.get_message()
                await request(ws, subscribe)
                await receive_until(ws, lambda m: m["type"] == "ack")

            # the exchange is slower than the fast client: one event, then the next
            # once the fast client has it
            progress_send, progress_receive = trio.open_memory_channel[int](count)

            async def publish() -> None:
                async with running.dispatcher.open_source() as source:
                    for _ in range(count):
                        await source.send(snapshot)
                        await progress_receive.receive()

            slow_result: dict[str, object] = {}

            async def read_slow_once_closed() -> None:
                # the slow client reads nothing until the policy has closed it,
                # then reads on: it gets what was queued for it, then 1008
                with trio.fail_after(30):
                    while running.server.slow_consumers == 0:
                        await trio.sleep(0.01)
                    received = 0
                    try:
                        while True:
                            received += len(messages(await slow.get_message()))
                    except trio_websocket.ConnectionClosed as exc:
                        slow_result.update(reason=exc.reason, received=received)

            nursery.start_soon(publish)
            nursery.start_soon(read_slow_once_closed)
            seqs = []
            with trio.fail_after(60):
                while len(seqs) < count:
                    for message in messages(await fast.get_message()):
                        assert message["type"] == "book_snapshot"
                        seqs.append(message["seq"])
                        progress_send.send_nowait(message["seq"])
            assert seqs == list(range(1, count + 1))
            assert running.server.slow_consumers == 1
            with trio.fail_after(30):
                while "reason" not in slow_result:
                    await trio.sleep(0.01)
            assert slow_result["reason"].code == 1008
            assert slow_result["reason"].reason == "slow consumer"
            assert 0 < slow_result["received"] < count
        nursery.cancel_scope.cancel()


async def test_server_shutdown_closes_clients_with_1001() -> None:
    codes = []
    async with trio.open_nursery() as outer:
        server_scope = trio.CancelScope()

        async def serve(*, task_status: trio.TaskStatus[Running]) -> None:
            with server_scope:
                async with trio.open_nursery() as nursery:
                    task_status.started(await start(nursery))

        running = await outer.start(serve)
        async with trio_websocket.open_websocket_url(running.url) as ws:
            await ws.get_message()
            server_scope.cancel()  # what SIGTERM does to the daemon's tree
            with trio.fail_after(5):
                try:
                    while True:
                        await ws.get_message()
                except trio_websocket.ConnectionClosed as exc:
                    codes.append((exc.reason.code, exc.reason.reason))
    assert codes == [(1001, "server shutting down")]
