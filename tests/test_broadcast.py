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
from daemon.dispatch import Dispatcher, Retention
from daemon.errors import StartupError
from daemon.events import BookSnapshot
from daemon.listen import ListenError
from daemon.replay.capture import read_capture
from tests.helpers import apply_levels, as_plain, messages, receive_until, request

HELLO = {"type": "welcome", "server": "tickwire", "version": "test", "epoch": "e1"}


@attrs.define
class Running:
    dispatcher: Dispatcher
    server: BroadcastServer
    url: str


async def start(nursery: trio.Nursery, **server: object) -> Running:
    dispatcher = Dispatcher(64, {"trades": Retention(100, 60.0), "system": Retention(10, 60.0)})
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


def nkn_book_events(captures: Path) -> list:
    """The real NKN-USDT book: the REST snapshot (1000 levels a side), then every
    recorded depth update after it, as events."""
    from daemon.events import BookUpdate
    from daemon.replay.capture import read_capture as read

    body = orjson.loads(read(captures / "BINANCE.http.0.0").rest[0].body)
    events = [BookSnapshot(
        exchange="binance", symbol="NKN-USDT", ts=1.0, recv_ts=1.0,
        bids=tuple(map(tuple, body["bids"])), asks=tuple(map(tuple, body["asks"])),
    )]
    for frame in read(captures / "BINANCE.ws.1.0").connections[0].received:
        data = orjson.loads(frame.text)["data"]
        if "nknusdt@depth" in frame.text and data["u"] > body["lastUpdateId"]:
            events.append(BookUpdate(
                exchange="binance", symbol="NKN-USDT", ts=data["E"] / 1000, recv_ts=1.0,
                bids=tuple(map(tuple, data["b"])), asks=tuple(map(tuple, data["a"]))))
    return events


async def slow_and_fast(
    running: Running, channels: list[str], events: list, settle, chunk: int = 1,
    read_slow_when=None,
) -> tuple:
    """A fast client reads everything as it comes; a slow one reads nothing until
    ``read_slow_when()`` holds (by default: every event is published and the fast
    one has it all), then reads what it has until ``settle(got)`` or its close.
    The exchange is slower than the fast client: ``chunk`` events, then the next
    ones once the fast client has them."""
    subscribe = {"op": "subscribe", "id": 1, "channels": channels, "symbols": ["binance:*"]}
    published = trio.Event()
    read_slow_when = read_slow_when or published.is_set
    slow_got: list[dict] = []
    closed = []
    async with (
        trio_websocket.open_websocket_url(running.url, max_message_size=1 << 26) as fast,
        trio_websocket.open_websocket_url(running.url, max_message_size=1 << 26) as slow,
    ):
        for ws in (fast, slow):
            await ws.get_message()
            await request(ws, subscribe)
            await receive_until(ws, lambda m: m["type"] == "ack")

        async def read_slow() -> None:
            with trio.fail_after(60):
                while not read_slow_when():
                    await trio.sleep(0.01)
                try:
                    while not settle(slow_got):
                        slow_got.extend(messages(await slow.get_message()))
                except trio_websocket.ConnectionClosed as exc:
                    closed.append(exc.reason)

        fast_got: list[dict] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_slow)
            async with running.dispatcher.open_source() as source:
                for start_at in range(0, len(events), chunk):
                    part = events[start_at:start_at + chunk]
                    for event in part:
                        await source.send(event)
                    with trio.fail_after(10):
                        while len(fast_got) < start_at + len(part):
                            fast_got.extend(messages(await fast.get_message()))
            published.set()
    return fast_got, slow_got, closed[0] if closed else None


async def test_a_slow_book_client_gets_a_conflated_snapshot_equal_to_the_true_book(
    captures: Path,
) -> None:
    events = nkn_book_events(captures)
    big = events[0]
    # the 70 KB snapshot again and again fills the slow client's socket, then its queue
    stream = [big] * 300 + events[1:]
    async with trio.open_nursery() as nursery:
        running = await start(nursery, client_queue=32)
        final_seq = len(stream)

        def settled(got: list[dict]) -> bool:
            return bool(got) and got[-1]["seq"] == final_seq

        fast, slow, closed = await slow_and_fast(running, ["book"], stream, settled)
        assert [m["seq"] for m in fast] == list(range(1, final_seq + 1))
        assert not any(m.get("conflated") for m in fast)
        assert closed is None
        conflated = [m for m in slow if m.get("conflated")]
        assert conflated and conflated[-1]["type"] == "book_snapshot"
        true_book = running.dispatcher.streams["book:binance:NKN-USDT"].book.levels()
        last_snapshot = [m for m in slow if m["type"] == "book_snapshot"][-1]
        after = slow[slow.index(last_snapshot) + 1:]
        bids, asks = as_plain(last_snapshot["bids"]), as_plain(last_snapshot["asks"])
        for update in after:  # updates after it apply to it in order
            assert update["type"] == "book_update"
            apply_levels(bids, update["bids"])
            apply_levels(asks, update["asks"])
        assert (bids, asks) == (as_plain(true_book[0]), as_plain(true_book[1]))
        seqs = [m["seq"] for m in slow if m["type"] != "ack"]
        assert seqs == sorted(seqs) and len(seqs) < final_seq
        assert running.server.conflations >= 1 and running.server.slow_consumers == 0
        nursery.cancel_scope.cancel()


async def test_a_slow_trades_client_is_closed_with_4008_and_the_fast_one_gets_all(
    captures: Path,
) -> None:
    from daemon.events import Trade

    frames = read_capture(captures / "BINANCE.ws.1.0").connections[0].received
    data = next(orjson.loads(f.text)["data"] for f in frames if "@aggTrade" in f.text)
    # the recorded trade, repeated with the ids that follow it: more trades than
    # loopback socket buffers hold
    trades = [
        Trade(exchange="binance", symbol="NKN-USDT", ts=data["T"] / 1000, recv_ts=1.0,
              id=str(data["a"] + i), price=data["p"], size=data["q"], side="buy")
        for i in range(80_000)
    ]
    async with trio.open_nursery() as nursery:
        running = await start(nursery, client_queue=256)
        # the slow client reads from when it is closed: it gets what was queued for
        # it, then the close frame (a client that never reads again would see the
        # TCP connection dropped instead: a close frame cannot cut a frame)
        fast, slow, closed = await slow_and_fast(
            running, ["trades"], trades, lambda got: False, chunk=100,
            read_slow_when=lambda: running.server.slow_consumers > 0)
        assert [m["seq"] for m in fast] == list(range(1, len(trades) + 1))
        assert closed is not None and (closed.code, closed.reason) == (4008, "slow consumer")
        received = [m for m in slow if m["type"] == "trade"]
        assert [m["seq"] for m in received] == list(range(1, len(received) + 1))  # no hole
        assert 0 < len(received) < len(trades)
        assert running.server.slow_consumers == 1
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


async def test_a_busy_listen_address_is_one_line_naming_the_setting() -> None:
    async with trio.open_nursery() as nursery:
        running = await start(nursery)
        port = running.url.rpartition(":")[2]
        dispatcher = Dispatcher(64, {})
        busy = BroadcastServer(dispatcher, ServerConfig(listen=f"127.0.0.1:{port}"), HELLO)
        with pytest.raises(ListenError) as error:
            await busy.serve()
        assert str(error.value) == (
            f"broadcast server: cannot listen on 127.0.0.1:{port}: the address is in use "
            "(another process listens on it); stop it or change server.listen")
        assert isinstance(error.value, StartupError)
        nursery.cancel_scope.cancel()
