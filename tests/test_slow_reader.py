"""The slow-consumer contract: a client that stops reading (its socket open,
nothing read) is closed with 4008 on a lossless stream and conflated on a state
stream within ``server.stall_timeout`` of its connection taking nothing more,
not after a ping timeout, while a client reading the same streams gets
everything. Real sockets, the Coinbase capture's trades and tickers; the stalled
client's receive buffer is small (as a busy client's fills) so that its
connection stops taking data soon."""

from __future__ import annotations

from pathlib import Path

import orjson
import trio
import trio_websocket
from wsproto.events import CloseConnection, TextMessage

from daemon.events import Ticker, Trade
from tests.broadcast_server import Running, coinbase_events, start
from tests.helpers import messages, request
from tests.test_fanout import RawClient

STALL = 1.0


async def stalled_client(running: Running, channels: list[str]) -> RawClient:
    """A client that subscribes to ``channels`` and then reads nothing."""
    port = int(running.url.rsplit(":", 1)[1])
    sock = trio.socket.socket()
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port))
    client = RawClient(trio.SocketStream(sock))
    await client.handshake(port)
    body = {"op": "subscribe", "id": 1, "channels": channels, "symbols": ["*"]}
    await client.stream.send_all(client.ws.send(TextMessage(orjson.dumps(body).decode())))
    return client


async def reader(url: str, channels: list[str], count: int, got: list[dict]) -> None:
    """A client that reads every message of ``channels`` until it has ``count``."""
    async with trio_websocket.open_websocket_url(url) as ws:
        await ws.get_message()
        await request(ws, {"op": "subscribe", "id": 1, "channels": channels, "symbols": ["*"]})
        while len(got) < count:
            got += [m for m in messages(await ws.get_message()) if "seq" in m]


async def feed(running: Running, events: list, per_second: float) -> None:
    async with running.dispatcher.open_source() as source:
        for event in events:
            await source.send(event)
            await trio.sleep(1 / per_second)


async def test_a_client_that_stops_reading_trades_is_closed_4008_in_time(
    captures: Path,
) -> None:
    events = [e for e in coinbase_events(captures) if isinstance(e, Trade | Ticker)]
    trades = [e for e in events if isinstance(e, Trade)]
    async with trio.open_nursery() as nursery:
        running = await start(nursery, stall_timeout=STALL, ping_interval=60,
                              ping_timeout=60, send_buffer=4096)
        stalled = await stalled_client(running, ["trades", "ticker"])
        got: list[dict] = []
        async with trio.open_nursery() as clients:
            clients.start_soon(reader, running.url, ["trades", "ticker"], len(events), got)
            await trio.sleep(0.2)  # both subscribed
            [session] = [s for s in running.server.sessions if s.remote.endswith(
                str(stalled.stream.socket.getsockname()[1]))]
            assert session.writer is not None
            clients.start_soon(feed, running, events, 200.0)
            with trio.fail_after(10):  # its connection takes nothing more
                while session.writer.stalled_since is None:
                    await trio.sleep(0.01)
            stalled_at = trio.current_time()
            with trio.fail_after(10):
                while running.server.slow_consumers == 0:
                    await trio.sleep(0.01)
            took = trio.current_time() - stalled_at
        # the reading client got every trade once, in order, and every ticker
        assert [m["id"] for m in got if m["type"] == "trade"] == [t.id for t in trades]
        assert len(got) == len(events) and not any(m.get("conflated") for m in got)
        streams: dict[str, list[int]] = {}
        for m in got:
            streams.setdefault(f"{m['type']}:{m['symbol']}", []).append(m["seq"])
        assert all(seqs == list(range(1, len(seqs) + 1)) for seqs in streams.values())
        # the stalled one was closed the stall time after its connection stopped
        # taking data, not after a ping timeout
        assert STALL - 0.05 <= took <= STALL + 0.5, took
        close = None
        with trio.fail_after(5):
            while close is None:
                for event in await stalled.events():
                    if isinstance(event, CloseConnection):
                        close = event
        assert close.code == 4008 and close.reason == "slow consumer"
        assert running.server.ping_timeouts == 0
        print(f"\nstalled trades client closed 4008 {took:.2f} s after its connection "
              f"stopped taking data; the reader got {len(got)} messages")
        nursery.cancel_scope.cancel()


async def test_a_client_that_stops_reading_tickers_is_conflated_and_then_served(
    captures: Path,
) -> None:
    tickers = [e for e in coinbase_events(captures) if isinstance(e, Ticker)][:200]
    async with trio.open_nursery() as nursery:
        running = await start(nursery, stall_timeout=STALL, ping_interval=60,
                              ping_timeout=60, send_buffer=4096)
        stalled = await stalled_client(running, ["ticker"])
        got: list[dict] = []
        async with trio.open_nursery() as clients:
            clients.start_soon(reader, running.url, ["ticker"], len(tickers), got)
            await trio.sleep(0.2)
            clients.start_soon(feed, running, tickers, 200.0)
            with trio.fail_after(10):
                while running.server.conflations == 0:
                    await trio.sleep(0.05)
        assert len(got) == len(tickers) and not any(m.get("conflated") for m in got)
        [session] = [s for s in running.server.sessions if s.statistics().conflated]
        assert session.close_code is None  # conflated, not closed
        # it reads again: it gets each stream's latest state
        latest = {}
        for m in got:
            latest[m["symbol"]] = m
        received: list[dict] = []
        text = ""
        with trio.fail_after(10):
            while not any(m.get("conflated") for m in received):
                for event in await stalled.events():
                    if isinstance(event, TextMessage):
                        text += event.data  # a message may come in parts
                        if event.message_finished:
                            received += messages(text)
                            text = ""
        conflated = [m for m in received if m.get("conflated")]
        assert all(m["seq"] == latest[m["symbol"]]["seq"] and m["bid"] == latest[m["symbol"]]["bid"]
                   for m in conflated)
        assert running.server.slow_consumers == 0 and running.server.ping_timeouts == 0
        print(f"\nstalled ticker client: {len(received)} messages once it read again, "
              f"{len(conflated)} conflated to the latest state")
        nursery.cancel_scope.cancel()
