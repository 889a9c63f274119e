"""The exchange emulator: serves recorded traffic on 127.0.0.1 as the exchange would.

Theory of operation
-------------------
One ``Emulator`` plays one exchange: a REST server (recorded answers, and books as
they stand at this moment of the replay) and a WebSocket server. All capture files
of the exchange form one tape, merged by recorded time. The tape starts when the
first connection subscribes to something, and plays with the recorded timing
divided by ``speed`` (``None``: as fast as the slowest connection reads). Each
frame advances the venue's state (its books) and goes to every open connection
that subscribed to it, through a small bounded queue per connection: a connection
that does not read holds the tape, as a TCP window would.

A connection that comes later (a reconnect) joins the tape where it is: what it
missed is gone, as on a real exchange, and its collector must recover. Faults
(``tape.Faults``) are injected by frame number.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any, Protocol

import attrs
import trio
import trio_websocket

from daemon.replay.capture import Capture, Received, exchange_of
from daemon.replay.http import serve_http
from daemon.replay.tape import NO_FAULTS, Faults, merge_frames

log = logging.getLogger(__name__)

CONNECTION_QUEUE = 16


class Venue(Protocol):
    """An exchange's emulation logic (``daemon.replay.venues``), sans-IO."""

    exchange: str

    def greeting(self) -> list[str]: ...
    def open(self, path: str) -> set[str]: ...
    def on_client_message(self, keys: set[str], text: str) -> list[str]: ...
    def route(self, frame: Received) -> str | None: ...
    def corrupt_checksum(self, text: str) -> str: ...
    def rest(self, target: str) -> tuple[int, bytes]: ...


def make_venue(exchange: str, captures: list[Capture]) -> Venue:
    """The venue emulator of ``exchange`` over ``captures``; ``KeyError`` if none."""
    if exchange in ("binance", "binanceus"):
        from daemon.replay.venues.binance import BinanceVenue

        return BinanceVenue(captures, exchange)
    if exchange == "coinbase":
        from daemon.replay.venues.coinbase import CoinbaseVenue

        return CoinbaseVenue(captures)
    if exchange == "kraken":
        from daemon.replay.venues.kraken import KrakenVenue

        return KrakenVenue(captures)
    raise KeyError(exchange)


@attrs.define(eq=False)
class _Connection:
    ws: trio_websocket.WebSocketConnection
    keys: set[str]
    send: trio.MemorySendChannel[str]
    closed: bool = False
    #: held while a client request's replies are queued, so no tape frame can
    #: slip between them (a frame before its book's snapshot would be lost)
    lock: trio.StrictFIFOLock = attrs.field(factory=trio.StrictFIFOLock)


@attrs.frozen
class EmulatorAddress:
    """Where an emulator listens: base URLs for a collector's ``rest_url``/``ws_url``."""

    exchange: str
    rest_url: str
    ws_url: str


class Emulator:
    """Plays ``captures`` (all of one exchange) at ``speed`` with ``faults``.

    After ``serve`` has started: ``address`` has the URLs, ``finished`` is set at
    the end of the tape, ``sent`` counts frames sent per connection total.
    """

    def __init__(
        self,
        captures: list[Capture],
        speed: float | None = 1.0,
        faults: Faults = NO_FAULTS,
        host: str = "127.0.0.1",
    ) -> None:
        exchanges = {exchange_of(url) for capture in captures for url in capture.urls}
        exchanges.discard(None)
        if len(exchanges) != 1:
            raise ValueError(f"one exchange per emulator, got {sorted(map(str, exchanges))}")
        self.exchange: str = exchanges.pop()
        self.venue = make_venue(self.exchange, captures)
        self.tape = merge_frames(captures)
        self.speed = speed
        self.faults = faults
        self.host = host
        self.connections: set[_Connection] = set()
        self.started = trio.Event()
        self.finished = trio.Event()
        self.position = 0
        self.sent = 0
        self.connections_total = 0
        self.address: EmulatorAddress | None = None

    async def serve(self, *, task_status: trio.TaskStatus[EmulatorAddress] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve REST and WebSocket on ``host`` (ports picked by the system)."""
        async with trio.open_nursery() as nursery:
            rest_port = await nursery.start(serve_http, self.venue.rest, self.host, 0)
            ws_server = await nursery.start(
                partial(
                    trio_websocket.serve_websocket, self._handle, self.host, 0, None,
                    max_message_size=1 << 20,
                )
            )
            self.address = EmulatorAddress(
                exchange=self.exchange,
                rest_url=f"http://{self.host}:{rest_port}",
                ws_url=f"ws://{self.host}:{ws_server.port}",
            )
            nursery.start_soon(self._play)
            task_status.started(self.address)

    async def _handle(self, request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        send, receive = trio.open_memory_channel[str](CONNECTION_QUEUE)
        conn = _Connection(ws=ws, keys=self.venue.open(request.path), send=send)
        self.connections.add(conn)
        self.connections_total += 1
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write, conn, receive)
                for text in self.venue.greeting():  # e.g. Kraken's systemStatus
                    await send.send(text)
                if conn.keys:
                    self.started.set()
                while True:
                    text = await ws.get_message()
                    async with conn.lock:
                        for reply in self.venue.on_client_message(conn.keys, text):
                            await send.send(reply)
                    if conn.keys:
                        self.started.set()
        except* trio_websocket.ConnectionClosed:
            pass
        finally:
            conn.closed = True
            self.connections.discard(conn)
            receive.close()  # a tape blocked on this connection moves on

    async def _write(self, conn: _Connection, receive: trio.MemoryReceiveChannel[str]) -> None:
        try:
            async for text in receive:
                await conn.ws.send_message(text)
        except trio_websocket.ConnectionClosed:
            pass

    async def _play(self) -> None:
        await self.started.wait()
        if not self.tape:
            self.finished.set()
            return
        first = self.tape[0].ts
        start = trio.current_time()
        faults = self.faults
        for number, frame in enumerate(self.tape, 1):
            self.position = number
            if self.speed is not None:
                await trio.sleep_until(start + (frame.ts - first) / self.speed)
            if number in faults.stall:
                await trio.sleep(faults.stall[number])
                start += faults.stall[number]
            key = self.venue.route(frame)
            if key is None:
                continue
            targets = [c for c in self.connections if key in c.keys and not c.closed]
            if number in faults.close:
                for conn in targets:
                    conn.closed = True
                    with trio.move_on_after(2):
                        await conn.ws.aclose(1001, "emulator: fault injected")
                continue
            if number in faults.drop:
                continue
            text = frame.text
            if number in faults.corrupt_checksum:
                text = self.venue.corrupt_checksum(text)
            if number in faults.malformed:
                text = text[: len(text) // 2]
            for conn in targets:
                try:
                    async with conn.lock:
                        if key not in conn.keys:
                            continue  # unsubscribed while the tape waited
                        await conn.send.send(text)
                        if number in faults.repeat:
                            await conn.send.send(text)
                    self.sent += 1
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    conn.closed = True
            if self.speed is None:
                await trio.lowlevel.checkpoint()
        self.finished.set()
        log.info("emulator %s: replay finished, %d frames", self.exchange, len(self.tape))

    def statistics(self) -> dict[str, Any]:
        """Where the tape is and what was sent."""
        return {
            "exchange": self.exchange,
            "position": self.position,
            "frames": len(self.tape),
            "sent": self.sent,
            "connections": len(self.connections),
            "finished": self.finished.is_set(),
        }
